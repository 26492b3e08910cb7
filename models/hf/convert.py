"""Conversion between our `Llama` and the stock transformers classes (models/hf/choose.py picks one): configs and
full (TP = 1) state dicts, both ways. One function per direction for every class; a `Target` says where the class's
norms sit. No torch.distributed here.

Layout of our weights (models/llama.py):
    blocks.{i}.attn.qkv.weight     rows [n_kv_heads, q_per_kv + 2, head_dim] = (q_1..q_Q, k, v) per kv head
    blocks.{i}.attn.{q,k}_norm.weight   [head_dim] (qk_norm=head) or [n_heads*head_dim], [n_kv_heads*head_dim] (full)
    blocks.{i}.mlp.gate.weight, blocks.{i}.mlp.up.weight
Query head h of HF uses kv head h // q_per_kv, which is our grouping read in row order; a full-width q norm sees the
heads in that same order.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from models.config import ModelConfig
from models.hf.choose import TARGETS, check_structure, export_target, import_schemes
from models.hf.common import check_keys, check_shape, fixed_scale, norm_output_scales, our_keys, scaled
from models.hf.linear_norm import LINEAR_EPS, is_linear_eps, linear_gain
from models.hf.target import Target, check_common_config
from models.llama import Llama
from models.norms import ATTN_IN, ATTN_OUT, MLP_IN, MLP_OUT, NORM_SCHEMES

_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")


def check_exportable(cfg: ModelConfig, model=None) -> Target:
    """The stock class `cfg` exports to; a one-line ValueError unless that class computes our model exactly."""
    target, _ = export_target(cfg)
    check_structure(cfg, target, model)
    return target


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def to_hf_config(cfg: ModelConfig, dtype: torch.dtype | str = torch.float32, **overrides: Any):
    """The transformers config (LlamaConfig, Qwen3Config or Olmo2Config) of `cfg`; refuses what no class expresses.

    `overrides` are passed on to the config (e.g. bos_token_id / eos_token_id of the tokenizer used; they default to
    None because the model config does not know the tokenizer)."""
    target = check_exportable(cfg)
    linear = NORM_SCHEMES[cfg.norm_scheme].norm_free
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.weight_std,
        rms_norm_eps=LINEAR_EPS if linear else cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        dtype=_dtype_name(dtype),
        architectures=[target.architecture],
        **({"head_dim": cfg.head_dim} if target.keeps_head_dim else {}),
    )
    kwargs.update(target.config_kwargs(cfg))  # may replace common fields (Gemma 4: rope_parameters per layer type)
    kwargs.update(overrides)
    return target.config_type()(**kwargs)


def _as_hf_config(hf_config: Any) -> tuple[Target, Any]:
    if isinstance(hf_config, dict):
        model_type = hf_config.get("model_type", "llama")
    else:
        model_type = getattr(hf_config, "model_type", None)
    target = TARGETS.get(model_type)
    if target is None:
        raise ValueError(f"HF config model_type={model_type!r}: only {', '.join(map(repr, TARGETS))} "
                         f"({', '.join(t.architecture for t in TARGETS.values())}) can be imported")
    return target, (target.config_type().from_dict(hf_config) if isinstance(hf_config, dict) else hf_config)


def _import_scheme(target: Target, c: Any, norm_scheme: str | None) -> str:
    linear = target is TARGETS["llama"] and is_linear_eps(float(c.rms_norm_eps))
    if norm_scheme is None:  # auto: a Llama with linearized norms is an ln_free export
        return "ln_free" if linear else import_schemes(target)[0]
    allowed = [s for s in import_schemes(target) if s != "ln_free" or linear]
    if norm_scheme not in allowed:
        why = (f"rms_norm_eps={c.rms_norm_eps} is a real norm's, not a linearized one's (>= 2^30)"
               if norm_scheme == "ln_free" and norm_scheme in import_schemes(target) else "")
        raise ValueError(f"norm_scheme={norm_scheme}: an HF {target.architecture} can only be imported as "
                         f"{' or '.join(allowed)}{f' ({why})' if why else ''}")
    return norm_scheme


def from_hf_config(hf_config: Any, norm_scheme: str | None = None) -> ModelConfig:
    """Our ModelConfig for an HF Llama, Qwen3 or OLMo 2 config; refuses configs our model cannot represent.

    `norm_scheme` None picks by model_type: llama -> pre_ln (ln_free when its norms are linearized: rms_norm_eps >=
    2^30), qwen3 -> pre_ln with model.qk_norm=head, olmo2 -> reordered with model.qk_norm=full. `lns` undoes the
    1/sqrt(l) fold of an lns export (llama, qwen3)."""
    target, c = _as_hf_config(hf_config)
    rope_theta = check_common_config(c)
    target.check_config(c)
    scheme = _import_scheme(target, c, norm_scheme)
    norm_free = NORM_SCHEMES[scheme].norm_free
    return ModelConfig(
        vocab_size=c.vocab_size,
        d_model=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        ffn_hidden=c.intermediate_size,
        max_seq_len=c.max_position_embeddings,
        rope_theta=rope_theta,
        norm_scheme=scheme,
        norm_type="rmsnorm",
        qk_norm=target.config_qk_norm,
        # ln_free: the multipliers are folded into the weights, so the import is the plain x + F(x) model, and its
        # norm_eps (which it never uses) stays at our default rather than 2^40.
        **({"ln_free_base_depth": 0} if norm_free else {"norm_eps": float(c.rms_norm_eps)}),
        tie_embeddings=bool(c.tie_word_embeddings),
        init_std=float(c.initializer_range),
    )


def to_hf_state_dict(cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our full (TP = 1) state dict -> the stock class's: norm gains folded (1 + w, 1/sqrt(l)), and for ln_free the
    linear norms' gains written and c_in / c_out folded into the projections.

    Every returned tensor owns its memory (safetensors refuses views of one storage). With tied embeddings
    `lm_head.weight` is left out, as `save_pretrained` does."""
    model = Llama.meta(cfg)
    target = check_exportable(cfg, model)
    linear = NORM_SCHEMES[cfg.norm_scheme].norm_free
    sd = {k: v for k, v in state_dict.items() if not k.endswith("._extra_state")}
    check_keys(set(sd), our_keys(cfg), "state dict")
    gains = norm_output_scales(cfg)
    K, Q, E, D, H = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.n_heads

    def get(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        check_shape(key, sd[key], shape)
        return sd[key].detach()

    def gain(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        offset, scale = gains[key]
        return scaled(get(key, shape), scale, offset)

    emb = get("tok_emb.weight", (cfg.vocab_size, D))
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": emb.clone()}
    for i, block in enumerate(model.blocks):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        # ln_free's depth-muP multipliers (1 for the other schemes): the slot's fixed scale times the matrix it feeds
        # (c_in: q/k/v, gate, up, by input column) or the matrix feeding it (c_out: o, down, by output row).
        c = {slot: fixed_scale(getattr(block, slot)) if linear else 1.0
             for slot in (ATTN_IN, ATTN_OUT, MLP_IN, MLP_OUT)}
        qkv = scaled(get(p + "attn.qkv.weight", (K * (Q + 2) * E, D)), c[ATTN_IN]).view(K, Q + 2, E, D)
        out[h + "self_attn.q_proj.weight"] = qkv[:, :Q].reshape(K * Q * E, D).clone()
        out[h + "self_attn.k_proj.weight"] = qkv[:, Q].reshape(K * E, D).clone()
        out[h + "self_attn.v_proj.weight"] = qkv[:, Q + 1].reshape(K * E, D).clone()
        out[h + "self_attn.o_proj.weight"] = scaled(get(p + "attn.o.weight", (D, H * E)), c[ATTN_OUT])
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj")):
            out[h + f"mlp.{theirs}.weight"] = scaled(get(p + f"mlp.{ours}.weight", (cfg.ffn_hidden, D)), c[MLP_IN])
        out[h + "mlp.down_proj.weight"] = scaled(get(p + "mlp.down.weight", (D, cfg.ffn_hidden)), c[MLP_OUT])
        for slot, theirs in target.block_norms.items():
            out[h + theirs + ".weight"] = linear_gain(D, emb.dtype) if linear else gain(p + slot + ".weight", (D,))
        for which, heads in (("q", H), ("k", K)) if target.qk_norm != "none" else ():
            shape = (E,) if target.qk_norm == "head" else (heads * E,)
            out[h + f"self_attn.{which}_norm.weight"] = gain(p + f"attn.{which}_norm.weight", shape)
        if target.layer_scalar:
            out[h + "layer_scalar"] = get(p + "layer_scalar.scale", (1,)).clone()
    out["model.norm.weight"] = linear_gain(D, emb.dtype) if linear else gain("final_norm.weight", (D,))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = get("head.weight", (cfg.vocab_size, D)).clone()
    return out


def hf_keys(target: Target, cfg: ModelConfig) -> set[str]:
    """The weights a `target` checkpoint of `cfg`'s shape holds (lm_head only when untied)."""
    keys = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if cfg.tie_embeddings else {"lm_head.weight"})
    per_layer = [*_PROJECTIONS, *target.block_norms.values()]
    per_layer += ["self_attn.q_norm", "self_attn.k_norm"] if target.qk_norm != "none" else []
    for i in range(cfg.n_layers):
        keys |= {f"model.layers.{i}.{n}.weight" for n in per_layer}
        keys |= {f"model.layers.{i}.layer_scalar"} if target.layer_scalar else set()
    return keys


def from_hf_state_dict(hf_config: Any, hf_state_dict: dict[str, torch.Tensor],
                       norm_scheme: str | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """An HF config + state dict -> our (ModelConfig, full TP = 1 state dict); `norm_scheme` as `from_hf_config`.

    Tensors keep the dtype they come in (our model casts on `load_state_dict`). Rotary `inv_freq` buffers that some
    transformers versions saved are ignored; with tied embeddings `lm_head.weight` may be absent (or present and equal
    to the embedding). A linearized (ln_free) export must have every norm gain exactly sqrt(rms_norm_eps)."""
    target, c = _as_hf_config(hf_config)
    cfg = from_hf_config(c, norm_scheme=norm_scheme)
    linear = NORM_SCHEMES[cfg.norm_scheme].norm_free
    sd = {k: v for k, v in hf_state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings and "lm_head.weight" in sd:
        head = sd.pop("lm_head.weight")
        emb = sd.get("model.embed_tokens.weight")
        if emb is not None and not torch.equal(head, emb):
            raise ValueError("HF config says tie_word_embeddings=true but lm_head.weight differs from embed_tokens")
    check_keys(set(sd), hf_keys(target, cfg), "HF state dict")

    K, Q, E, D, H = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.n_heads
    gains = norm_output_scales(cfg)

    def get(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        check_shape(key, sd[key], shape)
        return sd[key].detach()

    def norm(key: str, ours: str | None, shape: tuple[int, ...]) -> torch.Tensor | None:
        w = get(key, shape)
        if linear:  # nothing to keep, but only a linear norm may be dropped
            if not torch.equal(w, torch.full_like(w, math.sqrt(float(c.rms_norm_eps)))):
                raise ValueError(f"{key} is not sqrt(rms_norm_eps) everywhere, so this Llama's norms are not linear "
                                 "and it is no ln_free export; import it with norm_scheme=pre_ln (the same function)")
            return None
        offset, scale = gains[ours]
        return (w.double() / scale - offset).to(w.dtype) if (offset, scale) != (0.0, 1.0) else w.clone()

    out: dict[str, torch.Tensor] = {"tok_emb.weight": get("model.embed_tokens.weight", (cfg.vocab_size, D)).clone()}
    for i in range(cfg.n_layers):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        q = get(h + "self_attn.q_proj.weight", (K * Q * E, D)).reshape(K, Q, E, D)
        k = get(h + "self_attn.k_proj.weight", (K * E, D)).reshape(K, 1, E, D)
        v = get(h + "self_attn.v_proj.weight", (K * E, D)).reshape(K, 1, E, D)
        out[p + "attn.qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(K * (Q + 2) * E, D)
        out[p + "attn.o.weight"] = get(h + "self_attn.o_proj.weight", (D, H * E)).clone()
        out[p + "mlp.gate.weight"] = get(h + "mlp.gate_proj.weight", (cfg.ffn_hidden, D)).clone()
        out[p + "mlp.up.weight"] = get(h + "mlp.up_proj.weight", (cfg.ffn_hidden, D)).clone()
        out[p + "mlp.down.weight"] = get(h + "mlp.down_proj.weight", (D, cfg.ffn_hidden)).clone()
        for slot, theirs in target.block_norms.items():
            w = norm(h + theirs + ".weight", p + slot + ".weight", (D,))
            if w is not None:
                out[p + slot + ".weight"] = w
        for which, heads in (("q", H), ("k", K)) if target.qk_norm != "none" else ():
            shape = (E,) if target.qk_norm == "head" else (heads * E,)
            out[p + f"attn.{which}_norm.weight"] = norm(h + f"self_attn.{which}_norm.weight",
                                                        p + f"attn.{which}_norm.weight", shape)
        if target.layer_scalar:
            out[p + "layer_scalar.scale"] = get(h + "layer_scalar", (1,)).clone()
    final = norm("model.norm.weight", "final_norm.weight", (D,))
    if final is not None:
        out["final_norm.weight"] = final
    if not cfg.tie_embeddings:
        out["head.weight"] = get("lm_head.weight", (cfg.vocab_size, D)).clone()
    check_keys(set(out), our_keys(cfg), "converted state dict")  # guards this function against llama.py drift
    return cfg, out

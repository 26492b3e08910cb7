"""Conversion between our `Llama` and Hugging Face transformers' `LlamaForCausalLM`.

Pure functions on full (TP = 1) state dicts; no CLI and no torch.distributed here.

Export (ours -> HF) works for the schemes whose blocks are exactly Llama's, `x + F(N(x))` with one
RMSNorm before each branch and a final RMSNorm (`NORM_SCHEMES[...].llama_compatible`). A norm's fixed
`output_scale` (LayerNorm Scaling's 1/sqrt(l)) is folded into its weight, so `lns` exports as a plain
Llama whose logits equal ours. Anything Llama cannot express (post-norms, norms on the branch output,
residual weights, LayerNorm, DyT, no final norm) is refused with a one-line `ValueError`.

Layout of our weights (see models/llama.py):
    blocks.{i}.attn.qkv.weight     rows [n_kv_heads, q_per_kv + 2, head_dim] = (q_1..q_Q, k, v) per kv head
    blocks.{i}.mlp.gate.weight, blocks.{i}.mlp.up.weight
Query head h of HF uses kv head h // q_per_kv, which is our grouping read in row order.

Import (HF -> ours) gives a `pre_ln` model by default. `norm_scheme="lns"` (any exportable scheme) instead
divides each norm weight by the scheme's `output_scale`, the inverse of the export fold, so an exported
`lns` model comes back as the same `lns` model (up to float rounding) and can keep training as one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from models.config import ModelConfig
from models.llama import Llama, rope_cache
from models.norms import ATTN_IN, ATTN_OUT, ATTN_POST, MLP_IN, MLP_OUT, MLP_POST, NORM_SCHEMES, RMSNorm

if TYPE_CHECKING:  # transformers is imported lazily: the training path never needs it
    from transformers import LlamaConfig  # transformers takes seconds to import: only HF conversions pay

__all__ = [
    "to_hf_config",
    "to_hf_state_dict",
    "from_hf_config",
    "from_hf_state_dict",
    "save_hf",
    "load_hf",
    "load_hf_state",
    "check_exportable",
    "norm_output_scales",
]

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"

# Per-block names: ours -> HF (norm weights are handled separately because of the fold).
_BLOCK_NORMS = {ATTN_IN: "input_layernorm", MLP_IN: "post_attention_layernorm"}  # our slot -> Llama's name


# ----------------------------------------------------------------------------------------------------------
# Export checks


def _exportable_schemes() -> list[str]:
    return [name for name, scheme in NORM_SCHEMES.items() if scheme.llama_compatible]


def _refusal(what: str) -> ValueError:
    return ValueError(
        f"{what} cannot be expressed as a transformers LlamaForCausalLM (it has only pre-norm RMSNorm blocks); "
        f"export is supported for {' and '.join(_exportable_schemes())} with model.norm_type=rmsnorm"
    )


def _meta_model(cfg: ModelConfig) -> Llama:
    """Our model's module structure (norm scales, parts) without allocating or initializing any weight."""
    with torch.device("meta"):
        return Llama(cfg)


def check_exportable(cfg: ModelConfig, model: Llama | None = None) -> None:
    """Raise a one-line ValueError unless `cfg` describes a model transformers' Llama computes exactly."""
    scheme = NORM_SCHEMES.get(cfg.norm_scheme)
    if scheme is None or not scheme.llama_compatible:
        raise _refusal(f"model.norm_scheme={cfg.norm_scheme}")
    if cfg.norm_type != "rmsnorm":
        raise _refusal(f"model.norm_type={cfg.norm_type}")
    if cfg.qk_norm != "none":
        raise _refusal(f"model.qk_norm={cfg.qk_norm} (Llama has no q/k norms)")
    if cfg.attn_gate != "none":
        raise _refusal(f"model.attn_gate={cfg.attn_gate} (Llama has no attention output gate)")
    if cfg.gpas:
        raise _refusal("model.gpas=true (Llama has no activation scaling)")
    # The table says "compatible"; check the structure too, so that a scheme marked compatible by mistake
    # is refused instead of silently exported as a different function.
    model = _meta_model(cfg) if model is None else model
    for l, block in enumerate(model.blocks, start=1):
        for name in (ATTN_OUT, ATTN_POST, MLP_OUT, MLP_POST):
            if not isinstance(getattr(block, name), nn.Identity):
                raise _refusal(f"model.norm_scheme={cfg.norm_scheme} (block {l} has a {name})")
        for name in _BLOCK_NORMS:
            if type(getattr(block, name)) is not RMSNorm:
                raise _refusal(f"model.norm_scheme={cfg.norm_scheme} (block {l}'s {name} is not an RMSNorm)")
        if block.residual_alpha != 1.0:
            raise _refusal(f"model.norm_scheme={cfg.norm_scheme} (residual weight {block.residual_alpha} != 1)")
    if type(model.final_norm) is not RMSNorm:
        raise _refusal(f"model.norm_scheme={cfg.norm_scheme} (no final RMSNorm)")


def norm_output_scales(cfg: ModelConfig) -> dict[str, tuple[float, float]]:
    """`{our norm weight key: (gain_offset, output_scale)}` for every norm of the model `cfg` describes: its
    effective gain is (weight + gain_offset) * output_scale (model.norm_gain, LayerNorm Scaling's 1/sqrt(l))."""
    model = _meta_model(cfg)
    return {
        f"{name}.weight": (float(module.gain_offset), float(module.output_scale))
        for name, module in model.named_modules()
        if hasattr(module, "output_scale")
    }


# ----------------------------------------------------------------------------------------------------------
# Config


def to_hf_config(cfg: ModelConfig, dtype: torch.dtype | str = torch.float32, **overrides: Any) -> "LlamaConfig":
    """The transformers LlamaConfig of `cfg` (refuses schemes Llama cannot express).

    `overrides` are passed on to LlamaConfig (e.g. bos_token_id / eos_token_id of the tokenizer used;
    they default to None because the model config does not know the tokenizer).
    """
    from transformers import LlamaConfig  # transformers takes seconds to import: only HF conversions pay

    check_exportable(cfg)
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.weight_std,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        dtype=_dtype_name(dtype),
        architectures=["LlamaForCausalLM"],
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def _as_llama_config(hf_config: "LlamaConfig | dict") -> "LlamaConfig":
    from transformers import LlamaConfig  # transformers takes seconds to import: only HF conversions pay

    if isinstance(hf_config, dict):
        model_type = hf_config.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"HF config model_type={model_type!r}: only 'llama' (LlamaForCausalLM) can be imported")
        return LlamaConfig.from_dict(hf_config)
    if getattr(hf_config, "model_type", None) != "llama":
        raise ValueError(
            f"HF config model_type={getattr(hf_config, 'model_type', None)!r}: only 'llama' (LlamaForCausalLM) can be imported"
        )
    return hf_config


def from_hf_config(hf_config: "LlamaConfig | dict", norm_scheme: str = "pre_ln") -> ModelConfig:
    """Our ModelConfig for an HF Llama config; refuses configs our model cannot represent.

    `norm_scheme` must be an exportable scheme (pre_ln, lns); see the module docstring.
    """
    c = _as_llama_config(hf_config)
    scheme = NORM_SCHEMES.get(norm_scheme)
    if scheme is None or not scheme.llama_compatible:
        raise ValueError(
            f"norm_scheme={norm_scheme}: an HF Llama can only be imported as one of {', '.join(_exportable_schemes())}"
        )

    def refuse(field: str, value: Any, why: str) -> ValueError:
        return ValueError(f"HF config {field}={value!r} is not supported: {why}")

    if c.hidden_act != "silu":
        raise refuse("hidden_act", c.hidden_act, "our MLP is SwiGLU (silu)")
    if getattr(c, "attention_bias", False):
        raise refuse("attention_bias", c.attention_bias, "our attention has no biases")
    if getattr(c, "mlp_bias", False):
        raise refuse("mlp_bias", c.mlp_bias, "our MLP has no biases")
    rope = dict(getattr(c, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise refuse("rope_parameters.rope_type", rope_type, "rope scaling is not implemented, only plain RoPE")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise refuse("rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"], "RoPE covers the whole head")
    rope_theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    if rope_theta is None:
        raise ValueError("HF config has no rope_theta (in rope_parameters)")
    head_dim = getattr(c, "head_dim", None)
    if head_dim is not None and head_dim != c.hidden_size // c.num_attention_heads:
        raise refuse(
            "head_dim", head_dim, f"it must equal hidden_size / num_attention_heads = {c.hidden_size // c.num_attention_heads}"
        )
    return ModelConfig(
        vocab_size=c.vocab_size,
        d_model=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        ffn_hidden=c.intermediate_size,
        max_seq_len=c.max_position_embeddings,
        rope_theta=float(rope_theta),
        norm_scheme=norm_scheme,
        norm_type="rmsnorm",
        norm_eps=float(c.rms_norm_eps),
        tie_embeddings=bool(c.tie_word_embeddings),
        init_std=float(c.initializer_range),
    )


# ----------------------------------------------------------------------------------------------------------
# State dicts


def _our_keys(cfg: ModelConfig) -> set[str]:
    return set(_meta_model(cfg).state_dict())


def _check_keys(got: set[str], expected: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise ValueError(f"{what} does not match the model config: {'; '.join(parts)}")


def _check_shape(key: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{key}: shape {tuple(t.shape)} does not match the model config's {tuple(shape)}")


def to_hf_state_dict(cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our full (TP = 1) state dict -> LlamaForCausalLM's, norm `output_scale`s folded into norm weights.

    Every returned tensor owns its memory (safetensors refuses views of one storage). With tied embeddings
    `lm_head.weight` is left out, as `save_pretrained` does.
    """
    check_exportable(cfg)
    sd = {k: v for k, v in state_dict.items() if not k.endswith("._extra_state")}
    _check_keys(set(sd), _our_keys(cfg), "state dict")
    scales = norm_output_scales(cfg)
    K, Q, E, D = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim, cfg.d_model

    def norm_weight(key: str) -> torch.Tensor:
        w = sd[key].detach()
        _check_shape(key, w, (D,))
        offset, scale = scales[key]
        # Fold in fp32 (or wider) and cast back, so a bf16 checkpoint does not round twice.
        return ((w.double() + offset) * scale).to(w.dtype) if (offset, scale) != (0.0, 1.0) else w.clone()

    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": sd["tok_emb.weight"].detach().clone()}
    _check_shape("tok_emb.weight", sd["tok_emb.weight"], (cfg.vocab_size, D))
    for i in range(cfg.n_layers):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        qkv = sd[p + "attn.qkv.weight"].detach()
        _check_shape(p + "attn.qkv.weight", qkv, (K * (Q + 2) * E, D))
        qkv = qkv.view(K, Q + 2, E, D)
        out[h + "self_attn.q_proj.weight"] = qkv[:, :Q].reshape(K * Q * E, D).clone()
        out[h + "self_attn.k_proj.weight"] = qkv[:, Q].reshape(K * E, D).clone()
        out[h + "self_attn.v_proj.weight"] = qkv[:, Q + 1].reshape(K * E, D).clone()
        o = sd[p + "attn.o.weight"].detach()
        _check_shape(p + "attn.o.weight", o, (D, cfg.n_heads * E))
        out[h + "self_attn.o_proj.weight"] = o.clone()
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj")):
            w = sd[p + f"mlp.{ours}.weight"].detach()
            _check_shape(p + f"mlp.{ours}.weight", w, (cfg.ffn_hidden, D))
            out[h + f"mlp.{theirs}.weight"] = w.clone()
        down = sd[p + "mlp.down.weight"].detach()
        _check_shape(p + "mlp.down.weight", down, (D, cfg.ffn_hidden))
        out[h + "mlp.down_proj.weight"] = down.clone()
        for ours, theirs in _BLOCK_NORMS.items():
            out[h + theirs + ".weight"] = norm_weight(p + ours + ".weight")
    out["model.norm.weight"] = norm_weight("final_norm.weight")
    if not cfg.tie_embeddings:
        _check_shape("head.weight", sd["head.weight"], (cfg.vocab_size, D))
        out["lm_head.weight"] = sd["head.weight"].detach().clone()
    return out


def from_hf_state_dict(
    hf_config: "LlamaConfig | dict", hf_state_dict: dict[str, torch.Tensor], norm_scheme: str = "pre_ln"
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """An HF LlamaForCausalLM config + state dict -> our (ModelConfig, full TP = 1 state dict).

    Tensors keep the dtype they come in (our model casts on `load_state_dict`). Rotary `inv_freq` buffers
    that some transformers versions saved are ignored; with tied embeddings `lm_head.weight` may be absent
    (or present and equal to the embedding).
    """
    cfg = from_hf_config(hf_config, norm_scheme=norm_scheme)
    sd = {k: v for k, v in hf_state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings and "lm_head.weight" in sd:
        head = sd.pop("lm_head.weight")
        emb = sd.get("model.embed_tokens.weight")
        if emb is not None and not torch.equal(head, emb):
            raise ValueError("HF config says tie_word_embeddings=true but lm_head.weight differs from embed_tokens")
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if cfg.tie_embeddings else {"lm_head.weight"})
    for i in range(cfg.n_layers):
        h = f"model.layers.{i}."
        expected |= {
            h + n + ".weight"
            for n in (
                "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm",
            )
        }
    _check_keys(set(sd), expected, "HF state dict")

    K, Q, E, D = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    scales = norm_output_scales(cfg)

    def get(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = sd[key].detach()
        _check_shape(key, t, shape)
        return t

    def norm_weight(key: str, ours: str) -> torch.Tensor:
        w, (offset, scale) = get(key, (D,)), scales[ours]
        return (w.double() / scale - offset).to(w.dtype) if (offset, scale) != (0.0, 1.0) else w.clone()

    out: dict[str, torch.Tensor] = {"tok_emb.weight": get("model.embed_tokens.weight", (cfg.vocab_size, D)).clone()}
    for i in range(cfg.n_layers):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        q = get(h + "self_attn.q_proj.weight", (K * Q * E, D)).reshape(K, Q, E, D)
        k = get(h + "self_attn.k_proj.weight", (K * E, D)).reshape(K, 1, E, D)
        v = get(h + "self_attn.v_proj.weight", (K * E, D)).reshape(K, 1, E, D)
        out[p + "attn.qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(K * (Q + 2) * E, D)
        out[p + "attn.o.weight"] = get(h + "self_attn.o_proj.weight", (D, cfg.n_heads * E)).clone()
        out[p + "mlp.gate.weight"] = get(h + "mlp.gate_proj.weight", (cfg.ffn_hidden, D)).clone()
        out[p + "mlp.up.weight"] = get(h + "mlp.up_proj.weight", (cfg.ffn_hidden, D)).clone()
        out[p + "mlp.down.weight"] = get(h + "mlp.down_proj.weight", (D, cfg.ffn_hidden)).clone()
        for ours, theirs in _BLOCK_NORMS.items():
            out[p + ours + ".weight"] = norm_weight(h + theirs + ".weight", p + ours + ".weight")
    out["final_norm.weight"] = norm_weight("model.norm.weight", "final_norm.weight")
    if not cfg.tie_embeddings:
        out["head.weight"] = get("lm_head.weight", (cfg.vocab_size, D)).clone()
    _check_keys(set(out), _our_keys(cfg), "converted state dict")  # guards this function against llama.py drift
    return cfg, out


# ----------------------------------------------------------------------------------------------------------
# Directories


def save_hf(
    cfg: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    write_extra: Callable[[Path], None] | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a `LlamaForCausalLM.from_pretrained`-loadable directory: config.json + model.safetensors.

    Written into a temporary sibling directory and renamed into place, so a failure leaves no half-written
    `out_dir`. An existing non-empty `out_dir` is refused (FileExistsError) unless `overwrite`.
    `config_overrides` go to `to_hf_config` (e.g. bos_token_id, eos_token_id). `write_extra(tmp_dir)` adds files
    (tokenizer, generation config) to the directory before it is renamed into place, so they are part of the same
    all-or-nothing write.
    """
    from safetensors.torch import save_file  # with transformers: only HF conversions need it

    out = Path(out_dir)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or remove it")
    hf_sd = to_hf_state_dict(cfg, state_dict)  # before touching the disk: refusals leave nothing behind
    dtypes = {t.dtype for t in hf_sd.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    hf_cfg = to_hf_config(cfg, dtype=dtype, **config_overrides)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        hf_cfg.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        if write_extra is not None:
            write_extra(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    """Move `src` to `dst`; an existing `dst` is swapped out first and removed only after the move."""
    if not dst.exists():
        os.replace(src, dst)
        return
    if dst.is_dir() and not any(dst.iterdir()):
        dst.rmdir()
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    old.rmdir()
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old) if old.is_dir() else old.unlink()


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # with transformers: only HF conversions need it

    if (path / SAFETENSORS_NAME).is_file():
        return load_file(str(path / SAFETENSORS_NAME))
    if (path / SAFETENSORS_INDEX_NAME).is_file():
        index = json.loads((path / SAFETENSORS_INDEX_NAME).read_text())
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            sd.update(load_file(str(path / shard)))
        return sd
    if (path / BIN_NAME).is_file():
        return torch.load(path / BIN_NAME, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME} or {BIN_NAME} found")


def load_hf_state(path: str | os.PathLike, norm_scheme: str = "pre_ln") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """An HF Llama directory (config.json + safetensors) -> our (ModelConfig, full state dict)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a transformers LlamaForCausalLM directory)")
    hf_config = json.loads(config_file.read_text())
    return from_hf_state_dict(hf_config, _read_hf_weights(path), norm_scheme=norm_scheme)


def load_hf(path: str | os.PathLike, norm_scheme: str = "pre_ln") -> Llama:
    """An HF Llama directory -> our `Llama` (TP = 1, fp32, on CPU)."""
    cfg, sd = load_hf_state(path, norm_scheme=norm_scheme)
    return _build(cfg, sd)


def _build(cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> Llama:
    """`Llama(cfg)` holding `state_dict`, without spending time on a random init that is overwritten."""
    model = _meta_model(cfg)
    buffers = {name for name, _ in model.named_buffers()}
    if buffers != {"rope_cos", "rope_sin"}:  # llama.py grew a buffer this shortcut does not know: build plainly
        model = Llama(cfg)
    else:
        model = model.to_empty(device="cpu")
        model.rope_cos, model.rope_sin = rope_cache(cfg)
    model.load_state_dict(state_dict, strict=True)
    return model

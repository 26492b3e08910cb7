"""Gemma 4 and Muse Glimmer against transformers' own modules (transformers 5.25, float32, equal weights).

`gemma4` exports to Gemma4ForCausalLM (tests/models/test_hf_parity.py's export cases: ours -> theirs -> ours); here a
Gemma4ForCausalLM built by transformers is imported, compared and written back. `muse_glimmer` has no export
(transformers has no MuseGlimmerForCausalLM: MuseGlimmerForConditionalGeneration carries a vision tower and always
tanh-softcaps its logits), so its blocks and final norm are compared with MuseGlimmerTextModel's hidden states, and
our logits with its hidden states through our head, every layer configured as ours: full attention (no sliding
window), RoPE in every layer (no NoPE layers)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from models.hf import from_hf_config, load_hf, save_hf  # noqa: E402
from models.llama import Llama  # noqa: E402
from models.config import ModelConfig  # noqa: E402

pytestmark = pytest.mark.compat

VOCAB, D, L, H, K, E, F, T = 128, 64, 3, 4, 2, 16, 96, 40
THETA, EPS = 20000.0, 1e-5


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def gemma4_config(**overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
              num_key_value_heads=K, head_dim=E, global_head_dim=E, hidden_activation="silu",
              max_position_embeddings=64, rms_norm_eps=EPS, tie_word_embeddings=True,
              layer_types=["full_attention"] * L, hidden_size_per_layer_input=0, final_logit_softcapping=None,
              rope_parameters={t: {"rope_type": "default", "rope_theta": THETA}
                               for t in ("full_attention", "sliding_attention")},
              initializer_range=0.05, pad_token_id=None, eos_token_id=None, bos_token_id=None)
    return transformers.Gemma4TextConfig(**{**kw, **overrides})


def test_gemma4_made_by_transformers_imports_and_writes_back(tmp_path):
    torch.manual_seed(5)
    hf = transformers.Gemma4ForCausalLM(gemma4_config()).eval()
    with torch.no_grad():  # gains and layer scalars away from 1, so a misplaced one shows
        for name, t in [*hf.named_parameters(), *hf.named_buffers()]:
            if name.endswith(("norm.weight", "layer_scalar")):
                t.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "src")

    ours = load_hf(tmp_path / "src").eval()
    assert (ours.cfg.norm_scheme, ours.cfg.qk_norm, ours.cfg.tie_embeddings) == ("gemma4", "none", True)
    x = tokens(1)
    with torch.no_grad():
        a, b = ours(x), hf(input_ids=x).logits
    diff = (a - b).abs().max().item()
    rel = diff / a.abs().max().item()
    print(f"PARITY import gemma4: max abs {diff:.2e}, relative {rel:.2e}")
    assert rel <= 1e-5

    save_hf(ours.cfg, ours.state_dict(), tmp_path / "back")
    src, back = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("src", "back"))
    assert sorted(back) == sorted(src) and all(torch.equal(back[k], src[k]) for k in src)


@pytest.mark.parametrize("change,field", [
    (dict(layer_types=None), "layer_types"),  # Gemma 4's default: five sliding-window layers in six
    (dict(hidden_size_per_layer_input=32), "hidden_size_per_layer_input"),
    (dict(final_logit_softcapping=30.0), "final_logit_softcapping"),
    (dict(num_kv_shared_layers=1), "num_kv_shared_layers"),
    (dict(attention_k_eq_v=True, num_global_key_value_heads=K), "attention_k_eq_v"),
    (dict(hidden_activation="gelu_pytorch_tanh"), "hidden_act"),
])
def test_gemma4_features_ours_lacks_are_refused_on_import(change, field):
    with pytest.raises(ValueError, match=rf"^HF config {field}=.* is not supported: "):
        from_hf_config(gemma4_config(**change))


# ---------------------------------------------------------------------------------------------------------
# Muse Glimmer


def muse_text_model(ours: Llama):
    """transformers' MuseGlimmerTextModel configured as `ours` and holding its weights."""
    c = ours.cfg
    hf_cfg = transformers.MuseGlimmerTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_hidden, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        hidden_activation="silu", max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        post_norm_eps=1e-8, qk_scale_factor=3.87, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        layer_types=["full_attention"] * c.n_layers, layer_rope_theta=[c.rope_theta] * c.n_layers,
        sliding_window=c.max_seq_len, tie_word_embeddings=False, pad_token_id=None, eos_token_id=None,
        bos_token_id=None)  # (sliding_window: the mask it builds is read by no layer, all full attention)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.MuseGlimmerTextModel(hf_cfg).eval()
    sd = ours.state_dict()
    Q = c.n_heads // c.n_kv_heads
    out = {"embed_tokens.weight": sd["tok_emb.weight"], "norm.weight": sd["final_norm.weight"]}
    for i in range(c.n_layers):
        p, h = f"blocks.{i}.", f"layers.{i}."
        qkv = sd[p + "attn.qkv.weight"].view(c.n_kv_heads, Q + 2, c.head_dim, c.d_model)
        out[h + "self_attn.q_proj.weight"] = qkv[:, :Q].reshape(-1, c.d_model)
        out[h + "self_attn.k_proj.weight"] = qkv[:, Q].reshape(-1, c.d_model)
        out[h + "self_attn.v_proj.weight"] = qkv[:, Q + 1].reshape(-1, c.d_model)
        out[h + "self_attn.o_proj.weight"] = sd[p + "attn.o.weight"]
        out[h + "self_attn.gate_proj.weight"] = sd[p + "attn.out_gate.proj.weight"]  # rows in the q heads' order
        for ours_name, theirs in (("attn_norm", "input_layernorm"), ("attn_out_norm", "post_attention_layernorm"),
                                  ("mlp_norm", "pre_feedforward_layernorm"),
                                  ("mlp_out_norm", "post_feedforward_layernorm")):
            out[h + theirs + ".weight"] = sd[p + ours_name + ".weight"]  # both store w of (1 + w)
        for ours_name, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            out[h + f"mlp.{theirs}.weight"] = sd[p + f"mlp.{ours_name}.weight"]
    hf.load_state_dict(out, strict=True)
    return hf


@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_muse_glimmer_equals_transformers_text_model(n_kv_heads):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=L, n_heads=H, n_kv_heads=n_kv_heads, ffn_hidden=F,
                      max_seq_len=64, rope_theta=THETA, norm_eps=EPS, norm_scheme="muse_glimmer")
    ours = Llama(cfg, seed=2).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):  # (1 + w) with w in [-0.5, 0.5), the final norm's w in [0.5, 1.5)
                p.copy_(torch.rand(p.shape, generator=gen) + (0.5 if name == "final_norm.weight" else -0.5))
    hf = muse_text_model(ours)
    x = tokens(4)
    with torch.no_grad():
        theirs = hf(input_ids=x).last_hidden_state
        h = ours.embed(x)
        for block in ours.blocks:
            h = block(h, ours.rope_cos, ours.rope_sin)
        mine = ours.readout(h)
        logits, their_logits = ours(x), theirs @ ours.head.weight.T
    diff = (mine - theirs).abs().max().item()
    ldiff = (logits - their_logits).abs().max().item()
    print(f"PARITY muse_glimmer kv{n_kv_heads}: hidden max abs {diff:.2e}, logits max abs {ldiff:.2e} "
          f"(relative {ldiff / logits.abs().max().item():.2e})")
    assert diff <= 1e-5 and ldiff <= 1e-5 * logits.abs().max().item()
    # not vacuous: the q factor, the gate and the centred gains each change the result
    assert (mine - ours.readout(ours.embed(x))).abs().max() > 1e-2

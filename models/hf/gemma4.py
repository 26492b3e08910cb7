"""transformers' Gemma4ForCausalLM (the text model, `gemma4_text`): pre and post RMSNorms around attention and MLP
(input_layernorm, post_attention_layernorm, pre_feedforward_layernorm, post_feedforward_layernorm), q/k RMSNorms per
head with a gain and v RMSNorm per head without one before RoPE, attention scale 1, each layer's output times its
`layer_scalar`, the embedding times sqrt(hidden_size) -- our `gemma4`. Gemma 4's other features are written off on
export and refused on import: every layer full attention (layer_types, so no sliding window) with plain RoPE over the
whole head (rope_parameters of both layer types "default"; global_head_dim = head_dim), no per-layer inputs
(hidden_size_per_layer_input 0), no final logit softcap, no MoE block, no KV sharing, no k = v attention, causal."""

from __future__ import annotations

from models.hf.target import Target, refuse
from models.norms import ATTN_IN, ATTN_OUT, MLP_IN, MLP_OUT

LAYER_TYPES = ("full_attention", "sliding_attention")


def _config(cfg) -> dict:
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    return dict(
        hidden_activation="silu",
        layer_types=["full_attention"] * cfg.n_layers,
        rope_parameters={t: dict(rope) for t in LAYER_TYPES},
        global_head_dim=cfg.head_dim,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=cfg.vocab_size,
        final_logit_softcapping=None,
        attention_k_eq_v=False,
        num_kv_shared_layers=0,
        enable_moe_block=False,
        use_double_wide_mlp=False,
        use_bidirectional_attention=None,
    )


def _check(c) -> None:
    sliding = [t for t in (c.layer_types or []) if t != "full_attention"]
    if sliding:
        raise refuse("layer_types", sliding[0], "our attention is full causal attention in every layer")
    for field, off, why in (
        ("hidden_size_per_layer_input", 0, "our blocks take no per-layer inputs"),
        ("final_logit_softcapping", None, "our head has no softcap"),
        ("enable_moe_block", False, "our MLP is dense"),
        ("num_kv_shared_layers", 0, "each of our layers has its own keys and values"),
        ("attention_k_eq_v", False, "our keys and values have their own projections"),
        ("use_bidirectional_attention", None, "our attention is causal"),
    ):
        value = getattr(c, field, off)
        if value != off and not (off == 0 and not value):
            raise refuse(field, value, why)
    for i in range(c.num_hidden_layers):
        layer = c.per_layer_config[i]
        if layer.head_dim != c.head_dim or layer.num_key_value_heads != c.num_key_value_heads:
            raise refuse("global_head_dim", layer.head_dim, "every layer of ours has the same head_dim and kv heads")


GEMMA4 = Target(
    model_type="gemma4_text",
    architecture="Gemma4ForCausalLM",
    config_class="Gemma4TextConfig",
    qk_norm="head",
    scheme_qk_norm="none",  # gemma4 builds its own q/k norms: model.qk_norm stays at none
    block_norms={ATTN_IN: "input_layernorm", ATTN_OUT: "post_attention_layernorm", MLP_IN: "pre_feedforward_layernorm",
                 MLP_OUT: "post_feedforward_layernorm"},
    config_kwargs=_config,
    check_config=_check,
    softmax_scale=1.0,
    v_norm=True,
    layer_scalar=True,
    embedding_scale=True,
)

"""transformers' Qwen3ForCausalLM: Llama's pre-norm blocks plus RMSNorms on q and k per head over head_dim (one gain
each, shared by the heads) before RoPE -- our pre_ln / lns with model.qk_norm=head. Every layer must use full
attention: Qwen3's sliding-window layers are refused on import."""

from __future__ import annotations

from models.hf.target import Target, refuse
from models.norms import ATTN_IN, MLP_IN


def _check(c) -> None:
    if getattr(c, "use_sliding_window", False):
        raise refuse("use_sliding_window", c.use_sliding_window, "our attention is full causal attention")
    sliding = [t for t in (getattr(c, "layer_types", None) or []) if t != "full_attention"]
    if sliding:
        raise refuse("layer_types", sliding[0], "our attention is full causal attention in every layer")


QWEN3 = Target(
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    config_class="Qwen3Config",
    qk_norm="head",
    block_norms={ATTN_IN: "input_layernorm", MLP_IN: "post_attention_layernorm"},
    # Qwen3Config defaults to a 4096-token window that only use_sliding_window switches on: written off explicitly.
    config_kwargs=lambda cfg: dict(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers),
    check_config=_check,
)

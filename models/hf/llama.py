"""transformers' LlamaForCausalLM: pre-norm RMSNorm blocks (input_layernorm before attention, post_attention_layernorm
before the MLP), no q/k norms. Our pre_ln and lns export to it (LNS's 1/sqrt(l) folded into the gains), and so does
ln_free, its norms made linear (models/hf/linear_norm.py)."""

from __future__ import annotations

from models.hf.target import Target, refuse
from models.norms import ATTN_IN, MLP_IN


def _check(c) -> None:
    if getattr(c, "mlp_bias", False):
        raise refuse("mlp_bias", c.mlp_bias, "our MLP has no biases")


LLAMA = Target(
    model_type="llama",
    architecture="LlamaForCausalLM",
    config_class="LlamaConfig",
    qk_norm="none",
    block_norms={ATTN_IN: "input_layernorm", MLP_IN: "post_attention_layernorm"},
    config_kwargs=lambda cfg: dict(mlp_bias=False),
    check_config=_check,
)

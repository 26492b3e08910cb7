"""transformers' Olmo2ForCausalLM: no norm on the sublayer inputs, an RMSNorm on each sublayer's output before the add
(post_attention_layernorm, post_feedforward_layernorm), RMSNorms on q over n_heads*head_dim and on k over
n_kv_heads*head_dim before RoPE -- our `reordered` with model.qk_norm=full. Its config has no head_dim (it is
hidden_size / num_attention_heads, as ours)."""

from __future__ import annotations

from models.hf.target import Target
from models.norms import ATTN_OUT, MLP_OUT

OLMO2 = Target(
    model_type="olmo2",
    architecture="Olmo2ForCausalLM",
    config_class="Olmo2Config",
    qk_norm="full",
    block_norms={ATTN_OUT: "post_attention_layernorm", MLP_OUT: "post_feedforward_layernorm"},
    keeps_head_dim=False,
)

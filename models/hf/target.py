"""What a stock transformers class is to the conversions: one `Target` per class (models/hf/llama.py, qwen3.py,
olmo2.py), holding where its norms sit in our block, how its config is written and which of its config fields we
cannot represent. The state-dict conversion (models/hf/convert.py) is one function for all of them, driven by this."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from models.config import ModelConfig


@dataclass(frozen=True)
class Target:
    model_type: str  # config.json's model_type
    architecture: str  # the transformers class (config.json's architectures)
    config_class: str  # its transformers config class
    qk_norm: str  # our model.qk_norm for its q_norm / k_norm ("none": the class has none)
    block_norms: dict[str, str]  # our block slot -> the class's norm module in a layer
    config_kwargs: Callable[[ModelConfig], dict[str, Any]] = lambda cfg: {}  # class-specific export fields
    check_config: Callable[[Any], None] = lambda c: None  # refuses class-specific fields we cannot represent
    keeps_head_dim: bool = True  # its config stores head_dim (OLMo 2 derives it)
    scheme_qk_norm: str | None = None  # our model.qk_norm on import, where the scheme builds its q/k norms itself
    softmax_scale: float | None = None  # its attention scale (None: 1/sqrt(head_dim))
    v_norm: bool = False  # a gain-free RMSNorm on v per head
    layer_scalar: bool = False  # each layer's output times a scalar (`layer_scalar`)
    embedding_scale: bool = False  # the embedding times sqrt(hidden_size)

    @property
    def config_qk_norm(self) -> str:
        return self.qk_norm if self.scheme_qk_norm is None else self.scheme_qk_norm

    def config_type(self):
        import transformers  # transformers takes seconds to import: only HF conversions pay

        return getattr(transformers, self.config_class)


def refuse(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"HF config {field}={value!r} is not supported: {why}")


def check_common_config(c: Any) -> float:
    """Refuses fields every supported class has but our model cannot represent; returns rope_theta."""
    act = getattr(c, "hidden_act", None) or getattr(c, "hidden_activation", None)  # Gemma names it hidden_activation
    if act != "silu":
        raise refuse("hidden_act", act, "our MLP is SwiGLU (silu)")
    if getattr(c, "attention_bias", False):
        raise refuse("attention_bias", c.attention_bias, "our attention has no biases")
    if getattr(c, "attention_dropout", 0.0):
        raise refuse("attention_dropout", c.attention_dropout, "our attention has no dropout")
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if "full_attention" in rope:  # per layer type (Gemma 4): its layers are all full attention (checked by its target)
        rope = dict(rope["full_attention"] or {})
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
    return float(rope_theta)

"""Shared pieces of the Hugging Face conversions: key and shape checks, the effective norm gains, fixed scales. (Our
model's structure without weights is `Llama.meta`, a model holding a state dict `Llama.from_state_dict`.)"""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.llama import Llama
from models.norm_layers import RMSNorm
from models.parallel import HeadNorm, WidthNorm

# The norm classes a stock class can hold: block and final RMSNorm, q/k norms per head or over the full width. Exact
# types (a subclass such as LayerNorm or RemovableRMSNorm computes something else, or holds more state).
STOCK_NORMS = (RMSNorm, HeadNorm, WidthNorm)


def our_keys(cfg: ModelConfig) -> set[str]:
    return set(Llama.meta(cfg).state_dict())


def check_keys(got: set[str], expected: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise ValueError(f"{what} does not match the model config: {'; '.join(parts)}")


def check_shape(key: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{key}: shape {tuple(t.shape)} does not match the model config's {tuple(shape)}")


def norm_output_scales(cfg: ModelConfig) -> dict[str, tuple[float, float]]:
    """`{our norm weight key: (gain_offset, output_scale)}` for every RMSNorm-like norm of the model `cfg` describes
    (block and final norms, q/k norms): its effective gain is (weight + gain_offset) * output_scale (model.norm_gain,
    LayerNorm Scaling's 1/sqrt(l); q/k norms have no output scale)."""
    return {
        f"{name}.weight": (float(module.gain_offset), float(getattr(module, "output_scale", 1.0)))
        for name, module in Llama.meta(cfg).named_modules()
        if isinstance(module, STOCK_NORMS)
    }


def scaled(w: torch.Tensor, factor: float, offset: float = 0.0) -> torch.Tensor:
    """(w + offset) * factor computed in float64 and cast back, so a bf16 weight rounds once; a copy either way."""
    if (offset, factor) == (0.0, 1.0):
        return w.detach().clone()
    return ((w.detach().double() + offset) * factor).to(w.dtype)


def fixed_scale(module: nn.Module) -> float:
    """The multiplier a parameter-free slot applies (ln_free's `Scale`, or 1 for nn.Identity)."""
    return float(getattr(module, "scale", 1.0))

"""Normalization layers and the one table that says where each scheme puts them.

A block (models/llama.py) always computes

    h   = attn_post_norm(alpha * x + attn_out_norm(Attn(attn_norm(x))))
    out = mlp_post_norm (alpha * h + mlp_out_norm (MLP (mlp_norm (h))))

and a scheme is nothing but the choice of those six parts (nn.Identity where a scheme has no norm), the
residual weight alpha and a few init gains, per layer l = 1..L. Adding a scheme means adding one entry
to `NORM_SCHEMES`, never an `if` in the forward pass.

    pre_ln    x = x + F(N(x))                                   final N
    lns       x = x + F(N(x) / sqrt(l))   (LayerNorm Scaling)   final N, unscaled
    ln_free   x = x + F(x)                                      no final norm; depth-scaled output init
    post_ln   x = N(x + F(x))                                   no final norm (last block ends in N)
    mix_ln    post_ln in blocks l <= floor(0.25 L), pre_ln after final N
    peri_ln   x = x + N_out(F(N_in(x)))                         final N
    deepnorm  x = N(alpha x + F(x)), alpha = (2L)^(1/4),        no final norm
              init gain beta = (8L)^(-1/4) on value, attention-output and MLP weights
    dyt       N replaced by DyT(x) = gamma * tanh(alpha x)      final DyT
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as Llama does), times a learnable gain and a fixed `output_scale`."""

    def __init__(self, dim: int, eps: float = 1e-6, output_scale: float = 1.0):
        super().__init__()
        self.dim, self.eps, self.output_scale = dim, eps, output_scale
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(_at_least_fp32(x), (self.dim,), eps=self.eps).type_as(x) * self.weight
        return y * self.output_scale if self.output_scale != 1.0 else y

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, output_scale={self.output_scale:.4g}"


class LayerNorm(RMSNorm):
    """Bias-free LayerNorm (the project uses no biases), fp32 statistics, fixed `output_scale`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(_at_least_fp32(x), (self.dim,), eps=self.eps).type_as(x) * self.weight
        return y * self.output_scale if self.output_scale != 1.0 else y


class DyT(nn.Module):
    """Dynamic Tanh (Zhu et al., 2025): gamma * tanh(alpha * x) with a learnable scalar alpha, no bias."""

    def __init__(self, dim: int, alpha_init: float = 0.5):
        super().__init__()
        self.dim, self.alpha_init = dim, alpha_init
        self.alpha = nn.Parameter(torch.full((1,), alpha_init))
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha * x)

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha_init)
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.dim}, alpha_init={self.alpha_init}"


NORM_CLASSES = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}
NormFactory = Callable[[], nn.Module]


@dataclass(frozen=True)
class BlockParts:
    """The swappable parts of one block (see the module docstring for where each one sits)."""

    attn_norm: NormFactory = nn.Identity
    attn_out_norm: NormFactory = nn.Identity
    attn_post_norm: NormFactory = nn.Identity
    mlp_norm: NormFactory = nn.Identity
    mlp_out_norm: NormFactory = nn.Identity
    mlp_post_norm: NormFactory = nn.Identity
    residual_alpha: float = 1.0
    # Multipliers of model.init_std for the block's weights.
    init_gain_value: float = 1.0
    init_gain_attn_out: float = 1.0
    init_gain_mlp_in: float = 1.0
    init_gain_mlp_out: float = 1.0


@dataclass(frozen=True)
class NormScheme:
    block: Callable[[ModelConfig, int], BlockParts]  # (config, l in 1..L) -> parts of block l
    final_norm: Callable[[ModelConfig], nn.Module]
    llama_compatible: bool  # exportable to transformers' LlamaForCausalLM (norm scales folded into weights)


def norm(cfg: ModelConfig, scale: float = 1.0) -> NormFactory:
    cls = NORM_CLASSES[cfg.norm_type]
    return lambda: cls(cfg.d_model, cfg.norm_eps, output_scale=scale)


def dyt(cfg: ModelConfig) -> NormFactory:
    return lambda: DyT(cfg.d_model, cfg.dyt_alpha_init)


def _pre_ln(cfg: ModelConfig, layer: int) -> BlockParts:
    return BlockParts(attn_norm=norm(cfg), mlp_norm=norm(cfg))


def _lns(cfg: ModelConfig, layer: int) -> BlockParts:
    # LayerNorm Scaling (Sun et al., 2025): both norm outputs of block l are multiplied by 1/sqrt(l).
    scaled = norm(cfg, scale=1.0 / math.sqrt(layer))
    return BlockParts(attn_norm=scaled, mlp_norm=scaled)


def _ln_free(cfg: ModelConfig, layer: int) -> BlockParts:
    # Without any norm the residual stream grows with every branch added to it; scaling the init of the
    # two branch output projections by 1/sqrt(2L) (GPT-2 / Megatron "scaled init") keeps its variance
    # O(1) at initialization, which is what keeps a from-scratch run trainable.
    gain = 1.0 / math.sqrt(2 * cfg.n_layers)
    return BlockParts(init_gain_attn_out=gain, init_gain_mlp_out=gain)


def _post_ln(cfg: ModelConfig, layer: int) -> BlockParts:
    return BlockParts(attn_post_norm=norm(cfg), mlp_post_norm=norm(cfg))


def _mix_ln(cfg: ModelConfig, layer: int) -> BlockParts:
    n_post = math.floor(cfg.mix_ln_post_fraction * cfg.n_layers)
    return _post_ln(cfg, layer) if layer <= n_post else _pre_ln(cfg, layer)


def _peri_ln(cfg: ModelConfig, layer: int) -> BlockParts:
    return BlockParts(attn_norm=norm(cfg), attn_out_norm=norm(cfg), mlp_norm=norm(cfg), mlp_out_norm=norm(cfg))


def _deepnorm(cfg: ModelConfig, layer: int) -> BlockParts:
    # DeepNet (Wang et al., 2022), decoder-only constants.
    beta = (8 * cfg.n_layers) ** -0.25
    return BlockParts(
        attn_post_norm=norm(cfg),
        mlp_post_norm=norm(cfg),
        residual_alpha=(2 * cfg.n_layers) ** 0.25,
        init_gain_value=beta,
        init_gain_attn_out=beta,
        init_gain_mlp_in=beta,
        init_gain_mlp_out=beta,
    )


def _dyt(cfg: ModelConfig, layer: int) -> BlockParts:
    return BlockParts(attn_norm=dyt(cfg), mlp_norm=dyt(cfg))


def _final_norm(cfg: ModelConfig) -> nn.Module:
    return norm(cfg)()


def _no_final_norm(cfg: ModelConfig) -> nn.Module:
    return nn.Identity()


NORM_SCHEMES: dict[str, NormScheme] = {
    "pre_ln": NormScheme(_pre_ln, _final_norm, llama_compatible=True),
    "lns": NormScheme(_lns, _final_norm, llama_compatible=True),
    "ln_free": NormScheme(_ln_free, _no_final_norm, llama_compatible=False),
    "post_ln": NormScheme(_post_ln, _no_final_norm, llama_compatible=False),
    "mix_ln": NormScheme(_mix_ln, _final_norm, llama_compatible=False),
    "peri_ln": NormScheme(_peri_ln, _final_norm, llama_compatible=False),
    "deepnorm": NormScheme(_deepnorm, _no_final_norm, llama_compatible=False),
    "dyt": NormScheme(_dyt, lambda cfg: dyt(cfg)(), llama_compatible=False),
}

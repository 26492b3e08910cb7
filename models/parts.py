"""The swappable block parts that are not norms: residual updates and the attention output gate.

models/norms.py's scheme table picks them per block (`BlockParts`), as it picks the norms; the block's forward calls
the slot and never asks which one it holds.

    Residual        x' = alpha x + F                                       every scheme but ngpt
    GPAS            x' = P(z), z = alpha x + F                             model.gpas, pre-norm blocks
                    x' = alpha P(x) + F                                    model.gpas, post-norm blocks
                    P(z) = z - SiLU(g) stopgrad(z), one g per block from 0 (Chen et al., 2025; dandingsky/GPAS)
    AttentionGate   y' = y * sigmoid(X W_g)                                model.attn_gate (Qiu et al., 2025)
    NGPTResidual    x' = n(n(x) + |alpha| (n(F) - n(x))), n(v) = v / |v|     ngpt (Loshchilov et al., 2024)

A block has one residual module; before each sublayer it reads the sublayer's input, `residual.read(x, sublayer)`
(x itself here; a stream state's mix with model.residual, models/streams.py), and after it calls
`residual(x, branch, sublayer, mix)` with sublayer 0 (attention) or 1 (MLP): GPAS shares its g between the two adds of
a block, as the reference code does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.parallel import TensorParallel, column_linear


class SingleStream:
    """The read of a one-stream residual: the sublayer reads the stream itself, and the write needs nothing more."""

    def read(self, x: torch.Tensor, sublayer: int) -> tuple[torch.Tensor, None]:
        return x, None


class Residual(SingleStream, nn.Module):
    """x' = alpha * x + c * branch (alpha = 1 but for deepnorm; c = `branch_scale`, 1 but for a parametrization's
    branch multiplier where the scheme's output slot holds a norm: models/norms.py `with_multipliers`)."""

    branch_scale = 1.0

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha

    def branch(self, branch: torch.Tensor) -> torch.Tensor:
        return branch if self.branch_scale == 1.0 else branch * self.branch_scale

    def forward(self, x: torch.Tensor, branch: torch.Tensor, sublayer: int, mix=None) -> torch.Tensor:
        return torch.add(self.branch(branch), x, alpha=self.alpha)

    def extra_repr(self) -> str:
        scale = f", branch_scale={self.branch_scale:.4g}" if self.branch_scale != 1.0 else ""
        return (f"alpha={self.alpha:.4g}" if self.alpha != 1.0 else "") + scale


class GPAS(Residual):
    """Gradient-Preserving Activation Scaling: P(z) = z - SiLU(g) * stopgrad(z), so the forward scales the stream by
    1 - SiLU(g) while the gradient through z is untouched; g is one scalar per block, 0 at init (the identity).
    Pre-norm blocks scale the stream after the add; post-norm blocks (`shortcut`: deepnorm, mix_ln's Post-LN blocks)
    scale the shortcut before it, since their post-norm would undo any scale after it. The reference code clips g's
    gradient apart from the rest at scale (train.gpas_grad_clip)."""

    def __init__(self, alpha: float = 1.0, shortcut: bool = False):
        super().__init__(alpha)
        self.shortcut = shortcut
        self.gate = nn.Parameter(torch.zeros(1))  # shape [1]: DeepSpeed broadcasts parameters as bytes, a 0-dim one fails

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        return z - F.silu(self.gate).to(z.dtype) * z.detach()

    def forward(self, x: torch.Tensor, branch: torch.Tensor, sublayer: int, mix=None) -> torch.Tensor:
        if self.shortcut:
            return torch.add(self.branch(branch), self.scale(x), alpha=self.alpha)
        return self.scale(torch.add(self.branch(branch), x, alpha=self.alpha))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gate)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {'shortcut' if self.shortcut else 'after the add'}".lstrip(", ")


class Ungated(nn.Module):
    """The attention output as it is (model.attn_gate=none)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y


class AttentionGate(nn.Module):
    """Gated attention (Qiu et al., 2025, eq. of the G1 position; Qwen3-Next): the attention output per head,
    y [B, T, H, E], times sigmoid(X W_g) before the output projection, X [B, T, D] the attention's input (what q, k
    and v are projected from). `headwise`: one gate per head (W_g: [H, D]); `elementwise`: one per head and channel
    (W_g: [H * E, D]). W_g is column-parallel, split with the heads as q is, so each rank gates its own heads."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, elementwise: bool, tp: TensorParallel | None):
        super().__init__()
        self.per_head = head_dim if elementwise else 1
        self.proj = column_linear(d_model, n_heads * self.per_head, tp)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[:2]
        g = torch.sigmoid(self.proj(x)).view(B, T, -1, self.per_head)  # [B, T, H, 1 or E]
        return y * g

    def extra_repr(self) -> str:
        return "elementwise" if self.per_head > 1 else "headwise"


def l2_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / |x| along `dim`, the norm in at least fp32, no epsilon (nGPT's justnorm, as NVIDIA/ngpt and OLMo-core compute it)."""
    wide = torch.promote_types(x.dtype, torch.float32)
    return x / torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=wide).to(x.dtype)


class L2Norm(nn.Module):
    """Projection onto the unit sphere along the last dim: nGPT's Norm, no gain."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize(x)


class UnitScaled(nn.Module):
    """nGPT's q and k after RoPE: s_qk * x / |x| per head (NVIDIA/ngpt normalizes after RoPE; in exact arithmetic RoPE
    keeps each head's norm, but its fp32 cos/sin do not quite)."""

    def __init__(self, scale: nn.Module):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(l2_normalize(x))


class NGPTResidual(SingleStream, nn.Module):
    """nGPT's residual update on the hypersphere (eq. 10-11): x' = n(n(x) + |alpha_s| (b - n(x))), b the sublayer's
    normalized output (the block's out-norm slot), alpha_s the attention's (s = 0) or the MLP's (s = 1) eigen learning
    rates, [D] each, stored from `scaling` = 1/sqrt(D) and applied as stored * alpha_init / scaling (NVIDIA/ngpt:
    alpha_init 0.05), in fp32."""

    def __init__(self, d_model: int, alpha_init: float = 0.05):
        super().__init__()
        self.scaling = d_model ** -0.5
        self.factor = alpha_init / self.scaling
        self.rates = nn.Parameter(torch.full((2, d_model), self.scaling))

    def forward(self, x: torch.Tensor, branch: torch.Tensor, sublayer: int, mix=None) -> torch.Tensor:
        rate = (self.rates[sublayer] * self.factor).abs().to(x.dtype)
        x = l2_normalize(x)
        return l2_normalize(x + rate * (branch - x))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.rates, self.scaling)

    def extra_repr(self) -> str:
        return f"alpha_init={self.factor * self.scaling:.4g}"


@torch.no_grad()
def unit_weight_norms(module: nn.Module, rules: dict[str, int]) -> dict[str, tuple[torch.Tensor, int]]:
    """{parameter name: (parameter, dim)} of the weights an nGPT model keeps on the unit sphere: `rules` maps a name
    suffix (e.g. "attn.o.weight") to the dim along which its vectors have norm 1 (models/norms.py `NGPT_UNIT_WEIGHTS`)."""
    out = {}
    for name, p in module.named_parameters():
        dim = next((d for suffix, d in rules.items() if name == suffix or name.endswith("." + suffix)), None)
        if dim is not None:
            out[name] = (p, dim)
    return out


@torch.no_grad()
def normalize_unit_weights(module: nn.Module, rules: dict[str, int]) -> None:
    """Every weight `rules` names onto the unit sphere along its dim. Each dim is one the rank holds whole under
    tensor parallelism (d_model is never split), so this is exact per rank."""
    for p, dim in unit_weight_norms(module, rules).values():
        p.copy_(l2_normalize(p.float(), dim).to(p.dtype))

"""The per-layer statistics: one registry entry each, read by everything that shows them.

An entry's `name` is its key in layer_stats.jsonl (a list, one value per block) and its TensorBoard tags
(layers/<name>/lNN); `figure=True` draws it against depth in `pretrain plot` and `pretrain report`
(pretrain/analysis/figures.py), with `label` on the y axis, on a log scale where `log_scale`.

Activation statistics (`compute` set) are computed from one block's `BlockActivations` (pretrain/diagnostics/
taps.py) of the measured micro-batch, in at least fp32, as a 0-d tensor on the device (no host sync). The
gradient statistic (`compute` None) is measured by pretrain/diagnostics/probes.py. Adding a statistic: one entry
in `LAYER_STATS` (tests/test_diagnostics.py checks every entry reaches the file, TensorBoard, plot and report).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from pretrain.diagnostics.taps import BlockActivations


@dataclass(frozen=True)
class LayerStat:
    name: str
    label: str  # axis label
    title: str  # panel title (figures of `pretrain plot` and `pretrain report`)
    compute: Callable[[BlockActivations], torch.Tensor] | None  # None: measured from gradients
    log_scale: bool = True
    figure: bool = False


def _tiny(t: torch.Tensor) -> float:
    return torch.finfo(t.dtype).tiny


# Fused norms (torch.linalg.vector_norm) rather than x.square().sum() and friends: no [B, T, D] temporaries where
# avoidable, which keeps a measured step within a few percent of an unmeasured one.
def variance(b: BlockActivations) -> torch.Tensor:
    """Mean over tokens of the per-token (biased) variance of y over the hidden dim (two-pass: stable when the
    per-token mean is large): the Curse of Depth paper's "output variance" of layer l."""
    y = b.y
    return torch.linalg.vector_norm(y - y.mean(dim=-1, keepdim=True), dim=-1).square().mean() / y.shape[-1]


def rms(b: BlockActivations) -> torch.Tensor:
    """sqrt(mean over all elements of y^2)."""
    return (torch.linalg.vector_norm(b.y).square() / b.y.numel()).sqrt()


def attn_ratio(b: BlockActivations) -> torch.Tensor:
    """||a||_F / ||alpha x||_F over the micro-batch: the attention output relative to the residual it is added to."""
    a2, x2 = torch.linalg.vector_norm(b.a).square(), torch.linalg.vector_norm(b.x).square()
    return (a2 / (b.alpha ** 2 * x2).clamp_min(_tiny(x2))).sqrt()


def mlp_ratio(b: BlockActivations) -> torch.Tensor:
    """||m||_F / ||alpha h||_F, h the residual the MLP branch is added to."""
    m2, h2 = torch.linalg.vector_norm(b.m).square(), torch.linalg.vector_norm(b.h).square()
    return (m2 / (b.alpha ** 2 * h2).clamp_min(_tiny(h2))).sqrt()


def angular_distance(b: BlockActivations) -> torch.Tensor:
    """Mean over tokens of arccos(cos(x_t, y_t)) / pi, in [0, 1] (Gromov et al.)."""
    x, y = b.x, b.y
    norms = torch.linalg.vector_norm(x, dim=-1) * torch.linalg.vector_norm(y, dim=-1)
    cos = torch.linalg.vecdot(x, y) / norms.clamp_min(_tiny(norms))
    return torch.acos(cos.clamp(-1.0, 1.0)).mean() / math.pi


LAYER_STATS: tuple[LayerStat, ...] = (
    LayerStat("variance", "output variance", "Residual variance vs depth", variance, figure=True),
    LayerStat("rms", "output RMS", "Residual RMS vs depth", rms),
    LayerStat("attn_ratio", "||a|| / ||x||", "Attention branch vs residual", attn_ratio),
    LayerStat("mlp_ratio", "||m|| / ||h||", "MLP branch vs residual", mlp_ratio),
    LayerStat("angular_distance", "angular distance / pi", "Input vs output of each block", angular_distance,
              log_scale=False),
    LayerStat("grad_norm", "gradient norm", "Block gradient norm vs depth", None, figure=True),
)
ACTIVATION_STATS = tuple(s for s in LAYER_STATS if s.compute is not None)
FIGURE_STATS = tuple(s for s in LAYER_STATS if s.figure)

# The gradient norms of the parameters outside the blocks: layer_stats.jsonl's grad_norm_<group> (null where the
# model has none), TensorBoard's layers/grad_norm_<group>; then grad_norm_global over every parameter.
GRADIENT_GROUPS = ("embedding", "final_norm", "head")

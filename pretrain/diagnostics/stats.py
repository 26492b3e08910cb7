"""How the training-time measures of the table (pretrain/diagnostics/measures.py: names, labels, definitions) are
computed: a function of one block's `BlockActivations` (pretrain/diagnostics/taps.py) of the measured micro-batch
per activation measure, in at least fp32, as a 0-d tensor on the device (no host sync); a per-stream measure (shape
PER_STREAM) as a [n] tensor of the state's streams, computed only when the block's state has n > 1 streams. grad_norm
has none here:
pretrain/diagnostics/probes.py measures it from the gradients. Adding a statistic: its entry in the table (with
training=True) and its function in `ACTIVATION_FUNCTIONS` (per stream: `STREAM_FUNCTIONS`) (tests/pretrain/diagnostics/test_diagnostics.py checks every training entry
reaches the file, TensorBoard, plot and report).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from pretrain.diagnostics.measures import LAYER_STATS, PER_STREAM, LayerMeasure
from pretrain.diagnostics.taps import BlockActivations

GRADIENT_STAT = "grad_norm"  # the training entry measured from the gradients, not from activations
STREAM_GRADIENT_STAT = "grad_norm_stream"  # the per-stream entry measured from the input state's gradient


@dataclass(frozen=True)
class ActivationStat:
    """A training-time entry of the table and its function of one block's activations."""

    measure: LayerMeasure
    compute: Callable[[BlockActivations], torch.Tensor]

    @property
    def name(self) -> str:
        return self.measure.name


def _tiny(t: torch.Tensor) -> float:
    return torch.finfo(t.dtype).tiny


# Fused norms (torch.linalg.vector_norm) rather than x.square().sum() and friends: no [B, T, D] temporaries where
# avoidable, which keeps a measured step within a few percent of an unmeasured one.
def variance(b: BlockActivations) -> torch.Tensor:
    """Two-pass (centred first): stable when the per-token mean is large."""
    y = b.y
    return torch.linalg.vector_norm(y - y.mean(dim=-1, keepdim=True), dim=-1).square().mean() / y.shape[-1]


def rms(b: BlockActivations) -> torch.Tensor:
    return (torch.linalg.vector_norm(b.y).square() / b.y.numel()).sqrt()


def attn_ratio(b: BlockActivations) -> torch.Tensor:
    a2, x2 = torch.linalg.vector_norm(b.a).square(), torch.linalg.vector_norm(b.x).square()
    return (a2 / (b.alpha ** 2 * x2).clamp_min(_tiny(x2))).sqrt()


def mlp_ratio(b: BlockActivations) -> torch.Tensor:
    m2, h2 = torch.linalg.vector_norm(b.m).square(), torch.linalg.vector_norm(b.h).square()
    return (m2 / (b.alpha ** 2 * h2).clamp_min(_tiny(h2))).sqrt()


def angular_distance(b: BlockActivations) -> torch.Tensor:
    """The cosine clamped into [-1, 1] before arccos: rounding can leave it just outside."""
    x, y = b.x, b.y
    norms = torch.linalg.vector_norm(x, dim=-1) * torch.linalg.vector_norm(y, dim=-1)
    cos = torch.linalg.vecdot(x, y) / norms.clamp_min(_tiny(norms))
    return torch.acos(cos.clamp(-1.0, 1.0)).mean() / math.pi


def _mix(b: BlockActivations) -> torch.Tensor:
    """The block's mixing matrices [..., n, n]: the residual streams' comb, or one stream's [[alpha]]."""
    if b.mix is None:
        return torch.full((1, 1), b.alpha, dtype=b.y.dtype, device=b.y.device)
    return b.mix


def mix_ds_error(b: BlockActivations) -> torch.Tensor:
    m = _mix(b)
    return torch.maximum((m.sum(-1) - 1).abs().amax(), (m.sum(-2) - 1).abs().amax())


def mix_spectral_norm(b: BlockActivations) -> torch.Tensor:
    return torch.linalg.matrix_norm(_mix(b), ord=2).mean()


def mix_entropy(b: BlockActivations) -> torch.Tensor:
    """Of each row's |entries| normalized to sum 1 (hyper-connections' A_r may be negative); 0 log 0 = 0."""
    m = _mix(b).abs()
    p = m / m.sum(-1, keepdim=True).clamp_min(_tiny(m))
    return -torch.special.xlogy(p, p).sum(-1).mean()


# The function of each training-time entry of the table but GRADIENT_STAT; a training entry without one here fails
# at import with its name (KeyError).
ACTIVATION_FUNCTIONS: dict[str, Callable[[BlockActivations], torch.Tensor]] = {
    "variance": variance, "rms": rms, "attn_ratio": attn_ratio, "mlp_ratio": mlp_ratio,
    "angular_distance": angular_distance, "mix_ds_error": mix_ds_error, "mix_spectral_norm": mix_spectral_norm,
    "mix_entropy": mix_entropy,
}


# Per stream, from the states [B, T, n, D] (BlockActivations.states): reduced over tokens and the hidden dim, one
# value per stream. Written generically from the state's shape, so every multi-stream residual is measured alike.
def variance_stream(b: BlockActivations) -> torch.Tensor:
    y = b.states[2]
    centred = y - y.mean(dim=-1, keepdim=True)
    return torch.linalg.vector_norm(centred, dim=-1).square().mean(dim=(0, 1)) / y.shape[-1]


def _update_ratio(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """||after_k - before_k||_F / ||before_k||_F per stream k, over batch, tokens and the hidden dim."""
    change = torch.linalg.vector_norm(after - before, dim=(0, 1, 3)).square()
    base = torch.linalg.vector_norm(before, dim=(0, 1, 3)).square()
    return (change / base.clamp_min(_tiny(base))).sqrt()


def attn_ratio_stream(b: BlockActivations) -> torch.Tensor:
    return _update_ratio(b.states[0], b.states[1])


def mlp_ratio_stream(b: BlockActivations) -> torch.Tensor:
    return _update_ratio(b.states[1], b.states[2])


STREAM_FUNCTIONS: dict[str, Callable[[BlockActivations], torch.Tensor]] = {
    "variance_stream": variance_stream, "attn_ratio_stream": attn_ratio_stream, "mlp_ratio_stream": mlp_ratio_stream,
}
ACTIVATION_STATS = tuple(ActivationStat(m, ACTIVATION_FUNCTIONS[m.name]) for m in LAYER_STATS
                         if m.name != GRADIENT_STAT and m.shape != PER_STREAM)
STREAM_STATS = tuple(ActivationStat(m, STREAM_FUNCTIONS[m.name]) for m in LAYER_STATS
                     if m.shape == PER_STREAM and m.name != STREAM_GRADIENT_STAT)
# The rows of the per-stream result, in table order: STREAM_STATS' and the gradient's.
STREAM_ROWS = tuple(m.name for m in LAYER_STATS if m.shape == PER_STREAM)


def stream_grad_norm(grad: torch.Tensor) -> torch.Tensor:
    """grad_norm_stream's norm of the input state's gradient [B, T, n, D] per stream (the probe scales it)."""
    return torch.linalg.vector_norm(grad, dim=(0, 1, 3))

# The gradient norms of the parameters outside the blocks: layer_stats.jsonl's grad_norm_<group> (null where the
# model has none), TensorBoard's layers/grad_norm_<group>; then grad_norm_global over every parameter.
GRADIENT_GROUPS = ("embedding", "final_norm", "head")

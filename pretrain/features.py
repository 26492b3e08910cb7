"""The training features a config turns on, as hooks for the loop (pretrain/train/hooks.py).

The one place that knows every feature: `pretrain train` and `pretrain remove-norms` build their hook lists here,
the loop sees only `TrainHooks`. A new feature is a `TrainHooks` subclass in the package of its concern (a package of
its own such as diagnostics/ or removal/; a part of the optimizer step, such as nGPT's unit weights or GPAS's gate
clip, in train/ beside the step it changes) plus a line here.
"""

from __future__ import annotations

from models.norms import NORM_SCHEMES
from pretrain.analysis.downstream_loop import DownstreamHooks
from pretrain.analysis.figures import variance_vs_depth_figure
from pretrain.config import ExperimentConfig
from pretrain.diagnostics.hooks import LayerStatsHooks
from pretrain.removal.hooks import RemovalHooks
from pretrain.removal.taper import TaperHooks
from pretrain.train.gate_clip import ClipGateGradients
from pretrain.train.hooks import TrainHooks
from pretrain.train.signals import StopOnSignal
from pretrain.train.unit_weights import KeepUnitWeights


def hooks_for(cfg: ExperimentConfig, stop: StopOnSignal) -> list[TrainHooks]:
    """The hooks of a run of `cfg`: the preemption signal `stop` (built by the command before any set-up, so that a
    signal during set-up is not lost), a scheme's unit-norm weights (ngpt; first, so that everything after a step
    sees them), GPAS's gate clip (train.gpas_gate_clip), per-layer diagnostics (diagnostics.interval > 0), the norm-removal schedule
    (model.removable_norms; its taper route with model.taper_norms) and downstream tasks (eval.downstream)."""
    hooks: list[TrainHooks] = [stop]
    unit_weights = NORM_SCHEMES[cfg.model.norm_scheme].unit_weights
    if unit_weights:
        hooks.append(KeepUnitWeights(unit_weights))
    if cfg.train.gpas_gate_clip > 0:
        hooks.append(ClipGateGradients(cfg.train.gpas_gate_clip))
    if cfg.diagnostics.interval > 0:
        hooks.append(LayerStatsHooks(figure=variance_vs_depth_figure))
    if cfg.model.removable_norms:
        hooks.append(TaperHooks(cfg) if cfg.model.taper_norms else RemovalHooks(cfg))
    if cfg.eval.downstream:
        hooks.append(DownstreamHooks(cfg))
    return hooks

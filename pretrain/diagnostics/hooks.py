"""Per-layer diagnostics as loop hooks: measure every diagnostics.interval-th step (pretrain/diagnostics/)."""

from __future__ import annotations

from typing import Callable

from pretrain.diagnostics.probes import LayerDiagnostics
from pretrain.train.hooks import TrainContext, TrainHooks


class LayerStatsHooks(TrainHooks):
    """layer_stats.jsonl and TensorBoard's layers/* on every diagnostics.interval-th step.

    `figure(history)` draws variance against depth for TensorBoard's end-of-run image (pretrain/features.py hands
    in pretrain.analysis.figures.variance_vs_depth_figure: no plotting library is imported on the training path
    unless a run ends with diagnostics to draw)."""

    def __init__(self, figure: Callable | None = None):
        self.figure = figure
        self.diagnostics: LayerDiagnostics | None = None

    def on_start(self, ctx: TrainContext) -> None:
        self.diagnostics = LayerDiagnostics(ctx.cfg, ctx.built, ctx.topo, ctx.out.tb, ctx.step, self.figure)

    def before_step(self, ctx: TrainContext, step: int) -> None:
        self.diagnostics.begin_step(step)

    def after_step(self, ctx: TrainContext, step: int) -> dict:
        self.diagnostics.end_step(step)
        return {}

    def on_finish(self, ctx: TrainContext, exit_code: int) -> None:
        self.diagnostics.close()

"""How features plug into the training loop: the `TrainHooks` protocol.

The loop (pretrain/train/loop.py) knows no feature. It calls every hook of the list it is given, in order, at
five points; a feature (per-layer diagnostics, norm removal, the preemption signal, ...) is a `TrainHooks`
subclass that overrides the points it needs. pretrain/features.py says which hooks a config turns on.

Every rank calls every hook at every point, so a hook may run collectives (all ranks reach them together).
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import ExperimentConfig
from pretrain.train.distributed import Topology
from pretrain.train.engine import Built
from pretrain.train.metrics import MetricsWriter


@dataclass
class TrainContext:
    """What a hook can see of the run: set up once, `step` moved on by the loop after every optimizer step."""

    cfg: ExperimentConfig
    topo: Topology
    built: Built
    out: MetricsWriter  # metrics.jsonl, the trackers (`out.trackers`; TensorBoard's writer `out.tb`, None when off or
    # not rank 0) and log lines
    val_batches: object  # this rank's validation micro-batches (pretrain/train/evaluate.py), or None
    data_fingerprint: str
    step: int  # the last completed optimizer step (the checkpoint's step before the first one)


class TrainHooks:
    """The extension points of the loop; every default does nothing."""

    def on_start(self, ctx: TrainContext) -> None:
        """After set-up (and any resume), before the first step of this process."""

    def before_step(self, ctx: TrainContext, step: int) -> None:
        """Before optimizer step `step` (1-based) runs."""

    def after_step(self, ctx: TrainContext, step: int) -> dict:
        """After step `step`, before it is logged or saved; returns extra metrics for its logged record (numbers, or
        0-dim tensors, which the loop reads only when it logs)."""
        return {}

    def writes_at(self, step: int) -> bool:
        """Whether this hook writes a record of step `step` (and so reads values from the device then): such a step
        is not a quiet one for logging.host_syncs."""
        return False

    def evaluates_at(self, step: int) -> bool:
        """Whether `after_step(step)` runs an evaluation (e.g. downstream tasks) whose time the loop leaves out of the
        logged step_time and tokens_per_s, as it leaves out validation's."""
        return False

    def stop_requested(self, ctx: TrainContext) -> bool:
        """After step ctx.step: True makes the loop save a checkpoint and exit with EXIT_PREEMPTED. A collective
        hook answers the same on every rank."""
        return False

    def on_finish(self, ctx: TrainContext, exit_code: int) -> None:
        """After the last step of this process (ctx.step) and its checkpoint, before the writers close."""

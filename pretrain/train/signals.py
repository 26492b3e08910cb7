"""Preemption: SIGTERM / SIGUSR1 (SLURM's warning before a job is killed or requeued) as a loop hook."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from pretrain.train.hooks import TrainContext, TrainHooks


class StopOnSignal(TrainHooks):
    """Remembers SIGTERM/SIGUSR1 from the moment it is built (a signal during set-up must not kill the process),
    so the loop finishes its step, saves and exits with EXIT_PREEMPTED on every rank together."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def stop_requested(self, ctx: TrainContext) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=ctx.topo.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank's signal stops them all at the same step
        return bool(flag.item())

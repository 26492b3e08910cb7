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
        self.group = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def on_start(self, ctx: TrainContext) -> None:
        # The flag is host data: agree on it over gloo with CPU tensors, so that asking every step never waits for
        # the GPU (an NCCL all-reduce would need a device tensor and a read back: a host synchronisation a step).
        if dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")

    def stop_requested(self, ctx: TrainContext) -> bool:
        flag = torch.full((1,), 1.0 if self.received else 0.0)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)  # one rank's signal stops them all at one step
        return bool(flag.numpy()[0])  # a CPU tensor (numpy() refuses a device one): no device is waited for

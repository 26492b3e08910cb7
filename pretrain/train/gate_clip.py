"""GPAS's own gradient clip (train.gpas_gate_clip): the joint gradient norm of every block's gate g clipped apart from
the global one, as the GPAS code's `clip_gate_grad` (dandingsky/GPAS torchrun_main.py) does at 7B.

It runs inside the optimizer step, on the complete (accumulated, data-parallel-averaged) gradients, which it reads and
writes through DeepSpeed's ZeRO-aware accessors; the gates of all pipeline stages count in one norm (each g is
replicated over tensor parallelism with identical gradients, so it counts once). DeepSpeed's global clip
(train.grad_clip) follows inside the same step, where the reference clips globally first: the gates' part of the
global norm is then already clipped, a difference only when both clips are active at once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

from pretrain import compat
from pretrain.train.distributed import parallel_state
from pretrain.train.hooks import TrainContext, TrainHooks

GATE_SUFFIX = "residual.gate"  # models/parts.py GPAS.gate, the block's residual slot


class ClipGateGradients(TrainHooks):
    def __init__(self, max_norm: float):
        self.max_norm = max_norm
        self.last_norm = None  # the gates' joint gradient norm before clipping, at the last step (on the device)

    def on_start(self, ctx: TrainContext) -> None:
        self.gates = [p for n, p in ctx.built.engine.module.named_parameters() if n.endswith(GATE_SUFFIX)]
        self.pp_group = parallel_state.get_pipeline_model_parallel_group() if ctx.topo.pp > 1 else None
        compat.wrap_model_step(ctx.built.engine, self._clip)

    @torch.no_grad()
    def _clip(self) -> None:
        grads = [safe_get_full_grad(p) for p in self.gates]
        sq = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else None)
        for g in grads:
            sq += g.double().pow(2).sum()
        if self.pp_group is not None:
            dist.all_reduce(sq, group=self.pp_group)
        self.last_norm = sq.sqrt()
        # min(1, max / norm) on the device: deciding `norm > max` in Python would wait for the GPU every step
        scale = (self.max_norm / (self.last_norm + 1e-6)).clamp(max=1.0)
        for p, g in zip(self.gates, grads):
            safe_set_full_grad(p, g * scale.to(g.dtype))

    def after_step(self, ctx: TrainContext, step: int) -> dict:
        return {} if self.last_norm is None else {"gpas_gate_grad_norm": self.last_norm}

"""nGPT's weights on the unit sphere (models/norms.py `NGPT_UNIT_WEIGHTS`): put back after every optimizer step.

The optimizer updates its own fp32 master copy where there is one (ZeRO 1-2 partitions, DeepSpeed's bf16 optimizer),
then copies it into the model: normalizing only the model's copy would let the master drift off the sphere, and
every later step would start from there. So the whole fp32 vector of each weight is gathered from its ZeRO
partitions (`safe_get_full_fp32_param`, a collective over the data-parallel group), normalized and written back
(`safe_set_full_fp32_param`), and the model's copy set from it. Tensor parallelism never splits the normalized dim
(d_model), so each rank normalizes its own shard exactly. Without a master copy (fp32 at ZeRO 0) the model's
weights are the optimizer's and are normalized in place.
"""

from __future__ import annotations

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

from models.parts import l2_normalize, unit_weight_norms
from pretrain.train.hooks import TrainContext, TrainHooks


class KeepUnitWeights(TrainHooks):
    def __init__(self, rules: dict[str, int]):
        self.rules = rules

    @torch.no_grad()
    def after_step(self, ctx: TrainContext, step: int) -> dict:
        for p, dim in unit_weight_norms(ctx.built.engine.module, self.rules).values():
            master = safe_get_full_fp32_param(p)
            if master is None:
                p.copy_(l2_normalize(p.float(), dim).to(p.dtype))
                continue
            unit = l2_normalize(master.float(), dim)
            safe_set_full_fp32_param(p, unit)
            p.copy_(unit.to(p.dtype))
        return {}

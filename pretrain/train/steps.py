"""One optimizer step over the global batch, for either kind of loader (pretrain/data/batches.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pretrain.train.distributed import Topology
from pretrain.train.engine import Built


def train_step(built: Built, train_iter, topo: Topology) -> float:
    """One optimizer step; returns its loss (the same value on every rank): the mean of the micro-batch means, or,
    for a `token_weighted` loader, the token-weighted mean over the whole global batch."""
    batches = [next(train_iter) for _ in range(built.gas)]
    if train_iter.token_weighted:
        return _token_weighted_step(built, batches, topo)
    engine = built.engine
    if built.pipelined:
        return float(engine.train_batch(data_iter=iter([b.pipeline() for b in batches])))
    total = torch.zeros((), device=topo.device)
    for b in batches:
        loss = engine(b.tokens.to(topo.device), b.labels.to(topo.device), **b.model_kwargs(topo.device))
        engine.backward(loss)
        engine.step()
        total += loss.detach().float()
    return _mean_over_data_parallel(total / built.gas)


def _token_weighted_step(built: Built, batches: list, topo: Topology) -> float:
    """One step whose loss is (sum of the trained-token losses of the global batch) / N, N = trained tokens of the
    whole global batch (all micro-batches, all data-parallel ranks), counted before the step. DeepSpeed scales each
    micro-batch loss by 1/gas and averages gradients over the dp ranks, so each micro-batch hands it its loss sum
    times gas * dp / N. Returns that token-weighted mean loss (the same on every rank)."""
    engine = built.engine
    group = parallel_state.get_data_parallel_group()
    count = torch.tensor([float(sum(b.trained_tokens() for b in batches))], dtype=torch.float64, device=topo.device)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(count, group=group)
    n = max(float(count), 1.0)
    scale = built.gas * topo.dp / n
    if built.pipelined:  # pipeline_loss returns sum * scale; train_batch averages over micro-batches and dp: sum / n
        return float(engine.train_batch(data_iter=iter([b.pipeline(scale) for b in batches])))
    total = torch.zeros(1, dtype=torch.float64, device=topo.device)
    for b in batches:
        loss_sum = engine(b.tokens.to(topo.device), b.labels.to(topo.device), reduction="sum",
                          **b.model_kwargs(topo.device))
        engine.backward(loss_sum * scale)
        engine.step()
        total += loss_sum.detach().double()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    return float(total) / n


def _mean_over_data_parallel(x: torch.Tensor) -> float:
    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(x, group=group)
        x = x / dist.get_world_size(group)
    return float(x)

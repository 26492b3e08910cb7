"""One optimizer step over the global batch, for either kind of loader (pretrain/data/batches.py).

A step reads nothing from the device: its loss comes back as a tensor, which the loop reads when it logs
(pretrain/train/health.py), and the batches go to the device from pinned memory without waiting for it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.train.distributed import Topology, parallel_state
from pretrain.train.engine import Built


def train_step(built: Built, train_iter, topo: Topology) -> torch.Tensor:
    """One optimizer step; returns its loss as a 0-dim fp32 tensor on the device (the same value on every rank):
    the mean of the micro-batch means, or, for a `token_weighted` loader, the token-weighted mean over the whole
    global batch."""
    batches = [next(train_iter) for _ in range(built.gas)]
    if train_iter.token_weighted:
        return _token_weighted_step(built, batches, topo)
    engine = built.engine
    if built.pipelined:
        return engine.train_batch(data_iter=iter([to_device(b.pipeline(), topo.device) for b in batches])).float()
    total = torch.zeros((), device=topo.device)
    for b in batches:
        loss = engine(to_device(b.tokens, topo.device), to_device(b.labels, topo.device),
                      **to_device(b.model_kwargs(), topo.device))
        engine.backward(loss)
        engine.step()
        total += loss.detach().float()
    return _mean_over_data_parallel(total / built.gas)


def _token_weighted_step(built: Built, batches: list, topo: Topology) -> torch.Tensor:
    """One step whose loss is (sum of the trained-token losses of the global batch) / N, N = trained tokens of the
    whole global batch (all micro-batches, all data-parallel ranks), counted before the step. DeepSpeed scales each
    micro-batch loss by 1/gas and averages gradients over the dp ranks, so each micro-batch hands it its loss sum
    times gas * dp / N. Returns that token-weighted mean loss (the same on every rank). N stays on the device."""
    engine = built.engine
    group = parallel_state.get_data_parallel_group()
    # torch.full launches a fill with the host's count; torch.tensor(..., device) would copy and wait for the device
    count = torch.full((1,), float(sum(b.trained_tokens() for b in batches)), dtype=torch.float64, device=topo.device)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(count, group=group)
    n = count.clamp(min=1.0)
    scale = (built.gas * topo.dp / n).float()
    if built.pipelined:  # pipeline_loss returns sum * scale; train_batch averages over micro-batches and dp: sum / n
        batches = [to_device(b.pipeline(scale[0]), topo.device) for b in batches]
        return engine.train_batch(data_iter=iter(batches)).float()
    total = torch.zeros(1, dtype=torch.float64, device=topo.device)
    for b in batches:
        loss_sum = engine(to_device(b.tokens, topo.device), to_device(b.labels, topo.device), reduction="sum",
                          **to_device(b.model_kwargs(), topo.device))
        engine.backward(loss_sum * scale[0])
        engine.step()
        total += loss_sum.detach().double()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    return (total / n).float()[0]


def _mean_over_data_parallel(x: torch.Tensor) -> torch.Tensor:
    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(x, group=group)
        x = x / dist.get_world_size(group)
    return x


def to_device(batch, device: torch.device):
    """A micro-batch's tensors (a tensor, or tuples / dicts of them) on `device`. On a GPU they go from pinned host
    memory with non_blocking=True: a plain copy from pageable memory waits for the device's queue to drain."""
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda" and batch.device.type == "cpu":
            return batch.pin_memory().to(device, non_blocking=True)
        return batch.to(device)
    if isinstance(batch, tuple):
        return tuple(to_device(x, device) for x in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch

"""Validation: one fixed set of samples for every layout, and its mean next-token loss.

The set is the val split's first min(eval.tokens // data.seq_len, samples in the split) samples in fixed
unshuffled order (for a blend, the first positions of the unshuffled blended order), dealt out over the
data-parallel ranks by `pretrain.data.loader.validation_batches`. The loss is the sum of the per-token losses
over all label tokens of the set divided by their number, so it depends neither on train.micro_batch_size
nor on the data-parallel size or the TP/PP layout (tests/pretrain/train/test_evaluate.py compares layouts to 1e-5).

Plain engines forward this rank's micro-batches (the last one may be smaller, a rank may have none) with
`reduction="sum"` and all-reduce (loss sum, token count) over the data-parallel group in float64. The
pipeline engine's `eval_batch` needs equal micro-batch shapes and counts on every rank and returns the mean of
the per-micro-batch losses averaged over data-parallel ranks: its micro-batches are padded with samples whose
labels are all ignored, and each is handed over as `batch.pipeline(scale=1.0)`, for which `pipeline_loss` returns
the micro-batch's loss sum, so `eval_batch(...) * micro-batches * dp` is the loss sum.

Batches follow the protocol of pretrain/data/batches.py: SFT folders give packed or padded rows whose prompt and
padding labels are ignored (the same sum over trained tokens / their count), with the packing inputs passed to
the model (through the pipeline as its input tuple).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pretrain import compat
from pretrain.data.loader import Dataset, ValidationBatches, validation_batches
from pretrain.train.distributed import Topology
from pretrain.train.engine import Built


def build_validation(dataset: Dataset, tokens: int, micro_batch_size: int, topo: Topology, pipelined: bool,
                     what: str = "eval.tokens") -> ValidationBatches:
    """This rank's micro-batches of the validation set of token budget `tokens` (padded for a pipelined engine).

    `what` names the budget's setting in the error for a budget below one sample (e.g. "--tokens")."""
    return validation_batches(dataset, tokens, micro_batch_size, topo.dp_rank, topo.dp, pad=pipelined, what=what)


@torch.no_grad()
def evaluate(built: Built, val, topo: Topology) -> float:
    """Mean next-token loss over all label tokens of the validation set `val` (this rank's share, from
    `build_validation`); the same value on every rank. Leaves the engine in training mode.

    Under train.compile the blocks run eagerly here: grad mode is part of dynamo's guards, so under no_grad a
    compiled block would compile a second (inference) graph at the first evaluation, in the middle of the run (and
    a smaller last micro-batch a third, dynamic=False); evaluation is a small share of a run's forwards, and the
    training graphs are used again, not recompiled, after it (tests/pretrain/train/test_compile_cpu.py counts)."""
    engine = built.engine
    engine.eval()
    try:
        with compat.eager_modules(built.model):
            return _loss(built, val, topo)
    finally:
        engine.train()


def _loss(built: Built, val, topo: Topology) -> float:
    engine = built.engine
    if built.pipelined:
        # Mean over micro-batches and data-parallel ranks of per-micro-batch sums (float32, as DeepSpeed
        # broadcasts it), the same on every stage; every rank has len(val) equal micro-batches.
        mean = engine.eval_batch(data_iter=(b.pipeline(scale=1.0) for b in val), num_micro_batches=len(val))
        count = torch.tensor([sum(b.trained_tokens() for b in val)], dtype=torch.float64, device=topo.device)
        _all_reduce_data_parallel(count)
        loss_sum, count = float(mean) * len(val) * topo.dp, float(count)
    else:
        totals = torch.zeros(2, dtype=torch.float64, device=topo.device)  # (loss sum, label tokens)
        for b in val:
            totals[0] += engine(b.tokens.to(topo.device), b.labels.to(topo.device), reduction="sum",
                                **b.model_kwargs(topo.device)).double()
            totals[1] += b.trained_tokens()
        _all_reduce_data_parallel(totals)
        loss_sum, count = totals.tolist()
    return loss_sum / count if count else float("nan")


def _all_reduce_data_parallel(x: torch.Tensor) -> None:
    if dist.is_initialized():
        group = parallel_state.get_data_parallel_group()
        if dist.get_world_size(group) > 1:
            dist.all_reduce(x, group=group)

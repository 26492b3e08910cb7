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

Bits per byte: the loss sum / (ln 2 * the UTF-8 bytes of the text the counted targets cover), the bytes counted on
the host from each micro-batch's tokens and labels by the data's tokenizer (pretrain/data/text_bytes.py; SFT: the
trained response tokens only), beside the token count and all-reduced with it, so the evaluation reads nothing more
from the device than the loss; None when the data has no tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain import compat
from pretrain.data.loader import Dataset, ValidationBatches, validation_batches
from pretrain.data.text_bytes import bits_per_byte
from pretrain.train.distributed import Topology, parallel_state
from pretrain.train.engine import Built


def build_validation(dataset: Dataset, tokens: int, micro_batch_size: int, topo: Topology, pipelined: bool,
                     what: str = "eval.tokens") -> ValidationBatches:
    """This rank's micro-batches of the validation set of token budget `tokens` (padded for a pipelined engine).

    `what` names the budget's setting in the error for a budget below one sample (e.g. "--tokens")."""
    return validation_batches(dataset, tokens, micro_batch_size, topo.dp_rank, topo.dp, pad=pipelined, what=what)


@dataclass
class Validation:
    """One evaluation of the validation set: the mean token loss and the counts behind it."""

    loss: float  # mean next-token loss (nats) over the counted targets
    tokens: int  # counted targets (label tokens)
    bytes: int | None = None  # UTF-8 bytes of the text they cover; None without the data's tokenizer

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50))

    @property
    def bpb(self) -> float | None:
        return bits_per_byte(self.loss * self.tokens, self.bytes)

    def record(self, step: int) -> dict:
        """The metrics.jsonl entry (and TensorBoard's val/ scalars)."""
        return {"step": step, "val_loss": self.loss, "val_ppl": self.ppl, "val_bpb": self.bpb}

    def line(self, step: int) -> str:
        bpb = "-" if self.bpb is None else f"{self.bpb:.4f}"
        return f"step {step:>6} | val_loss {self.loss:.4f} | val_ppl {self.ppl:.2f} | val_bpb {bpb}"


@torch.no_grad()
def evaluate(built: Built, val, topo: Topology) -> Validation:
    """Mean next-token loss, and the bytes for bits per byte, over all label tokens of the validation set `val`
    (this rank's share, from `build_validation`); the same on every rank. Leaves the engine in training mode.

    Under train.compile the blocks run eagerly here: grad mode is part of dynamo's guards, so under no_grad a
    compiled block would compile a second (inference) graph at the first evaluation, in the middle of the run (and
    a smaller last micro-batch a third, dynamic=False); evaluation is a small share of a run's forwards, and the
    training graphs are used again, not recompiled, after it (tests/pretrain/train/test_compile_cpu.py counts)."""
    engine = built.engine
    engine.eval()
    try:
        with compat.eager_modules(built.model):
            return _validation(built, val, topo)
    finally:
        engine.train()


def _validation(built: Built, val, topo: Topology) -> Validation:
    engine = built.engine
    table = getattr(val, "token_bytes", None)
    if built.pipelined:
        # Mean over micro-batches and data-parallel ranks of per-micro-batch sums (float32, as DeepSpeed
        # broadcasts it), the same on every stage; every rank has len(val) equal micro-batches.
        mean = engine.eval_batch(data_iter=(b.pipeline(scale=1.0) for b in val), num_micro_batches=len(val))
        counts = torch.tensor([[b.trained_tokens(), _bytes(table, b)] for b in val] or [[0, 0]],
                              dtype=torch.float64, device=topo.device).sum(0)  # (label tokens, bytes)
        _all_reduce_data_parallel(counts)
        count, nbytes = counts.tolist()
        loss_sum = float(mean) * len(val) * topo.dp
    else:
        totals = torch.zeros(3, dtype=torch.float64, device=topo.device)  # (loss sum, label tokens, bytes)
        for b in val:
            totals[0] += engine(b.tokens.to(topo.device), b.labels.to(topo.device), reduction="sum",
                                **b.model_kwargs(topo.device)).double()
            totals[1] += b.trained_tokens()
            totals[2] += _bytes(table, b)
        _all_reduce_data_parallel(totals)
        loss_sum, count, nbytes = totals.tolist()
    return Validation(loss_sum / count if count else float("nan"), int(count),
                      int(nbytes) if table is not None else None)


def _bytes(table, batch) -> int:
    """Bytes of the text the batch's counted targets cover (host arrays: no device read), 0 without a table."""
    return 0 if table is None else table.count(batch.tokens, batch.labels)


def _all_reduce_data_parallel(x: torch.Tensor) -> None:
    if dist.is_initialized():
        group = parallel_state.get_data_parallel_group()
        if dist.get_world_size(group) > 1:
            dist.all_reduce(x, group=group)

"""The micro-batch protocol between the loaders and the training loop.

Every loader yields micro-batches with `tokens` and `labels` [B, T] (labels IGNORE_INDEX where no loss is taken)
and three methods; the loop and validation use only these, never the batch's type:

    model_kwargs(device)   keyword arguments of `Llama.forward` besides tokens and labels (packing inputs)
    trained_tokens()       labels that count in the loss
    pipeline(scale)        the (inputs, labels) pair DeepSpeed's pipeline engine takes (inputs end with the labels,
                           which the last stage's loss reads); with `scale`, labels are (labels, scale) and
                           `models.pipeline.pipeline_loss` returns the loss sum times scale

A loader's `token_weighted` says how a step averages: False (pretraining: every micro-batch has the same number of
labels, the mean of micro-batch means) or True (SFT: the sum over trained tokens / their number in the global
batch, pretrain/data/sft_loader.py).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from models.parallel import IGNORE_INDEX  # label of padding positions: no loss, not counted


class LMBatch(NamedTuple):
    """A pretraining micro-batch: next-token inputs and labels [B, T]."""

    tokens: torch.Tensor
    labels: torch.Tensor

    def model_kwargs(self, device=None) -> dict:
        return {}

    def trained_tokens(self) -> int:
        return trained_tokens(self.labels)

    def pipeline(self, scale: float | torch.Tensor | None = None) -> tuple:
        return (self.tokens, self.labels), pipeline_labels(self.labels, scale)


def trained_tokens(labels: torch.Tensor) -> int:
    """The labels that count in the loss, counted on the host: a loader's labels are host memory (numpy refuses a
    device tensor), so counting them never waits for a device."""
    return int(np.count_nonzero(labels.numpy() != IGNORE_INDEX))


def pipeline_labels(labels: torch.Tensor, scale: float | torch.Tensor | None):
    """The labels DeepSpeed's pipeline engine hands `models.pipeline.pipeline_loss`: the tensor, or (labels, scale)."""
    if scale is None:
        return labels
    return labels, scale if isinstance(scale, torch.Tensor) else torch.tensor(scale, dtype=torch.float32)

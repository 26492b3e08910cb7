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

import torch

from models.parallel import IGNORE_INDEX  # label of padding positions: no loss, not counted


class LMBatch(NamedTuple):
    """A pretraining micro-batch: next-token inputs and labels [B, T]."""

    tokens: torch.Tensor
    labels: torch.Tensor

    def model_kwargs(self, device=None) -> dict:
        return {}

    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def pipeline(self, scale: float | None = None) -> tuple:
        labels = self.labels if scale is None else (self.labels, torch.tensor(scale, dtype=torch.float32))
        return (self.tokens, self.labels), labels

"""`pretrain` whose data holds adversarial global batches, for the stability tests (tests/pretrain/train/
test_spikes.py). Global batches are counted from 0 by their data position (position // $GBS):

    SPIKE_BATCHES=5,9    the loss of these batches is multiplied by 1000 (a loss and gradient-norm spike): the output of
                         `Llama.forward`, or under pipeline parallelism (whose stages never call it) the loss the
                         last stage hands DeepSpeed (`pipeline_loss`)
    INF_BATCHES=1        module $INF_MODULE's forward output turns inf on these batches (a non-finite step)
    SHIFT_FROM=5         the loaders read every position from batch 5 on one global batch later: a run that never
                         sees batch 5 (the reference of a run that skipped it)

The flags follow the data, not the step: a re-run of a step, or the next step after a skip, sees what its data is.
"""

import os
import sys

import numpy as np
import torch

import pretrain.train.engine as engine
from models.llama import Llama
from pretrain.cli import main
from pretrain.data.loader import DataLoader

GBS = int(os.environ.get("GBS", "8"))


def _batches(name: str) -> set[int]:
    return {int(x) for x in os.environ.get(name, "").split(",") if x}


SPIKE, INF, SHIFT = _batches("SPIKE_BATCHES"), _batches("INF_BATCHES"), os.environ.get("SHIFT_FROM")
reading = {"batch": None}  # the global batch of the last micro-batch read

_positions, _next, _forward = DataLoader.positions, DataLoader.__next__, Llama.forward
_pipeline_loss = engine.pipeline_loss


def positions(self):
    pos = _positions(self)
    return np.where(pos >= int(SHIFT) * GBS, pos + GBS, pos) if SHIFT else pos


def next_batch(self):
    reading["batch"] = int(self.positions()[0]) // GBS
    return _next(self)


def forward(self, *args, **kwargs):
    if INF and not getattr(self, "_inf_hook", False):
        self.get_submodule(os.environ["INF_MODULE"]).register_forward_hook(
            lambda m, i, out: out * float("inf") if reading["batch"] in INF else None)
        self._inf_hook = True
    out = _forward(self, *args, **kwargs)
    return out * 1000.0 if reading["batch"] in SPIKE and torch.is_grad_enabled() else out


def pipeline_loss(loss_sum, labels):
    out = _pipeline_loss(loss_sum, labels)
    return out * 1000.0 if reading["batch"] in SPIKE and torch.is_grad_enabled() else out


DataLoader.positions, DataLoader.__next__, Llama.forward = positions, next_batch, forward
engine.pipeline_loss = pipeline_loss  # what build_engine hands PipelineModule as its loss_fn
sys.exit(main())

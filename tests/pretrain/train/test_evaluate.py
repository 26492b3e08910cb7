"""Validation: one fixed sample set (eval.tokens) for every micro-batch, data-parallel and TP/PP layout."""

from __future__ import annotations

import glob
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.train import metrics, run_train

from models.parallel import TensorParallel, cross_entropy
from pretrain.data.loader import IGNORE_INDEX, BlendedDataset, TokenDataset, validation_batches
from pretrain.data.prepare import save_arrays
from pretrain.errors import UserError

SEQ = 8


def ramp_val(tmp_path, name: str, val_samples: int, offset: int = 0) -> TokenDataset:
    """A val split whose token t is offset + t, so each sample names itself by its first token."""
    n = val_samples * SEQ + 1
    path = save_arrays(str(tmp_path / name), {"train": np.arange(n), "val": offset + np.arange(n)}, vocab_size=60000)
    return TokenDataset(path, SEQ, split="val")


def global_set(dataset, tokens: int, micro: int, dp: int, pad: bool) -> list[list[int]]:
    """The real samples (as token rows) every rank evaluates, in rank then batch order; checks the padding."""
    ranks = [validation_batches(dataset, tokens, micro, r, dp, pad=pad) for r in range(dp)]
    if pad:  # pipeline engines: equal micro-batch counts and shapes on every rank
        assert len({len(v) for v in ranks}) == 1 and all(x.shape == (micro, SEQ) for v in ranks for x, _ in v)
    rows = []
    for v in ranks:
        for x, y in v:
            real = (y != IGNORE_INDEX).all(dim=1)
            assert bool((real | (y == IGNORE_INDEX).all(dim=1)).all()), "padding must be fully ignored"
            assert bool(torch.equal(x[real, 1:], y[real, :-1]))
            rows += x[real].tolist()
    return rows


def test_same_sample_set_for_every_micro_batch_and_dp_size(tmp_path):
    val = ramp_val(tmp_path, "a", val_samples=23)
    blend = BlendedDataset([val, ramp_val(tmp_path, "b", val_samples=9, offset=30000)], [2.0, 1.0])
    for dataset, tokens, n in ((val, 13 * SEQ + 5, 13), (blend, 17 * SEQ, 17)):
        first_n = dataset.samples(np.arange(n), (0,), shuffle=False)[:, :-1].tolist()
        for micro, dp in ((1, 1), (4, 1), (8, 1), (4, 2), (3, 4), (16, 2)):
            for pad in (False, True):
                rows = global_set(dataset, tokens, micro, dp, pad)
                assert sorted(rows) == sorted(first_n), (micro, dp, pad)  # each of the first n exactly once


def test_token_budget_is_clipped_to_the_split(tmp_path):
    val = ramp_val(tmp_path, "a", val_samples=23)
    assert validation_batches(val, 10**9, 4).num_samples == 23 == len(val)
    assert validation_batches(val, 5 * SEQ - 1, 4).num_samples == 4
    assert validation_batches(val, 5 * SEQ, 4).num_tokens == 5 * SEQ
    with pytest.raises(UserError, match=r"eval.tokens=7 is less than one validation sample of seq_len 8 tokens; "
                                        r"set it to at least 8"):
        validation_batches(val, SEQ - 1, 4)


def test_cross_entropy_sum_and_all_ignored(monkeypatch):
    import megatron.core.tensor_parallel as mtp

    # The vocab-parallel kernel needs a TP group; on one rank it is plain per-token cross-entropy, which
    # leaves the masking and reduction of models.parallel.cross_entropy's TP branch to check here.
    per_token = lambda logits, labels: F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # noqa: E731
    monkeypatch.setattr(mtp, "vocab_parallel_cross_entropy", per_token)
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :3] = IGNORE_INDEX
    ignored = torch.full_like(labels, IGNORE_INDEX)
    for tp in (None, TensorParallel(group=None, size=1, rank=0)):
        mean, total = cross_entropy(logits, labels, tp), cross_entropy(logits, labels, tp, reduction="sum")
        assert float(total) == pytest.approx(float(mean) * 12, rel=1e-6)
        assert float(cross_entropy(logits, ignored, tp, reduction="sum")) == 0.0


# End to end: the val_loss of a real `pretrain train` per layout. eval.tokens=3750 at seq_len 64 is 58 samples:
# not a multiple of micro_batch_size * dp (4, 8), so micro-batches are partial, dp rank 1 has one micro-batch
# fewer than rank 0, and the pipeline pads its last micro-batch. Evaluated after 2 steps at the preset's lr:
# the layouts' weights then differ by their training round-off (val losses measured within 3e-8 of each
# other), far below the 1e-5 tolerance, while a wrong reduction moves it well past it (a mean of the
# micro-batch means: 2.4e-4 relative; counting the padding: 3%).
EVAL = ["train.steps=2", "eval.interval=2", "eval.tokens=3750"]
LAYOUTS = {
    "single": ([], None),
    "micro8": (["train.micro_batch_size=8"], None),  # global batch 8: no accumulation
    "dp2": (["parallel.zero_stage=1"], 2),
    "pp2": (["parallel.pp=2"], 2),
    "tp2": (["parallel.tp=2"], 2),
}


@pytest.mark.processes
def test_val_loss_is_the_same_on_every_layout(tmp_path, data_cache):
    got, bpb = {}, {}
    for name, (overrides, nproc) in LAYOUTS.items():  # one after the other: each run keeps the 2 cores busy
        run_train(str(tmp_path / name), *EVAL, *overrides, nproc=nproc, cache_dir=data_cache)
        got[name] = [m["val_loss"] for m in metrics(str(tmp_path / name)) if "val_loss" in m]
        bpb[name] = [m["val_bpb"] for m in metrics(str(tmp_path / name)) if "val_loss" in m]
    ref = got["single"]
    assert len(ref) == 1
    for name, val in got.items():
        assert val == pytest.approx(ref, rel=1e-5), f"{name}: val_loss {val} vs single-process {ref}"
        # the bytes are reduced as the token count is: bits per byte agrees as the loss does
        assert bpb[name] == pytest.approx(bpb["single"], rel=1e-5), f"{name}: val_bpb {bpb[name]} vs {bpb['single']}"

    # The definition: the mean token loss of the val split's first 58 samples, from the saved weights.
    from models import Llama
    from pretrain.state.checkpoint import load_model_state
    from pretrain.data.resolve import open_dataset

    cfg, state = load_model_state(glob.glob(os.path.join(str(tmp_path / "single"), "checkpoints", "step_*"))[0])
    model = Llama(cfg.model)
    model.load_state_dict(state)
    dataset = open_dataset(cfg.data.paths, cfg.data.seq_len, "val", cache_dir=data_cache)
    batch = torch.from_numpy(dataset.samples(np.arange(58), (0,), shuffle=False))
    with torch.no_grad():
        expected = float(model(batch[:, :-1], batch[:, 1:]))
    assert ref[0] == pytest.approx(expected, rel=1e-5)
    nbytes = validation_batches(dataset, 3750, 64).token_bytes.count(batch[:, :-1], batch[:, 1:])
    assert bpb["single"][0] == pytest.approx(expected * 58 * 64 / (math.log(2) * nbytes), rel=1e-5)

"""Loader: sample packing, deterministic shuffling, exact resume, data-parallel resharding, blending, checks."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data import bundled_dir

from pretrain.data.loader import (
    BlendedDataset, DataLoader, TokenDataset, check_vocab, validation_batches,
)
from pretrain.data.folders import read_meta
from pretrain.data.prepare import save_arrays
from pretrain.data.resolve import open_dataset
from pretrain.errors import UserError

SEQ = 8


def ramp(tmp_path, name="d", n_samples=50, offset=0, val_samples=5, vocab=60000):
    """A prepared folder whose token t is offset + t, so every sample names itself by its first token."""
    n = n_samples * SEQ + 1
    if (tmp_path / name).exists():  # asked again for the same folder: reuse it
        return str(tmp_path / name)
    return save_arrays(
        str(tmp_path / name),
        {"train": offset + np.arange(n), "val": offset + np.arange(val_samples * SEQ + 1)},
        vocab_size=vocab,
    )


def sample_ids(tokens: torch.Tensor, offset: int = 0) -> list[int]:
    return ((tokens[:, 0] - offset) // SEQ).tolist()


def run(loader, steps):
    return [next(loader) for _ in range(steps)]


def test_samples_are_packed_windows_with_shifted_labels(tmp_path):
    ds = TokenDataset(ramp(tmp_path, n_samples=50), SEQ)
    assert len(ds) == ds.num_samples() == 50 and ds.num_samples(16) == 25 and ds.num_samples(400) == 1
    assert ds[3].tolist() == list(range(24, 33))
    x, y = next(DataLoader(ds, micro_batch_size=4, seed=0, shuffle=False))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, SEQ)
    assert x[1].tolist() == list(range(8, 16)) and y[1].tolist() == list(range(9, 17))
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_shuffle_is_deterministic_and_covers_each_epoch(tmp_path):
    ds = TokenDataset(ramp(tmp_path, n_samples=48), SEQ)
    a = [i for x, _ in run(DataLoader(ds, 4, seed=7), 24) for i in sample_ids(x)]
    b = [i for x, _ in run(DataLoader(ds, 4, seed=7), 24) for i in sample_ids(x)]
    c = [i for x, _ in run(DataLoader(ds, 4, seed=8), 24) for i in sample_ids(x)]
    assert a == b and a != c
    epoch0, epoch1 = a[:48], a[48:]
    assert sorted(epoch0) == sorted(epoch1) == list(range(48))  # every sample once per epoch
    assert epoch0 != epoch1 and epoch0 != list(range(48))  # reshuffled per epoch, actually shuffled


@pytest.mark.parametrize("stop", [3, 12, 13])  # mid-epoch, at the epoch boundary (48 = 12 * 4), just after
def test_exact_resume(tmp_path, stop):
    ds = TokenDataset(ramp(tmp_path, n_samples=48), SEQ)
    full = run(DataLoader(ds, 4, seed=3), 20)
    first = DataLoader(ds, 4, seed=3)
    run(first, stop)
    state = first.state_dict()
    assert state["consumed_samples"] == 4 * stop
    resumed = DataLoader(TokenDataset(ramp(tmp_path, n_samples=48), SEQ), 4, seed=3)
    resumed.load_state_dict(state)
    for (x, y), (fx, fy) in zip(run(resumed, 20 - stop), full[stop:]):
        assert torch.equal(x, fx) and torch.equal(y, fy)


def global_steps(ds, dp, mbs, global_batch, steps, seed=5, consumed=0):
    """Per global step: the rank slices of every micro-step, as sample ids, from `dp` lock-stepped loaders."""
    loaders = [DataLoader(ds, mbs, dp_rank=r, dp_size=dp, seed=seed, consumed_samples=consumed) for r in range(dp)]
    accum = global_batch // (mbs * dp)
    out = []
    for _ in range(steps):
        micro = []
        for _ in range(accum):
            micro.append([sample_ids(next(loader)[0]) for loader in loaders])
        out.append(micro)
    return out, loaders


def test_dp_size_change_keeps_global_order(tmp_path):
    ds = TokenDataset(ramp(tmp_path, n_samples=60), SEQ)
    gb = 8
    runs = {dp: global_steps(ds, dp, 2, gb, 10)[0] for dp in (1, 2, 4)}
    flat = {dp: [i for step in r for micro in step for rank in micro for i in rank] for dp, r in runs.items()}
    # Concatenating the rank slices micro-step by micro-step gives the dp=1 order exactly...
    assert flat[1] == flat[2] == flat[4]
    # ...so every global step sees the same set of samples whatever dp is.
    for step in range(10):
        sets = {dp: sorted(i for micro in runs[dp][step] for rank in micro for i in rank) for dp in runs}
        assert sets[1] == sets[2] == sets[4] and len(sets[1]) == gb
    # And ranks never share a sample within a global step.
    assert all(len(set(i for m in step for i in m[r])) == 4 for step in runs[2] for r in range(2))


def test_resume_with_other_dp_size(tmp_path):
    ds = TokenDataset(ramp(tmp_path, n_samples=60), SEQ)
    reference, _ = global_steps(ds, 1, 2, 8, 12)
    _, loaders = global_steps(ds, 1, 2, 8, 5)
    state = loaders[0].state_dict()
    assert state["consumed_samples"] == 40
    resumed = [DataLoader(ds, 2, dp_rank=r, dp_size=2, seed=5) for r in range(2)]
    for loader in resumed:
        loader.load_state_dict(state)
    seen = [sorted(i for _ in range(2) for loader in resumed for i in sample_ids(next(loader)[0])) for _ in range(7)]
    expected = [sorted(i for micro in step for rank in micro for i in rank) for step in reference[5:]]
    assert seen == expected
    assert resumed[0].state_dict()["consumed_samples"] == resumed[1].state_dict()["consumed_samples"] == 96


def test_state_mismatch_is_refused(tmp_path):
    ds = TokenDataset(ramp(tmp_path), SEQ)
    state = DataLoader(ds, 2, seed=1).state_dict()
    with pytest.raises(UserError, match="seed 1 but this run uses 2"):
        DataLoader(ds, 2, seed=2).load_state_dict(state)
    with pytest.raises(UserError, match="trained on other data"):
        DataLoader(TokenDataset(ramp(tmp_path), 4), 2, seed=1).load_state_dict(state)
    loose = DataLoader(TokenDataset(ramp(tmp_path), 4), 2, seed=1)
    loose.load_state_dict({**state, "consumed_samples": 6}, strict=False)
    assert loose.consumed_samples == 6


def blend3(tmp_path, weights=(0.6, 0.3, 0.1)):
    sizes = (40, 25, 7)
    parts = [TokenDataset(ramp(tmp_path, f"b{k}", n_samples=n, offset=10000 * k), SEQ) for k, n in enumerate(sizes)]
    return BlendedDataset(parts, list(weights)), sizes


def test_blend_fractions_follow_weights_in_every_prefix(tmp_path):
    blend, sizes = blend3(tmp_path)
    ds_id, local = blend.locate(0, 2000)
    counts = np.cumsum(np.eye(3, dtype=int)[ds_id], axis=0)
    targets = np.arange(1, 2001)[:, None] * np.array([0.6, 0.3, 0.1])
    assert np.abs(counts - targets).max() <= 1.0  # within one sample of the weights after any n samples
    for d in range(3):  # each dataset's own positions run 0, 1, 2, ... in order
        assert local[ds_id == d].tolist() == list(range(int((ds_id == d).sum())))
    # Random access (e.g. after a resume far into training) agrees with walking from the start.
    for start in (0, 1, 17, 999, 1990):
        d, j = blend.locate(start, 10)
        assert d.tolist() == ds_id[start:start + 10].tolist() and j.tolist() == local[start:start + 10].tolist()
    d, j = blend.locate(10**12, 5)
    assert len(d) == len(j) == 5 and j.min() > 10**10
    assert np.abs(np.bincount(blend.locate(10**12 - 1000, 1000)[0], minlength=3) - [600, 300, 100]).max() <= 1


def test_blended_loader_deterministic_resumable_and_exhausts_each_member(tmp_path):
    blend, sizes = blend3(tmp_path)
    full = run(DataLoader(blend, 5, seed=11), 40)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, run(DataLoader(blend, 5, seed=11), 40)))
    first = DataLoader(blend, 5, seed=11)
    run(first, 17)
    resumed = DataLoader(blend3(tmp_path)[0], 5, seed=11)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(run(resumed, 23), full[17:]))
    firsts = torch.cat([x[:, 0] for x, _ in full])
    member = (firsts // 10000).numpy()
    assert np.abs(np.bincount(member, minlength=3) / len(member) - [0.6, 0.3, 0.1]).max() < 0.01
    for k, n in enumerate(sizes):  # each member walks a full permutation of its samples before repeating
        ids = ((firsts[member == k] - 10000 * k) // SEQ).tolist()
        assert sorted(ids[:n]) == list(range(n))
    # Labels stay within one member: samples never straddle datasets.
    x, y = full[0]
    assert torch.equal(x[:, 0] // 10000, y[:, -1] // 10000)


def test_blend_bad_input(tmp_path):
    a = TokenDataset(ramp(tmp_path, "a"), SEQ)
    with pytest.raises(UserError, match="weights must be positive"):
        BlendedDataset([a, a], [1.0, 0.0])
    with pytest.raises(UserError, match="2 datasets but 1 weights"):
        BlendedDataset([a, a], [1.0])
    with pytest.raises(UserError, match="one seq_len"):
        BlendedDataset([a, TokenDataset(a.path, 4)])
    bundled = TokenDataset(bundled_dir(), SEQ)
    with pytest.raises(UserError, match="must share one tokenizer"):
        BlendedDataset([a, bundled])


def test_validation_batches_fixed_order_and_sharded(tmp_path):
    path = ramp(tmp_path, val_samples=11)
    val = TokenDataset(path, SEQ, split="val")
    batches = list(validation_batches(val, 10 * SEQ, micro_batch_size=2))
    assert [sample_ids(x) for x, _ in batches] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert len(validation_batches(val, 4 * SEQ + SEQ - 1, 2)) == 2  # a token budget: 4 samples
    r0 = [sample_ids(x) for x, _ in validation_batches(val, 10 * SEQ, 2, dp_rank=0, dp_size=2)]
    r1 = [sample_ids(x) for x, _ in validation_batches(val, 10 * SEQ, 2, dp_rank=1, dp_size=2)]
    assert r0 == [[0, 1], [4, 5], [8, 9]] and r1 == [[2, 3], [6, 7]]
    with pytest.raises(UserError, match="eval.tokens=7 is less than one validation sample of seq_len 8"):
        validation_batches(val, SEQ - 1, 4)


def test_check_vocab(tmp_path):
    path = ramp(tmp_path, vocab=5000)
    ds = TokenDataset(path, SEQ)
    for obj in (ds, read_meta(path), path, BlendedDataset([ds, ds])):
        check_vocab(obj, 5000)
        with pytest.raises(UserError, match=r"tokenizer's vocab \(5000.*larger than model.vocab_size=4096; set model.vocab_size >= 5000"):
            check_vocab(obj, 4096)


def test_seq_len_longer_than_data(tmp_path):
    path = ramp(tmp_path, n_samples=3, val_samples=0)
    assert len(TokenDataset(path, 24)) == 1
    with pytest.raises(UserError, match=r"data.seq_len=25 is longer than the data: .* holds 25 tokens and one sample needs seq_len \+ 1 = 26"):
        TokenDataset(path, 25)
    empty_val = save_arrays(str(tmp_path / "noval"), {"train": np.arange(100)}, vocab_size=100)
    with pytest.raises(UserError, match="val split holds no tokens; prepare it with --val-fraction > 0"):
        TokenDataset(empty_val, SEQ, split="val")


def test_bundled_default_end_to_end():
    ds = open_dataset("bundled:tinyshakespeare", 256, cache_dir=str(Path(bundled_dir()).parent))
    val = open_dataset(bundled_dir(), 256, split="val")
    check_vocab(ds, 2048)
    with pytest.raises(UserError, match="larger than model.vocab_size=1024"):
        check_vocab(ds, 1024)
    assert len(ds) > 1000 and len(val) > 50
    x, y = next(DataLoader(ds, 16, seed=0))
    assert x.shape == (16, 256) and int(x.max()) < 2048 and torch.equal(x[:, 1:], y[:, :-1])
    assert sum(1 for _ in validation_batches(val, 3 * 16 * 256, 16)) == 3

"""A run stopped at step 10 on one layout and resumed to 20 on another logs the losses of an uninterrupted run.

Each pair is a real `pretrain train` on gloo ranks: the resume reads DeepSpeed's files of layout A into full
tensors (pretrain/full_state.py) and reshards weights, Adam moments, step and schedule onto layout B.
"""

from __future__ import annotations

import json
import os

import pytest
from train_helpers import metrics, run_train, train_losses

STEPS, STOP = 20, 10
TIED = ["model.tie_embeddings=true"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache):
    """Single-process reference losses, untied and tied."""
    refs = {}
    for name, extra in (("untied", []), ("tied", TIED)):
        run = str(tmp_path_factory.mktemp(f"ref_{name}"))
        run_train(run, f"train.steps={STEPS}", *extra, cache_dir=data_cache)
        refs[name] = train_losses(run)
    return refs


# (id, layout A overrides, nproc A, layout B overrides, nproc B, tied)
PAIRS = [
    ("dp1-to-dp2-zero1", ["parallel.zero_stage=1"], None, ["parallel.zero_stage=1"], 2, False),
    ("tp2xpp2-to-tp1xpp1", ["parallel.tp=2", "parallel.pp=2"], 4, [], None, False),
    ("tp1-to-tp2xdp2-zero2", ["parallel.zero_stage=2"], None, ["parallel.tp=2", "parallel.zero_stage=2"], 4, False),
    ("pp2-to-pp1-tied", ["parallel.pp=2"], 2, [], None, True),
]


@pytest.mark.parametrize("name, layout_a, nproc_a, layout_b, nproc_b, tied", PAIRS, ids=[p[0] for p in PAIRS])
def test_resume_on_another_layout_continues_exactly(tmp_path, data_cache, uninterrupted, name, layout_a, nproc_a,
                                                    layout_b, nproc_b, tied):
    run = str(tmp_path)
    extra = TIED if tied else []
    run_train(run, f"train.steps={STEPS}", f"train.stop_at_step={STOP}", *extra, *layout_a, nproc=nproc_a,
              cache_dir=data_cache)
    proc = run_train(run, f"train.steps={STEPS}", "train.resume=auto", *extra, *layout_b, nproc=nproc_b,
                     cache_dir=data_cache)
    assert "resume: another layout" in proc.stdout
    ref, got = uninterrupted["tied" if tied else "untied"], train_losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref)
    print(f"{name}: max relative loss difference {worst:.2e}")
    assert worst < 1e-4, {s: (got[s], ref[s]) for s in ref}
    # the resumed run's data position continues where layout A stopped
    consumed = [m["consumed_tokens"] for m in metrics(run) if "loss" in m]
    assert consumed == [s * 8 * 64 for s in range(1, STEPS + 1)]
    state = json.load(open(os.path.join(run, "checkpoints", "step_00000020", "trainer_state.json")))
    assert state["layout"]["world_size"] == (nproc_b or 1) and state["consumed_samples"] == STEPS * 8

"""A run stopped at step 10 on one layout and resumed to 20 on another logs the losses of an uninterrupted run.

Each pair is a real `pretrain train` on gloo ranks: the resume reads DeepSpeed's files of layout A into full
tensors (pretrain/state/reshard.py) and reshards weights, Adam moments, step and schedule onto layout B.
"""

from __future__ import annotations

import json
import os

import pytest
from helpers.train import metrics, run_train, train_losses

pytestmark = pytest.mark.processes  # starts subprocesses, ranks or training runs (tests/conftest.py: tiers)

STEPS, STOP = 20, 10
TIED = ["model.tie_embeddings=true"]
MHC = ["model.residual=mhc"]  # the stream state [B, T, 4, D] between pipeline stages, its mixing replicated under TP
# Every stream design, each its own state between stages: mhc's 4 streams, attn_res's embedding and block sums
# [B, T, N + 1, D], siamese's two streams.
STREAMS = {"mhc": MHC, "attn_res": ["model.residual=attn_res"], "siamese": ["model.residual=siamese"]}


BF16 = ["train.precision=bf16"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache):
    """Single-process reference losses, each run when a test first needs it (`-m compat` needs two of three): fp32
    untied and tied, and bf16 (bf16 needs ZeRO or a pipeline)."""
    extras = {"untied": [], "tied": TIED, "bf16": [*BF16, "parallel.zero_stage=1"], **STREAMS}
    refs = {}

    def reference(name: str) -> dict[int, float]:
        if name not in refs:
            run = str(tmp_path_factory.mktemp(f"ref_{name}"))
            run_train(run, f"train.steps={STEPS}", *extras[name], cache_dir=data_cache)
            refs[name] = train_losses(run)
        return refs[name]

    return reference


# (id, layout A overrides, nproc A, layout B overrides, nproc B, reference, tolerance). In fp32 every layout gives
# the single-process losses within 1e-4, so a resume must too. In bf16 two layouts differ by 2e-4 to 1e-3 without
# any resume (rounding of differently ordered reductions; 1.03e-3 on one CPU's kernels), hence 3e-3 there; a resume
# that lost the fp32 master weights or the Adam moments is off by 1e-2 or more.
PAIRS = [
    ("dp1-to-dp2-zero1", ["parallel.zero_stage=1"], None, ["parallel.zero_stage=1"], 2, "untied", 1e-4),
    ("tp2xpp2-to-tp1xpp1", ["parallel.tp=2", "parallel.pp=2"], 4, [], None, "untied", 1e-4),
    ("tp1-to-tp2xdp2-zero2", ["parallel.zero_stage=2"], None, ["parallel.tp=2", "parallel.zero_stage=2"], 4, "untied",
     1e-4),
    ("pp2-to-pp1-tied", ["parallel.pp=2", *TIED], 2, TIED, None, "tied", 1e-4),
    ("zero1-to-zero0", ["parallel.zero_stage=1"], None, [], None, "untied", 1e-4),
    ("fp32-to-bf16-zero1", ["parallel.zero_stage=1"], None, ["parallel.zero_stage=1", *BF16], None, "untied", 3e-3),
    ("bf16-pp2-to-zero2-dp2", ["parallel.pp=2", *BF16], 2, ["parallel.zero_stage=2", *BF16], 2, "bf16", 3e-3),
    # residual streams: trained on PP = 2 (the state travels between stages), resumed on TP = 2
    *[(f"{r}-pp2-to-tp2", ["parallel.pp=2", *keys], 2, ["parallel.tp=2", *keys], 2, r, 1e-4)
      for r, keys in STREAMS.items()],
]


# The compatibility set (CI's other stacks) resumes TP x PP onto one process and a bf16 pipeline onto ZeRO-2 data
# parallelism: between them every reader and writer of full_state.py and compat.py's checkpoint formats.
COMPAT = {"tp2xpp2-to-tp1xpp1", "bf16-pp2-to-zero2-dp2"}
# A data-parallel change is also in tp1-to-tp2xdp2-zero2 and bf16-pp2-to-zero2-dp2; ZeRO-1's files are read in
# fp32-to-bf16-zero1, and a resume onto ZeRO-0's optimizer is tp2xpp2-to-tp1xpp1's.
# {mhc,attn_res,siamese}-pp2-to-tp2: three runs each of their own (~3 min under load on 2 cores); in-process,
# tests/models/test_model.py chains the stages with the stream state bit for bit and test_tensor_parallel.py runs
# every stream design at TP = 2.
SLOW = {"dp1-to-dp2-zero1", "zero1-to-zero0", *(f"{r}-pp2-to-tp2" for r in STREAMS)}
MARKS = {**{name: [pytest.mark.compat] for name in COMPAT}, **{name: [pytest.mark.slow] for name in SLOW}}


@pytest.mark.parametrize("name, layout_a, nproc_a, layout_b, nproc_b, reference, tolerance",
                         [pytest.param(*p, marks=MARKS.get(p[0], []), id=p[0]) for p in PAIRS])
def test_resume_on_another_layout_continues_exactly(tmp_path, data_cache, uninterrupted, name, layout_a, nproc_a,
                                                    layout_b, nproc_b, reference, tolerance):
    run = str(tmp_path)
    run_train(run, f"train.steps={STEPS}", f"train.stop_at_step={STOP}", *layout_a, nproc=nproc_a, cache_dir=data_cache)
    proc = run_train(run, f"train.steps={STEPS}", "train.resume=auto", *layout_b, nproc=nproc_b, cache_dir=data_cache)
    assert "resume: another layout" in proc.stdout
    ref, got = uninterrupted(reference), train_losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in range(STOP + 1, STEPS + 1))
    print(f"{name}: max relative loss difference after the resume {worst:.2e}")
    assert worst < tolerance, {s: (got[s], ref[s]) for s in ref}
    # the resumed run's data position continues where layout A stopped
    consumed = [m["consumed_tokens"] for m in metrics(run) if "loss" in m]
    assert consumed == [s * 8 * 64 for s in range(1, STEPS + 1)]
    state = json.load(open(os.path.join(run, "checkpoints", "step_00000020", "trainer_state.json")))
    assert state["layout"]["world_size"] == (nproc_b or 1) and state["consumed_samples"] == STEPS * 8

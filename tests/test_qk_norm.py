"""model.qk_norm (and OLMo 2's `reordered` scheme with it) in real training: the same losses on TP = 2 and PP = 2 as on one process, an exact resume,
per-layer diagnostics and analyze-depth (the formulas: tests/test_norm_schemes.py; TP = 2 layers:
tests/test_tensor_parallel.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from train_helpers import REPO, metrics, run_train, train_env, train_losses

STEPS = 5


@pytest.mark.parametrize("scheme, qk_norm, layout", [
    pytest.param("pre_ln", "full", ["parallel.tp=2"], id="pre_ln-full-tp2"),
    pytest.param("lns", "head", ["parallel.pp=2"], id="lns-head-pp2"),
    pytest.param("reordered", "full", ["parallel.pp=2"], id="reordered-full-pp2"),  # OLMo 2's pairing
])
def test_qk_norm_trains_alike_on_layouts_resumes_and_is_diagnosed(tmp_path, data_cache, scheme, qk_norm, layout):
    model = [f"model.norm_scheme={scheme}", f"model.qk_norm={qk_norm}", f"train.steps={STEPS}"]
    single, split, parallel = (str(tmp_path / name) for name in ("single", "split", "parallel"))
    run_train(single, *model, "diagnostics.interval=1", "checkpoint.interval=3", cache_dir=data_cache)
    run_train(parallel, *model, *layout, nproc=2, cache_dir=data_cache)
    run_train(split, *model, "train.stop_at_step=3", cache_dir=data_cache)
    run_train(split, *model, "train.resume=auto", cache_dir=data_cache)
    ref = train_losses(single)
    assert ref[STEPS] < ref[1]  # it trains
    for name, run in (("parallel", parallel), ("resumed", split)):
        got = train_losses(run)
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=1e-4), f"{name} step {step}: {got[step]} vs {ref[step]}"
    with open(os.path.join(single, "layer_stats.jsonl")) as f:
        stats = [json.loads(line) for line in f]
    assert [s["step"] for s in stats] == list(range(1, STEPS + 1)) and all(len(s["grad_norm"]) == 8 for s in stats)
    assert all(m.get("grad_norm", 1) > 0 for m in metrics(single))
    out = str(tmp_path / "depth")
    proc = subprocess.run([sys.executable, "-m", "pretrain", "analyze-depth", "--checkpoint", single, "--data",
                           "bundled:tinyshakespeare", "--out", out, "--batches", "1", "--seq-len", "64"],
                          cwd=REPO, env=train_env(data_cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "depth.json")) as f:
        depth = json.load(f)
    assert depth["norm_scheme"] == scheme and len(depth["skip_loss"]) == 8

"""The 2025-26 designs in real training (QK-norm, OLMo 2's reordered norm, HybridNorm*, gated attention, GPAS, Derf,
zero-centred gains, nGPT): the same losses on TP = 2 or PP = 2 as on one process, an exact resume, per-layer
diagnostics and analyze-depth. The formulas: tests/models/test_norm_schemes.py; every scheme and key on TP = 2 layers:
tests/models/test_tensor_parallel.py; nGPT's unit rows under TP x ZeRO-1: tests/pretrain/train/test_ngpt_unit_weights.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers.train import REPO, metrics, run_train, train_env, train_losses

pytestmark = pytest.mark.processes  # starts subprocesses, ranks or training runs (tests/conftest.py: tiers)

STEPS = 5
# The default run keeps one case per layout (TP = 2, PP = 2); nGPT's sphere on TP = 2 is in the default run of
# tests/pretrain/train/test_ngpt_unit_weights.py (tp 2 x ZeRO-1), so its case here is slow. The slow ones repeat
# those paths with other parts, which tests/models/test_norm_schemes.py and tests/models/test_tensor_parallel.py cover per formula.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("scheme, keys, layout", [
    pytest.param("pre_ln", ["model.qk_norm=full"], ["parallel.tp=2"], id="pre_ln-qk_full-tp2"),
    pytest.param("lns", ["model.qk_norm=head"], ["parallel.pp=2"], id="lns-qk_head-pp2"),
    pytest.param("reordered", ["model.qk_norm=full"], ["parallel.pp=2"], id="reordered-qk_full-pp2", marks=SLOW),  # OLMo 2
    pytest.param("hybridnorm_star", ["model.attn_gate=elementwise"], ["parallel.tp=2"], id="hybridnorm_star-gate-tp2", marks=SLOW),
    pytest.param("mix_ln", ["model.gpas=true", "model.attn_gate=headwise"], ["parallel.pp=2"], id="mix_ln-gpas-gate-pp2", marks=SLOW),
    pytest.param("derf", ["model.norm_gain=zero_centered"], ["parallel.pp=2"], id="derf-zero_centered-pp2", marks=SLOW),
    pytest.param("ngpt", ["model.n_kv_heads=4"], ["parallel.tp=2"], id="ngpt-tp2", marks=SLOW),
])
def test_designs_train_alike_on_layouts_resume_and_are_diagnosed(tmp_path, data_cache, scheme, keys, layout):
    model = [f"model.norm_scheme={scheme}", *keys, f"train.steps={STEPS}"]
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

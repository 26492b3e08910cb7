"""bf16 (fp32 master weights, gradients and Adam state) through DeepSpeed's bf16 optimizers, on CPU."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from helpers.train import REPO, metrics, train_cmd, train_env

pytestmark = [pytest.mark.processes, pytest.mark.compat]


def test_injected_inf_gradient_is_skipped_under_bf16(tmp_path, data_cache):
    # 6 steps of 2 micro-batches; the first micro-batch of step 3 (backward call 5) gets an inf loss.
    run = str(tmp_path)
    script = [os.path.join(REPO, "tests", "helpers", "scripts", "inject_inf.py")]
    cmd = train_cmd(run, "train.steps=6", "train.precision=bf16", "parallel.zero_stage=1", script=script)
    proc = subprocess.run(cmd, cwd=REPO, env={**train_env(data_cache), "INF_AT_BACKWARD": "5"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 3: non-finite loss or gradient" in proc.stdout
    train = {m["step"]: m for m in metrics(run) if "loss" in m}
    assert all(torch.isfinite(torch.tensor(train[s]["loss"])) for s in (1, 2, 4, 5, 6))
    assert train[6]["skipped_steps"] == 1 and train[6]["loss"] < train[1]["loss"]
    # the skipped step changed no weight and no Adam state: 5 Adam updates in 6 training steps; the learning-rate
    # schedule follows the step count on every layout (pretrain/train/engine.py step_skipped), so 6 scheduler steps
    folder = os.path.join(run, "checkpoints", "step_00000006")
    optim = torch.load(os.path.join(folder, "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"), weights_only=False)
    states = optim["optimizer_state_dict"]["base_optimizer_state"]["state"]
    assert {int(s["step"]) for s in states.values()} == {5}
    model = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), weights_only=False)
    assert model["lr_scheduler"]["last_epoch"] == 6
    assert all(torch.isfinite(v.float()).all() for v in model["module"].values())

"""Checkpoints: exact resume, signals, a kill during a save, keep-K, instability, and the run folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers.train import REPO, latest, metrics, run_train, train_cmd, train_env, train_losses

from pretrain.config import load_config


@pytest.mark.compat
@pytest.mark.processes
def test_resume_is_bitwise_identical(tmp_path, data_cache):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    common = ["train.steps=20", "checkpoint.interval=5", "eval.interval=10"]
    run_train(full, *common, cache_dir=data_cache)
    run_train(split, *common, "train.stop_at_step=10", cache_dir=data_cache)
    assert latest(split) == "step_00000010"
    assert max(train_losses(split)) == 10
    run_train(split, *common, "train.resume=auto", cache_dir=data_cache)
    a, b = train_losses(full), train_losses(split)
    assert sorted(b) == list(range(1, 21)), "each step logged exactly once across the two invocations"
    assert a == b  # bitwise: same floats
    val_a = [m["val_loss"] for m in metrics(full) if "val_loss" in m]
    val_b = [m["val_loss"] for m in metrics(split) if "val_loss" in m]
    assert val_a == val_b and len(val_a) == 2


@pytest.mark.processes
def test_run_folder_contents(tmp_path, data_cache):
    run = str(tmp_path)
    run_train(run, "train.steps=6", "checkpoint.interval=2", "checkpoint.keep=2", "eval.interval=3",
              "model.norm_scheme=lns", cache_dir=data_cache)
    cfg = load_config(os.path.join(run, "config.yaml"))
    assert cfg.model.norm_scheme == "lns" and cfg.train.steps == 6 and cfg.run.dir == run
    records = metrics(run)
    train = [m for m in records if "loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4, 5, 6]
    for m in train:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "consumed_tokens"} <= set(m)
        assert m["consumed_tokens"] == m["step"] * 8 * 64
    assert [m["step"] for m in records if "val_loss" in m] == [3, 6]
    # warm-up of 2 steps then cosine towards 10% of the peak
    assert train[0]["lr"] == pytest.approx(cfg.train.lr / 2) and train[1]["lr"] == pytest.approx(cfg.train.lr)
    assert train[-1]["lr"] < train[2]["lr"]
    # keep the last 2 checkpoints, `latest` on the newest
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", "step_00000004", "step_00000006"]
    assert latest(run) == "step_00000006"
    state = json.load(open(os.path.join(run, "checkpoints", "step_00000006", "trainer_state.json")))
    assert state["step"] == 6 and state["consumed_samples"] == 48
    # TensorBoard holds the same scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run, "tb"))
    acc.Reload()
    tb_loss = [e.value for e in acc.Scalars("train/loss")]
    assert tb_loss == pytest.approx([m["loss"] for m in train])
    assert [e.step for e in acc.Scalars("val/val_loss")] == [3, 6]


@pytest.mark.processes
def test_sigterm_finishes_step_saves_and_exits_75(tmp_path, data_cache):
    run = str(tmp_path)
    proc = subprocess.Popen(train_cmd(run, "train.steps=500"), cwd=REPO, env=train_env(data_cache),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    path = os.path.join(run, "metrics.jsonl")
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(path) and len(open(path).readlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    saved = int(latest(run).split("_")[1])
    assert 3 <= saved < 500
    assert max(train_losses(run)) == saved  # the step in flight was finished, logged and saved
    run_train(run, "train.steps=500", "train.resume=auto", f"train.stop_at_step={saved + 2}", cache_dir=data_cache)
    assert sorted(train_losses(run)) == list(range(1, saved + 3))


@pytest.mark.processes
def test_kill_during_save_keeps_previous_latest(tmp_path, data_cache):
    run = str(tmp_path)
    script = [os.path.join(REPO, "tests", "helpers", "scripts", "killed_during_save.py")]
    env = {**train_env(data_cache), "KILL_AT_STEP": "4"}
    proc = subprocess.run(train_cmd(run, "train.steps=6", "checkpoint.interval=2", script=script), cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert latest(run) == "step_00000002"
    assert os.path.isdir(os.path.join(run, "checkpoints", "step_00000004"))  # the half-written save
    # resuming the half-written folder directly is refused with one line; `auto` uses `latest`
    bad = run_train(run, "train.steps=6", f"train.resume={run}/checkpoints/step_00000004", cache_dir=data_cache, expect=2)
    assert "incomplete" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    run_train(run, "train.steps=6", "checkpoint.interval=2", "train.resume=auto", cache_dir=data_cache)
    assert latest(run) == "step_00000006"
    assert os.path.isfile(os.path.join(run, "checkpoints", "step_00000004", "trainer_state.json"))
    assert sorted(train_losses(run)) == [1, 2, 3, 4, 5, 6]


@pytest.mark.processes
def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, data_cache):
    # An absurd learning rate drives the weights to inf within a couple of steps; the updates are then skipped
    # and counted, and max_bad_steps in a row stop the run with exit code 3 and a clear message.
    run = str(tmp_path)
    proc = run_train(run, "train.steps=40", "train.lr=1e30", "train.warmup_steps=0", "train.grad_clip=0",
                     "train.max_bad_steps=3", cache_dir=data_cache, expect=3)
    assert "consecutive steps with a non-finite loss or gradient" in proc.stdout
    assert "update skipped" in proc.stdout
    last = [m for m in metrics(run) if "loss" in m][-1]
    assert last["skipped_steps"] >= 3


@pytest.mark.processes
def test_existing_run_without_resume_is_refused(tmp_path, data_cache):
    run = str(tmp_path)
    run_train(run, "train.steps=2", cache_dir=data_cache)
    proc = run_train(run, "train.steps=2", cache_dir=data_cache, expect=2)
    assert proc.stderr.startswith("error: ") and "train.resume=auto" in proc.stderr


@pytest.mark.compat
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.norm_schem=lns"], "did you mean model.norm_scheme"),
        (["model.norm_scheme=layerscale"], "model.norm_scheme: 'layerscale' is not one of"),
        (["train.lr=fast"], "train.lr: expected float"),
        (["parallel.zero_stage=3"], "zero_stage=3 is not supported"),
        (["train.precision=bf16"], "bf16 needs parallel.zero_stage >= 1"),
        (["data.seq_len=4096"], "exceeds model.max_seq_len"),
        (["model.vocab_size=1000"], "larger than model.vocab_size=1000"),
        (["data.paths=[/nonexistent/data]"], "/nonexistent/data"),
        (["train.resume=/nonexistent/ckpt"], "does not exist"),
        (["parallel.tp=2"], "world size 1 is not divisible"),
    ],
)
@pytest.mark.processes
def test_bad_input_is_one_line_and_exit_2(tmp_path, data_cache, overrides, message):
    run = str(tmp_path / "run")
    proc = run_train(run, *overrides, cache_dir=data_cache, expect=2, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not os.path.exists(run)  # nothing half-written


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), ["model.norm_scheme=dyt", "train.lr=3e-4"])
    path = tmp_path / "c.yaml"
    from pretrain.config import save_config

    save_config(cfg, str(path))
    assert load_config(str(path)) == cfg
    assert yaml.safe_load(path.read_text())["model"]["norm_scheme"] == "dyt"


def test_every_paper_config_loads():
    folder = os.path.join(REPO, "configs", "paper")
    names = sorted(os.listdir(folder))
    assert len(names) == 12
    lrs = {"130m": 1e-3, "250m": 1e-3, "350m": 5e-4, "1b": 5e-4}
    steps = {"130m": 20000, "250m": 40000, "350m": 60000, "1b": 100000}
    for name in names:
        cfg = load_config(os.path.join(folder, name))
        preset = cfg.model.preset
        assert cfg.model.norm_scheme in ("pre_ln", "lns", "ln_free")
        assert (cfg.data.seq_len, cfg.train.global_batch_size, cfg.train.weight_decay) == (256, 512, 0.0)
        assert cfg.train.lr == lrs[preset] and cfg.train.steps == steps[preset] and cfg.train.min_lr_ratio == 0.1
        assert cfg.train.warmup_steps == steps[preset] // (100 if preset == "1b" else 10)


@pytest.mark.compat
@pytest.mark.processes
def test_python_dash_m_and_console_script_agree():
    script = os.path.join(os.path.dirname(sys.executable), "pretrain")
    if not os.path.exists(script):
        pytest.skip("normlab is not pip-installed here (the GPU kit runs it from the checkout: python -m pretrain)")
    a = subprocess.run([sys.executable, "-m", "pretrain", "config", "configs/tiny.yaml"], cwd=REPO,
                       capture_output=True, text=True, check=True)
    b = subprocess.run([script, "config", "configs/tiny.yaml"], cwd=REPO, capture_output=True, text=True, check=True)
    assert a.stdout == b.stdout and "norm_scheme: pre_ln" in a.stdout


@pytest.mark.compat
@pytest.mark.processes
def test_spawned_ranks_pass_their_exit_code_on(tmp_path, data_cache):
    # --nproc-per-node runs torchrun; a rank's UserError must still end the command with exit 2, not 1.
    run = str(tmp_path / "run")
    proc = run_train(run, "model.vocab_size=1000", nproc=2, cache_dir=data_cache, expect=2, timeout=180)
    assert "error: the tokenizer's vocab (2048" in proc.stderr
    assert not os.path.exists(run)

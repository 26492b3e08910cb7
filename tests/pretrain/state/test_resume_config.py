"""Resume checks the checkpoint's config; train.init_from starts a fresh run from another run's weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers.train import REPO, TINY, metrics, run_train, train_env

from pretrain.config import ExperimentConfig, load_config
from pretrain.errors import UserError
from pretrain.state.resume import FREE, IDENTITY, TAKES_EFFECT, flatten, key_class, plan_resume

LAYOUT = {"tp": 1, "pp": 1, "dp": 1, "world_size": 1, "zero_stage": 0, "precision": "fp32"}


def test_every_config_key_has_a_resume_class():
    for key in flatten(ExperimentConfig()):
        assert key_class(key) in (FREE, TAKES_EFFECT, IDENTITY)
    assert key_class("model.d_model") == IDENTITY and key_class("train.lr") == TAKES_EFFECT
    assert key_class("eval.tokens") == FREE and key_class("parallel.zero_stage") == TAKES_EFFECT


def test_plan_names_every_identity_change_and_accepts_moved_data():
    old = load_config(None, ["data.paths=[/old/data]"])
    new = load_config(None, ["data.paths=[/new/data]", "model.norm_scheme=lns", "train.seed=3", "train.lr=3e-4"])
    with pytest.raises(UserError) as e:
        plan_resume(old, new, {"data_fingerprint": "a"}, LAYOUT, LAYOUT, data_fingerprint="a")
    msg = str(e.value)
    assert "\n" not in msg and "model.norm_scheme pre_ln -> lns" in msg and "train.seed 0 -> 3" in msg
    assert "data.paths" not in msg and "train.init_from" in msg  # moved data with the same tokens is fine
    same_model = load_config(None, ["data.paths=[/new/data]", "train.lr=3e-4"])
    plan = plan_resume(old, same_model, {"data_fingerprint": "a"}, LAYOUT, {**LAYOUT, "dp": 2}, data_fingerprint="a")
    assert "resume: train.lr 0.001 -> 0.0003" in plan.log_lines() and not plan.same_layout
    with pytest.raises(UserError, match="data \\(tokenizer or tokens of data.paths\\)"):
        plan_resume(old, old, {"data_fingerprint": "a"}, LAYOUT, LAYOUT, data_fingerprint="b")
    # before the data is opened (the check ahead of spawning ranks) a moved path is not judged yet
    plan_resume(old, same_model, {"data_fingerprint": "a"}, LAYOUT, LAYOUT, data_fingerprint=None)
    with pytest.raises(UserError, match="data.paths \\['/old/data'\\] -> \\['/new/data'\\]"):  # no fingerprint saved
        plan_resume(old, same_model, {}, LAYOUT, LAYOUT, data_fingerprint="a")


@pytest.mark.processes
def test_changes_take_effect_and_identity_changes_are_refused(tmp_path, data_cache):
    run = str(tmp_path)
    run_train(run, "train.steps=8", "train.stop_at_step=4", "checkpoint.interval=2", cache_dir=data_cache)
    before = open(os.path.join(run, "metrics.jsonl")).read()
    bad = run_train(run, "train.steps=8", "train.resume=auto", "model.norm_scheme=lns", "train.global_batch_size=16",
                    cache_dir=data_cache, expect=2)
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.norm_scheme pre_ln -> lns" in lines[0] and "global_batch_size" not in lines[0]
    assert open(os.path.join(run, "metrics.jsonl")).read() == before  # nothing written
    ok = run_train(run, "train.steps=8", "train.resume=auto", "train.lr=1e-4", "train.global_batch_size=16",
                   "train.betas=[0.8,0.9]", cache_dir=data_cache)
    assert "resume: train.lr 0.002 -> 0.0001" in ok.stdout
    assert "resume: train.global_batch_size 8 -> 16" in ok.stdout
    factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (4 - 2) / (8 - 2)))  # the schedule at step 5 (index 4)
    assert f"resume: lr at step 5 {2e-3 * factor:.3e} -> {1e-4 * factor:.3e} (the schedule of the new train.lr" \
        in ok.stdout
    records = {m["step"]: m for m in metrics(run) if "loss" in m}
    # the new peak lr, on the schedule position the run had reached (warm-up 2, cosine to 10% at step 8)
    progress = (4 - 2) / (8 - 2)
    assert records[5]["lr"] == pytest.approx(1e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))))
    # data position: 4 steps of 8 samples, then 16 per step
    assert records[5]["consumed_tokens"] == (4 * 8 + 16) * 64
    assert records[8]["consumed_tokens"] == (4 * 8 + 4 * 16) * 64
    state = json.load(open(os.path.join(run, "checkpoints", "step_00000008", "trainer_state.json")))
    assert state["consumed_samples"] == 4 * 8 + 4 * 16
    ckpt = torch.load(os.path.join(run, "checkpoints", "step_00000008", "mp_rank_00_model_states.pt"),
                      weights_only=False)
    assert all(tuple(g["betas"]) == (0.8, 0.9) for g in ckpt["optimizer"]["param_groups"])


def _weights(folder: str) -> dict:
    from pretrain.state.checkpoint import load_model_state

    return load_model_state(folder)[1]


@pytest.mark.processes
def test_init_from_checkpoint_of_any_layout_and_from_hugging_face(tmp_path, data_cache):
    source = str(tmp_path / "source")
    # a non-default shape, trained pipeline-parallel
    run_train(source, "train.steps=2", "model.n_layers=4", "parallel.pp=2", nproc=2, cache_dir=data_cache)
    source_weights = _weights(os.path.join(source, "checkpoints", "step_00000002"))
    # A config that gives no model keys: they come from the source. lr ~ 0 so the saved weights are the start.
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"data": {"seq_len": 64}}))
    common = [*TINY, "train.steps=1", "train.lr=1e-30", "train.warmup_steps=0"]

    def train_from(run, init_from, *extra, expect=0, nproc=None):
        cmd = [sys.executable, "-m", "pretrain", "train", *(["--nproc-per-node", str(nproc)] if nproc else []),
               str(plain), f"run.dir={run}", *common, f"train.init_from={init_from}", *extra]
        proc = subprocess.run(cmd, cwd=REPO, env=train_env(data_cache), capture_output=True, text=True, timeout=300)
        assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    child = str(tmp_path / "child")
    proc = train_from(child, source)
    assert "starting from the weights of" in proc.stdout
    cfg = load_config(os.path.join(child, "config.yaml"))
    assert cfg.model.n_layers == 4 and cfg.model.preset == "tiny"
    got = _weights(os.path.join(child, "checkpoints", "step_00000001"))
    assert got.keys() == source_weights.keys()
    for k in got:
        torch.testing.assert_close(got[k], source_weights[k], rtol=0, atol=1e-6, msg=k)
    assert [m["step"] for m in metrics(child) if "loss" in m] == [1]  # a fresh run: step 0, new schedule

    # into another layout: each rank takes its tensor-parallel shard
    tp2 = str(tmp_path / "tp2")
    train_from(tp2, source, "parallel.tp=2", nproc=2)
    got = _weights(os.path.join(tp2, "checkpoints", "step_00000001"))
    for k in got:
        torch.testing.assert_close(got[k], source_weights[k], rtol=0, atol=1e-6, msg=k)

    # the same weights through a Hugging Face directory
    hf = str(tmp_path / "hf")
    subprocess.run([sys.executable, "-m", "pretrain", "export-hf", "--checkpoint", source, "--out", hf], cwd=REPO,
                   env=train_env(data_cache), check=True, capture_output=True)
    from_hf = str(tmp_path / "from_hf")
    train_from(from_hf, hf)
    got = _weights(os.path.join(from_hf, "checkpoints", "step_00000001"))
    for k in got:
        torch.testing.assert_close(got[k], source_weights[k], rtol=0, atol=1e-6, msg=k)

    # a key the config gives that changes a shape: one line, nothing written
    bad = train_from(str(tmp_path / "bad"), source, "model.d_model=256", expect=2)
    assert bad.stderr.count("\n") == 1 and "model.d_model=256 (source: 128)" in bad.stderr
    assert not os.path.exists(tmp_path / "bad")


@pytest.mark.processes
def test_moved_data_resumes_and_changed_data_is_refused(tmp_path, data_cache):
    import shutil

    from pretrain.data.resolve import resolve_data_path

    original = resolve_data_path("bundled:tinyshakespeare", data_cache)
    moved = str(tmp_path / "moved_data")
    shutil.copytree(original, moved)
    run = str(tmp_path / "run")
    run_train(run, "train.steps=4", "train.stop_at_step=2", f"data.paths=[{original}]", cache_dir=data_cache)
    ok = run_train(run, "train.steps=4", "train.stop_at_step=3", "train.resume=auto", f"data.paths=[{moved}]",
                   cache_dir=data_cache)
    assert f"resume: data.paths ['{original}'] -> ['{moved}']" in ok.stdout
    # the same path with other tokens behind it (as if re-prepared from a shorter text) is another experiment
    with open(os.path.join(moved, "meta.json")) as f:
        meta = json.load(f)
    split = meta["splits"]["train"]
    split["num_tokens"] -= 64
    with open(os.path.join(moved, split["file"]), "r+b") as f:
        f.truncate(split["num_tokens"] * (2 if meta["dtype"] == "uint16" else 4))
    with open(os.path.join(moved, "meta.json"), "w") as f:
        json.dump(meta, f)
    bad = run_train(run, "train.steps=4", "train.resume=auto", f"data.paths=[{moved}]", cache_dir=data_cache, expect=2)
    assert "data (tokenizer or tokens of data.paths)" in bad.stderr and bad.stderr.count("\n") == 1


def test_a_longer_run_says_how_the_lr_moves_at_the_resumed_step():
    from pretrain.state.resume import ResumePlan
    from pretrain.train.loop import schedule_change

    old = load_config(None, ["train.steps=300", "train.warmup_steps=30", "train.lr=2e-3", "train.min_lr_ratio=0.1"])
    new = load_config(None, ["train.steps=600", "train.warmup_steps=30", "train.lr=2e-3", "train.min_lr_ratio=0.1"])
    plan = ResumePlan(changes=[("train.steps", 300, 600, "setting")], old_layout=LAYOUT, new_layout=LAYOUT)

    def lr(steps: int, step: int) -> float:
        return 2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 30) / (steps - 30))))

    line = schedule_change(old, new, 250, plan)
    assert line == f"resume: lr at step 251 {lr(300, 250):.3e} -> {lr(600, 250):.3e} (the schedule of the new " \
                   "train.steps, from where the run is)"
    assert lr(600, 250) > 2 * lr(300, 250)  # the cosine stretched: the lr jumps back up
    unchanged = ResumePlan(changes=[("train.grad_clip", 1.0, 0.5, "setting")], old_layout=LAYOUT, new_layout=LAYOUT)
    assert schedule_change(old, old, 250, unchanged) is None

"""`pretrain eval`: the in-loop validation number from a checkpoint of another layout, and from its HF export.

One short lns run on two pipeline stages (pp=2) evaluates in the loop at its end; `pretrain eval` on its
checkpoint (merged into one full model on one process) must give the same loss on the same tokens, and the
Hugging Face export of the checkpoint (1/sqrt(l) folded into the norm weights, evaluated by transformers) the same
again.
"""

from __future__ import annotations

import json
import math
import os

import pytest
from train_helpers import metrics, run_train

from pretrain.cli import main

DATA = "bundled:tinyshakespeare"


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_cache):
    run_dir = str(tmp_path_factory.mktemp("eval") / "lns_pp2")
    run_train(run_dir, "train.steps=4", "model.norm_scheme=lns", "parallel.pp=2", "eval.interval=4",
              "eval.tokens=3000", cache_dir=data_cache, nproc=2)
    return run_dir


@pytest.fixture
def env_cache(monkeypatch, data_cache):
    monkeypatch.setenv("PRETRAIN_CACHE", data_cache)


def eval_json(capsys, *argv) -> dict:
    assert main(["eval", *argv, "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_eval_equals_in_loop_validation_and_hf_export(run, tmp_path, env_cache, single_thread, capsys):
    (in_loop,) = [m for m in metrics(run) if "val_loss" in m]
    ours = eval_json(capsys, "--checkpoint", run, "--data", DATA)
    # defaults from the checkpoint: eval.tokens=3000 -> 3000 // 64 = 46 samples of data.seq_len=64
    assert (ours["tokens"], ours["samples"], ours["seq_len"], ours["step"]) == (46 * 64, 46, 64, 4)
    assert ours["norm_scheme"] == "lns" and ours["ppl"] == pytest.approx(math.exp(ours["loss"]), rel=1e-12)
    assert ours["loss"] == pytest.approx(in_loop["val_loss"], abs=1e-5), (ours, in_loop)
    # the micro-batch size changes nothing but memory
    other = eval_json(capsys, "--checkpoint", run, "--data", DATA, "--micro-batch-size", "5")
    assert other["loss"] == pytest.approx(ours["loss"], abs=1e-6) and other["tokens"] == ours["tokens"]

    hf_dir = str(tmp_path / "hf")
    assert main(["export-hf", "--checkpoint", run, "--out", hf_dir]) == 0
    capsys.readouterr()
    hf = eval_json(capsys, "--checkpoint", hf_dir, "--data", DATA, "--seq-len", "64", "--tokens", "3000")
    assert hf["tokens"] == ours["tokens"] and hf["hf_model_type"] == "llama" and hf["step"] is None
    assert hf["loss"] == pytest.approx(ours["loss"], abs=1e-5), (hf, ours)

    # the plain line
    assert main(["eval", "--checkpoint", run, "--data", DATA, "--tokens", "640"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("loss ") and "| 640 tokens (10 samples of 64) |" in line and line.endswith("step 4")


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("tokens", "--tokens must be >= 1"),
    ("below_one_sample", "--tokens"),
    ("seq_len", "longer than the model's"),
    ("data", "no such bundled corpus"),
])
def test_eval_errors(run, tmp_path, env_cache, capsys, case, message):
    argv = {"--checkpoint": run, "--data": DATA}
    extra = []
    if case == "missing":
        argv["--checkpoint"] = str(tmp_path / "nope")
    elif case == "tokens":
        extra = ["--tokens", "0"]
    elif case == "below_one_sample":
        extra = ["--tokens", "10"]
    elif case == "seq_len":
        extra = ["--seq-len", "100000"]
    elif case == "data":
        argv["--data"] = "bundled:hamlet"
    assert main(["eval", *[x for kv in argv.items() for x in kv], *extra]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert captured.out == ""
    assert os.listdir(tmp_path) == []

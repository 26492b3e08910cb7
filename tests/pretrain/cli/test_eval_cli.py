"""`pretrain eval`: the in-loop validation number from a checkpoint of another layout, and from its HF export.

One short lns run on two pipeline stages (pp=2) evaluates in the loop at its end; `pretrain eval` on its
checkpoint (merged into one full model on one process) must give the same loss on the same tokens, and the
Hugging Face export of the checkpoint (1/sqrt(l) folded into the norm weights, evaluated by transformers) the same
again. analyze-depth reads the export as it reads the checkpoint (the same numbers), attribute reads it and refuses
it for its norms, and every command's model source (pretrain.state.sources) answers a bad path in one line.
"""

from __future__ import annotations

import json
import math
import os

import pytest
from helpers.train import metrics, run_train

from pretrain.cli import main
from pretrain.config import load_config
from pretrain.errors import UserError
from pretrain.state.sources import resolve_model

pytestmark = pytest.mark.processes  # starts subprocesses, ranks or training runs (tests/conftest.py: tiers)

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
    # bits per byte: the loss sum over the bytes the tokens cover, by the data's tokenizer; the loop's likewise
    assert ours["bytes"] > ours["tokens"] and ours["bpb"] == pytest.approx(
        ours["loss"] * ours["tokens"] / (math.log(2) * ours["bytes"]), rel=1e-12)
    assert in_loop["val_bpb"] == pytest.approx(ours["bpb"], rel=1e-5) and in_loop["val_ppl"] == pytest.approx(
        math.exp(in_loop["val_loss"]), rel=1e-12)
    # the micro-batch size changes nothing but memory
    other = eval_json(capsys, "--checkpoint", run, "--data", DATA, "--micro-batch-size", "5")
    assert other["loss"] == pytest.approx(ours["loss"], abs=1e-6) and other["tokens"] == ours["tokens"]
    assert other["bytes"] == ours["bytes"]

    hf_dir = str(tmp_path / "hf")
    assert main(["export-hf", "--checkpoint", run, "--out", hf_dir]) == 0
    capsys.readouterr()
    hf = eval_json(capsys, "--checkpoint", hf_dir, "--data", DATA, "--seq-len", "64", "--tokens", "3000")
    assert hf["tokens"] == ours["tokens"] and hf["hf_model_type"] == "llama" and hf["step"] is None
    assert hf["loss"] == pytest.approx(ours["loss"], abs=1e-5), (hf, ours)
    assert hf["bytes"] == ours["bytes"] and hf["bpb"] == pytest.approx(ours["bpb"], abs=1e-5)

    # the plain line
    assert main(["eval", "--checkpoint", run, "--data", DATA, "--tokens", "640"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("loss ") and " | bpb " in line and "| 640 tokens (10 samples of 64) |" in line
    assert line.endswith("step 4")


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


def depth_json(path: str, out: str) -> dict:
    assert main(["analyze-depth", "--checkpoint", path, "--data", DATA, "--out", out, "--batches", "2",
                 "--micro-batch-size", "3", "--seq-len", "48"]) == 0
    with open(os.path.join(out, "depth.json")) as f:
        return json.load(f)


def test_analyze_depth_and_attribute_take_the_hf_export(run, tmp_path, env_cache, single_thread, capsys):
    hf_dir = str(tmp_path / "hf")
    assert main(["export-hf", "--checkpoint", run, "--out", hf_dir]) == 0
    ours, hf = depth_json(run, str(tmp_path / "ours")), depth_json(hf_dir, str(tmp_path / "theirs"))
    assert (ours["step"], ours["norm_scheme"]) == (4, "lns") and "hf_model_type" not in ours
    # the export is read as the plain Llama it is: 1/sqrt(l) folded into the norm weights, the same function
    assert (hf["step"], hf["norm_scheme"], hf["hf_model_type"]) == (None, "pre_ln", "llama")
    assert hf["checkpoint"] == os.path.abspath(hf_dir) and hf["tokens"] == ours["tokens"] == 2 * 3 * 48
    assert hf["val_loss"] == pytest.approx(ours["val_loss"], abs=1e-5)
    assert 0 < ours["val_bpb"] == pytest.approx(hf["val_bpb"], abs=1e-5)
    for key in ("angular_distance", "skip_loss", "attn_contribution", "mlp_contribution", "block_contribution"):
        assert hf[key] == pytest.approx(ours[key], rel=1e-4, abs=1e-6), key
    assert "pre_ln (Hugging Face directory)" in capsys.readouterr().out
    # attribute loads it too, and refuses it as it refuses any model with norms (not as a half-written checkpoint)
    out = tmp_path / "dla"
    assert main(["attribute", "--checkpoint", hf_dir, "--data", DATA, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: direct logit attribution is exact only without norms; this is a pre_ln model")
    assert "\n" not in err and not out.exists()


def broken_source(tmp_path, case: str) -> str:
    if case == "missing":
        return str(tmp_path / "nope")
    if case == "incomplete":  # a step folder whose save has not written trainer_state.json (yet)
        (tmp_path / "checkpoints" / "step_00000003").mkdir(parents=True)
        return str(tmp_path / "checkpoints" / "step_00000003")
    (tmp_path / "hf").mkdir()  # an HF directory whose config.json cannot be read
    (tmp_path / "hf" / "config.json").write_text("{not json")
    return str(tmp_path / "hf")


COMMANDS = {
    "generate": lambda path, tmp: ["generate", "--checkpoint", path, "--prompt", "hi", "--device", "cpu"],
    "eval-sft": lambda path, tmp: ["eval-sft", "--checkpoint", path, "--data", "bundled:tiny-instruct-test"],
    "eval": lambda path, tmp: ["eval", "--checkpoint", path, "--data", DATA],
    "analyze-depth": lambda path, tmp: ["analyze-depth", "--checkpoint", path, "--data", DATA, "--out", tmp],
    "attribute": lambda path, tmp: ["attribute", "--checkpoint", path, "--data", DATA, "--out", tmp],
    "export-hf": lambda path, tmp: ["export-hf", "--checkpoint", path, "--out", tmp],
    "remove-norms": lambda path, tmp: ["remove-norms", "--checkpoint", path, "--data", DATA, "--out", tmp],
}


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("incomplete", "is incomplete or not a checkpoint (no trainer_state.json"),
    ("bad_hf", "cannot read its config.json"),
])
@pytest.mark.parametrize("command", [*COMMANDS, "train.init_from"])
def test_every_command_answers_a_bad_model_path_in_one_line(tmp_path, capsys, command, case, message):
    path, out = broken_source(tmp_path, case), str(tmp_path / "out")
    if command == "train.init_from":
        with pytest.raises(UserError) as e:
            resolve_model(load_config(None, [f"train.init_from={path}", f"run.dir={out}"]), None)
        err = str(e.value)
    else:
        assert main(COMMANDS[command](path, out)) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().removeprefix("error: ")
        assert "\n" not in err and captured.out == ""
    flag = "train.init_from" if command == "train.init_from" else "--checkpoint"
    assert err.startswith(flag) and message in err, err
    # nothing in the message advises deleting (or blames an interrupted save of) something that is not half-written
    assert not any(word in err for word in ("delete", "remove", "interrupted")), err
    assert not os.path.exists(out)


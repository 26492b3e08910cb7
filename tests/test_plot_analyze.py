"""`pretrain plot` and `pretrain analyze-depth` on real (short) runs, and their one-line errors."""

from __future__ import annotations

import json
import math
import os

import pytest
from train_helpers import run_train

from pretrain.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("runs")
    trained, lns, off = str(root / "pre_ln"), str(root / "lns"), str(root / "off")
    run_train(trained, "train.steps=40", "diagnostics.interval=10", "train.lr=3e-3", cache_dir=data_cache)
    lns_args = ["train.steps=10", "diagnostics.interval=2", "model.norm_scheme=lns", "checkpoint.interval=5"]
    run_train(lns, *lns_args, cache_dir=data_cache)
    with open(os.path.join(lns, "layer_stats.jsonl")) as f:
        before_resume = f.read()
    # resume from step 5 although steps 6-10 were measured: those entries are dropped and measured again
    run_train(lns, *lns_args, f"train.resume={os.path.join(lns, 'checkpoints', 'step_00000005')}", cache_dir=data_cache)
    run_train(off, "train.steps=2", "model.norm_scheme=ln_free", cache_dir=data_cache)  # diagnostics.interval=0
    return {"trained": trained, "lns": lns, "off": off, "lns_before_resume": before_resume}


@pytest.fixture
def env_cache(monkeypatch, data_cache):
    monkeypatch.setenv("PRETRAIN_CACHE", data_cache)


def is_png(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


def test_interval_zero_writes_no_layer_stats(runs):
    assert not os.path.exists(os.path.join(runs["off"], "layer_stats.jsonl"))
    assert os.path.isfile(os.path.join(runs["off"], "metrics.jsonl"))


def test_resume_relogs_layer_stats_once(runs):
    with open(os.path.join(runs["lns"], "layer_stats.jsonl")) as f:
        after = f.read()
    assert [json.loads(line)["step"] for line in after.splitlines()] == [2, 4, 6, 8, 10]
    assert after == runs["lns_before_resume"]  # resume is exact, so are the statistics


def test_plot_several_runs(runs, tmp_path, capsys):
    out = str(tmp_path / "depth.png")
    assert main(["plot", runs["trained"], runs["lns"], "--out", out]) == 0
    assert is_png(out) and os.path.getsize(out) > 10_000
    assert "pre_ln, lns" in capsys.readouterr().out
    out2 = str(tmp_path / "steps.pdf")
    assert main(["plot", runs["trained"], "--steps", "10", "40", "--out", out2]) == 0
    with open(out2, "rb") as f:
        assert f.read(4) == b"%PDF"


def test_plot_labels_repeated_schemes_with_the_folder(runs):
    from pretrain.analysis.figures import label_runs
    from pretrain.analysis.report_table import read_run

    a, b = read_run(runs["trained"]), read_run(runs["trained"])
    label_runs([a, b, read_run(runs["lns"])])
    assert a.label == "pre_ln (pre_ln)" and b.label == a.label


@pytest.mark.parametrize(
    "which, extra, message",
    [
        ("off", [], "no layer_stats.jsonl; train with diagnostics.interval"),
        ("missing", [], "does not exist"),
        ("trained", ["--steps", "7"], "no layer statistics at step 7; measured steps: 10, 20, 30, 40"),
        ("trained", ["--out-ext"], "unknown image format"),
    ],
)
def test_plot_errors(runs, tmp_path, capsys, which, extra, message):
    run = runs.get(which, str(tmp_path / "nope"))
    out = str(tmp_path / ("x.nope" if extra == ["--out-ext"] else "x.png"))
    extra = [] if extra == ["--out-ext"] else extra
    assert main(["plot", run, "--out", out, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not os.path.exists(out)


def test_analyze_depth_trained_model(runs, tmp_path, env_cache, capsys):
    out = str(tmp_path / "depth")
    assert main(["analyze-depth", "--checkpoint", runs["trained"], "--data", "bundled:tinyshakespeare",
                 "--out", out, "--batches", "3"]) == 0
    assert sorted(os.listdir(out)) == ["depth.json", "depth.png"]
    assert is_png(os.path.join(out, "depth.png"))
    with open(os.path.join(out, "depth.json")) as f:
        result = json.load(f)
    L = result["layers"]
    assert L == 8 and result["step"] == 40 and result["norm_scheme"] == "pre_ln"
    assert result["tokens"] == 3 * 4 * 64 and result["batches"] == 3
    for key in ("angular_distance", "skip_loss", "skip_loss_increase", "attn_contribution", "mlp_contribution",
                "block_contribution", "logit_lens_kl", "skip_output_change"):
        want = L + 1 if key == "logit_lens_kl" else L  # the logit lens starts at the embedding
        assert len(result[key]) == want and all(math.isfinite(v) for v in result[key]), key
    assert all(0 <= d <= 1 for d in result["angular_distance"])
    # logit lens: KL >= 0, and 0 at the last block (its decoded distribution is the output)
    assert result["logit_lens_kl"][-1] == 0 and all(v >= -1e-6 for v in result["logit_lens_kl"])
    # packed pretraining sequences start mid-document: no position is kept from the skips by default
    assert result["keep_first"] == 0
    effect = result["skip_effect"]  # L x L: 0 before the skipped block, 1 on the diagonal, measured after it
    assert [len(row) for row in effect] == [L] * L
    assert all(effect[s][l] == (1.0 if l == s else 0.0) for s in range(L) for l in range(s + 1))
    assert all(effect[s][l] > 0 for s in range(L) for l in range(s + 1, L))
    assert result["skip_loss_increase"] == pytest.approx([s - result["val_loss"] for s in result["skip_loss"]])
    # a trained model: removing a block hurts on average
    assert sum(result["skip_loss_increase"]) / L > 0
    assert "skipping block" in capsys.readouterr().out
    # and the stored numbers are what depth_analysis gives for the same checkpoint
    assert 0 < result["val_loss"] < math.log(2048)
    # no temporary folders left next to --out
    assert os.listdir(tmp_path) == ["depth"]


def test_analyze_depth_accepts_step_and_checkpoints_folders(runs, tmp_path, env_cache):
    step = os.path.join(runs["lns"], "checkpoints", "step_00000010")
    for i, path in enumerate([step, os.path.join(runs["lns"], "checkpoints")]):
        out = str(tmp_path / f"d{i}")
        assert main(["analyze-depth", "--checkpoint", path, "--data", "bundled:tinyshakespeare", "--out", out,
                     "--batches", "1", "--micro-batch-size", "2", "--seq-len", "32"]) == 0
        with open(os.path.join(out, "depth.json")) as f:
            result = json.load(f)
        assert result["step"] == 10 and result["norm_scheme"] == "lns" and result["tokens"] == 2 * 32
        assert len(result["skip_loss"]) == 8


def test_analyze_depth_of_an_hf_export_equals_the_checkpoint(runs, tmp_path, env_cache):
    """An HF directory is analyzed like the checkpoint it was exported from; --keep-first is recorded and used."""
    hf = str(tmp_path / "hf")
    assert main(["export-hf", "--checkpoint", runs["trained"], "--out", hf]) == 0
    results = {}
    for name, path, extra in (("ckpt", runs["trained"], []), ("hf", hf, []), ("hf_keep", hf, ["--keep-first", "1"])):
        out = str(tmp_path / f"depth_{name}")
        assert main(["analyze-depth", "--checkpoint", path, "--data", "bundled:tinyshakespeare", "--out", out,
                     "--batches", "1", "--micro-batch-size", "2", "--seq-len", "32", *extra]) == 0
        with open(os.path.join(out, "depth.json")) as f:
            results[name] = json.load(f)
    ckpt, exported, keep = results["ckpt"], results["hf"], results["hf_keep"]
    assert exported["step"] is None and exported["hf_model_type"] == "llama" and exported["keep_first"] == 0
    for key in ("val_loss", "skip_loss", "block_contribution", "logit_lens_kl"):
        assert exported[key] == pytest.approx(ckpt[key], rel=1e-5, abs=1e-6), key
    assert keep["keep_first"] == 1 and keep["val_loss"] == exported["val_loss"]
    assert keep["skip_loss"] != exported["skip_loss"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("existing_out", "already exists"),
        ("bad_keep_first", "--keep-first"),
        ("bad_checkpoint", "does not exist"),
        ("bad_data", "no such folder"),
        ("bad_out_parent", "does not exist"),
        ("bad_seq_len", "--seq-len"),
    ],
)
def test_analyze_depth_errors(runs, tmp_path, env_cache, capsys, case, message):
    args = {"--checkpoint": runs["trained"], "--data": "bundled:tinyshakespeare", "--out": str(tmp_path / "out")}
    extra = []
    if case == "existing_out":
        os.makedirs(args["--out"])
    elif case == "bad_checkpoint":
        args["--checkpoint"] = str(tmp_path / "no-such-run" / "checkpoints" / "step_00000001")
    elif case == "bad_data":
        args["--data"] = str(tmp_path / "no-data")
    elif case == "bad_out_parent":
        args["--out"] = str(tmp_path / "a" / "b")
    elif case == "bad_seq_len":
        extra = ["--seq-len", "100000"]
    elif case == "bad_keep_first":
        extra = ["--seq-len", "32", "--keep-first", "32"]
    argv = ["analyze-depth"] + [x for kv in args.items() for x in kv] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    if case != "existing_out":
        assert not os.path.exists(args["--out"])

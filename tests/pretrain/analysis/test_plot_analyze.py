"""`pretrain plot` and `pretrain analyze-depth` on real (short) runs, and their one-line errors."""

from __future__ import annotations

import json
import math
import os

import pytest
from helpers.train import run_train

from pretrain.cli import main
from pretrain.diagnostics.measures import BLOCK_PAIRS, DEPTH_MEASURES, FROM_EMBEDDING

pytestmark = pytest.mark.processes  # starts subprocesses, ranks or training runs (tests/conftest.py: tiers)

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
    for m in DEPTH_MEASURES:  # every analyze-depth entry of the per-layer table
        values = [v for row in result[m.name] for v in row] if m.shape == BLOCK_PAIRS else result[m.name]
        want = {BLOCK_PAIRS: L * L, FROM_EMBEDDING: L + 1}.get(m.shape, L)  # the logit lens starts at the embedding
        assert len(values) == want and all(math.isfinite(v) for v in values), m.name
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
                     "--batches", "1", "--micro-batch-size", "2", "--seq-len", "32", "--keep-first", str(i)]) == 0
        with open(os.path.join(out, "depth.json")) as f:
            result = json.load(f)
        assert result["step"] == 10 and result["norm_scheme"] == "lns" and result["tokens"] == 2 * 32
        assert result["keep_first"] == i
        assert len(result["skip_loss"]) == 8


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory, data_cache):
    """The trained run as an HF directory (with its tokenizer)."""
    hf = str(tmp_path_factory.mktemp("export") / "hf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRETRAIN_CACHE", data_cache)
        assert main(["export-hf", "--checkpoint", runs["trained"], "--out", hf]) == 0
    return hf


def test_attribute_of_an_ln_free_export_equals_the_checkpoint(runs, tmp_path, env_cache):
    """An ln_free model exports as a stock Llama with linear norms, which reads back as ln_free: attribute takes the
    HF directory and gives the checkpoint's numbers."""
    hf = str(tmp_path / "hf")
    assert main(["export-hf", "--checkpoint", runs["off"], "--out", hf]) == 0
    results = {}
    for name, path in (("ckpt", runs["off"]), ("hf", hf)):
        out = str(tmp_path / f"dla_{name}")
        assert main(["attribute", "--checkpoint", path, "--data", "bundled:tinyshakespeare", "--out", out,
                     "--batches", "1", "--micro-batch-size", "2", "--seq-len", "32"]) == 0
        with open(os.path.join(out, "attribution.json")) as f:
            results[name] = json.load(f)
    ckpt, exported = results["ckpt"], results["hf"]
    assert exported["norm_scheme"] == "ln_free" and exported["hf_model_type"] == "llama" and exported["step"] is None
    for key in ("logit", "embedding", "attn", "mlp"):
        assert exported[key] == pytest.approx(ckpt[key], rel=1e-5, abs=1e-6), key
    assert exported["max_abs_error"] < 1e-3


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


def test_depth_analyses_equal_csordas_et_al_through_nnsight(runs, exported):
    """The logit lens from the embedding and the layer skips that keep position 0 (BOS), computed the way
    Csordas et al.'s llm_effective_depth computes them (nnsight on the transformers model: taps on each layer's
    input, `merge_io` with no_skip_front=1), equal ours on our model for the same text."""
    import nnsight  # a dev dependency (setup.cfg): the interpretability tool researchers load exports into
    import torch

    from pretrain.analysis.depth import depth_analysis
    from pretrain.state.sources import open_source

    # The export's own tokenizer (BOS first). dispatch=True: nnsight 0.8.1's lazy (meta) load of a local directory
    # finds no tokenizer with transformers >= 5.2x (its pipeline declares the tokenizer optional), for any model.
    lm = nnsight.LanguageModel(exported, dtype=torch.float32, dispatch=True)
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids[0, 0] == lm.tokenizer.bos_token_id and ids.shape[1] > 8
    layers, n = lm.model.layers, len(lm.model.layers)
    with torch.no_grad():
        with lm.trace(ids):
            lens, deltas = nnsight.save([]), nnsight.save([])
            for l in range(n):
                x = layers[l].inputs[0][0]
                lens.append(lm.lm_head(lm.model.norm(x)))
                deltas.append(layers[l].output - x)
            logits = lm.output.logits.save()
        out_logp = logits.log_softmax(-1)
        kl = [(ll.log_softmax(-1).exp() * (ll.log_softmax(-1) - out_logp)).sum(-1).mean().item() for ll in lens]
        effects, out_change = [], []
        for s in range(n):
            with lm.trace(ids):
                skipped = nnsight.save([])
                for l in range(n):
                    x = layers[l].inputs[0][0]
                    if l == s:  # merge_io: the block's own output at position 0, its input elsewhere
                        layers[l].output = torch.cat([layers[l].output[:, :1], x[:, 1:]], dim=1)
                    skipped.append(layers[l].output - x)
                skip_logits = lm.output.logits.save()
            effects.append([((a - b).norm(dim=-1) / a.norm(dim=-1).clamp(min=1e-6)).max().item()
                            for a, b in zip(deltas, skipped)])
            out_change.append((skip_logits.softmax(-1) - logits.softmax(-1)).norm(dim=-1).max().item())
    labels = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
    ours = depth_analysis(open_source(runs["trained"]).build(), [(ids, labels)], keep_first=1)
    assert ours["logit_lens_kl"][:n] == pytest.approx(kl, rel=1e-4, abs=1e-6)  # theirs stops before the output
    assert [v for row in ours["skip_effect"] for v in row] == pytest.approx(
        [v for row in effects for v in row], rel=1e-4, abs=1e-6)
    assert ours["skip_output_change"] == pytest.approx(out_change, rel=1e-4, abs=1e-6)

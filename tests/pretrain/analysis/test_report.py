"""`pretrain report`: Table 1's rules on made-up runs, then a real small sweep with a learning-rate axis (Table 1
at each scheme's best lr; tests/pretrain/analysis/test_report_lr.py has its rules) reported and opened in a real
headless browser (Debian's chromium; skipped where it is not installed)."""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.train import REPO, TINY, train_env

from pretrain.analysis.report_table import Run, build_table, column_keys, row_differences
from pretrain.cli import main

pytestmark = pytest.mark.processes  # starts subprocesses, ranks or training runs (tests/conftest.py: tiers)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


# ------------------------------------------------------------------------------------ Table 1 on made-up runs


def fake_run(scheme: str, layers: int, val: list[tuple[int, float]], seed: int = 0, last_loss: float = 3.0,
             exit_codes: tuple = (), bytes_per_token: float | None = None, **config) -> Run:
    """A run's folder as read; `bytes_per_token` gives its validation entries val_bpb (its tokenizer's bytes per
    token on the validation text)."""
    flat = {"model.norm_scheme": scheme, "model.n_layers": layers, "train.seed": seed, "train.steps": 100,
            "eval.tokens": 1000, "data.seq_len": 64, "data.paths": ["d"], "run.dir": f"r/{scheme}{layers}{seed}",
            **config}
    return Run(path=f"/r/{scheme}-{layers}-{seed}", name=f"{scheme}-{layers}-{seed}", config=flat, scheme=scheme,
               train=[{"step": 100, "loss": last_loss, "consumed_tokens": max(t for t, _ in val) if val else 0}],
               val=[{"step": t // 10, "tokens": t, "val_loss": math.log(p), "val_ppl": p,
                     "val_bpb": math.log2(p) / bytes_per_token if bytes_per_token else None} for t, p in val],
               exit_codes=list(exit_codes), params=1000 * layers)


def test_table_equal_tokens_best_and_diverged():
    runs = [
        fake_run("pre_ln", 4, [(100, 50.0), (200, 40.0)]),
        fake_run("lns", 4, [(100, 45.0), (200, 35.0), (300, 30.0)]),  # trained further: compared at 200 tokens
        fake_run("post_ln", 4, [(100, 60.0)], last_loss=float("nan"), exit_codes=(3,)),  # stopped: non-finite
        fake_run("pre_ln", 8, [(200, 38.0)]),
        fake_run("lns", 8, [(150, 33.0)], seed=0),  # evaluated at 150 only: its last evaluation before 200
        fake_run("lns", 8, [(150, 31.0), (200, 29.0)], seed=1),
        fake_run("post_ln", 8, [(100, 9000.0), (200, 5000.0)]),  # finite and falling: diverged only by a threshold
        fake_run("post_ln", 16, [(100, 60.0), (150, 70.0), (200, 90.0)]),  # finite but rising at the last two
        fake_run("pre_ln", 16, [(100, 60.0), (150, 50.0), (200, 55.0)]),  # one rise is noise, not divergence
    ]
    keys = column_keys(runs)
    assert keys == ["model.n_layers", "train.seed"]  # seeds vary within a scheme: columns unless told otherwise
    table = build_table(runs, ["model.n_layers"])
    assert table.columns == ["n_layers=4", "n_layers=8", "n_layers=16"] and table.rows == ["pre_ln", "lns", "post_ln"]
    assert table.tokens == {"n_layers=4": 200, "n_layers=8": 150, "n_layers=16": 200}  # diverged runs do not pull T down
    c = table.cells
    assert (c["pre_ln", "n_layers=4"].ppl, c["lns", "n_layers=4"].ppl) == (40.0, 35.0)
    assert c["lns", "n_layers=4"].best and not c["pre_ln", "n_layers=4"].best
    assert c["post_ln", "n_layers=4"].diverged and c["post_ln", "n_layers=4"].ppl is None
    assert not c["post_ln", "n_layers=8"].diverged and c["post_ln", "n_layers=8"].ppl == 9000.0
    assert c["post_ln", "n_layers=16"].diverged and not c["pre_ln", "n_layers=16"].diverged
    lns8 = c["lns", "n_layers=8"]  # two seeds at T = 150: mean and standard deviation
    assert lns8.ppl == pytest.approx(32.0) and lns8.std == pytest.approx(math.sqrt(2.0)) and lns8.best
    assert c["pre_ln", "n_layers=8"].ppl is None and c["pre_ln", "n_layers=8"].note == "no evaluation by then"
    # the paper's fixed threshold is an option
    assert build_table(runs, ["model.n_layers"], diverged_ppl=1000.0).cells["post_ln", "n_layers=8"].diverged
    assert not build_table(runs, ["model.n_layers"], diverged_ppl=1e4).cells["post_ln", "n_layers=8"].diverged


def test_table_1b_ranks_runs_across_tokenizers_by_bits_per_byte():
    # one text under two tokenizers: the 8k vocabulary's tokens cover fewer bytes, so its lower perplexity is the
    # worse model per byte (log2(30) / 3 = 1.64 bits per byte against log2(40) / 4 = 1.33)
    runs = [fake_run("pre_ln", 4, [(100, 40.0)], bytes_per_token=4.0, **{"data.paths": ["text_bpe32k"]}),
            fake_run("lns", 4, [(100, 30.0)], bytes_per_token=3.0, **{"data.paths": ["text_bpe8k"]}),
            fake_run("lns", 4, [(100, 31.0)], seed=1, bytes_per_token=3.0, **{"data.paths": ["text_bpe8k"]})]
    table = build_table(runs, [])
    pre_ln, lns = table.cells["pre_ln", "all runs"], table.cells["lns", "all runs"]
    assert table.has_bpb and pre_ln.bpb == pytest.approx(math.log2(40) / 4)
    assert lns.bpb == pytest.approx((math.log2(30) + math.log2(31)) / 6) and lns.bpb_std is not None
    assert lns.best and pre_ln.bpb_best and not lns.bpb_best  # perplexity says lns, bits per byte pre_ln
    assert any("different sets" in w and "Table 1b" in w for w in table.warnings)
    # a run without val_bpb (data saved without a tokenizer) leaves its cell's bpb empty
    assert build_table([fake_run("pre_ln", 4, [(100, 40.0)])], []).has_bpb is False


def test_columns_skip_settings_fixed_per_scheme():
    runs = [fake_run("pre_ln", 4, [(1, 9.0)], **{"model.dyt_alpha_init": 0.5}),
            fake_run("pre_ln", 8, [(1, 9.0)], **{"model.dyt_alpha_init": 0.5}),
            fake_run("dyt", 4, [(1, 9.0)], **{"model.dyt_alpha_init": 0.2}),
            fake_run("dyt", 8, [(1, 9.0)], **{"model.dyt_alpha_init": 0.2})]
    assert column_keys(runs) == ["model.n_layers"]
    assert row_differences(runs, ["model.n_layers"]) == ["model.dyt_alpha_init: pre_ln=0.5, dyt=0.2"]
    with pytest.raises(Exception, match="--columns model.nope: no run has this config key"):
        build_table(runs, ["model.nope"])


# ------------------------------------------------------------------------------------ a real small sweep


LRS = ("2e-3", "6e-3")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_cache):
    """pre_ln and lns at 2 and 3 layers and two learning rates, 8 steps each (validation and diagnostics every 4),
    one depth analysis."""
    root = tmp_path_factory.mktemp("report")
    cmd = [sys.executable, "-m", "launch.sweep", "configs/tiny.yaml", "train.steps=8", *TINY, "eval.interval=4",
           "diagnostics.interval=4", "logging.backends=[]", "--grid", "model.norm_scheme=pre_ln,lns",
           "model.n_layers=2,3", f"train.lr={','.join(LRS)}", "--name", "abl", "--root", str(root), "--local"]
    out = subprocess.run(cmd, cwd=REPO, env=train_env(data_cache), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep_dir = root / "abl"
    lns3 = sweep_dir / f"norm_scheme=lns,n_layers=3,lr={LRS[1]}"
    with pytest.MonkeyPatch.context() as mp:  # in this process: no second interpreter start-up
        mp.setenv("PRETRAIN_CACHE", data_cache)
        assert main(["analyze-depth", "--checkpoint", str(lns3), "--data", "bundled:tinyshakespeare", "--out",
                     str(lns3 / "depth"), "--batches", "1", "--micro-batch-size", "2", "--seq-len", "32"]) == 0
    report = root / "report"
    assert main(["report", str(sweep_dir), "--out", str(report)]) == 0
    return sweep_dir, report


def final_ppl(run_dir: Path) -> float:
    vals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_ppl" in line]
    assert vals[-1]["step"] == 8
    return vals[-1]["val_ppl"]


def final_bpb(run_dir: Path) -> float:
    vals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_ppl" in line]
    return vals[-1]["val_bpb"]


def markdown_table1(text: str, heading: str = "## Table 1:") -> list[list[str]]:
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return [rows[0]] + rows[2:]


def test_sweep_status_lists_the_learning_rates(sweep, capsys):
    from launch.sweep import main as sweep_main

    sweep_dir, _ = sweep
    capsys.readouterr()
    assert sweep_main(["status", str(sweep_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["runs"]
    assert sorted((r["values"]["train.lr"], r["state"]) for r in rows) == sorted(
        [(lr, "finished") for lr in LRS] * 4), rows


def test_report_files_and_table(sweep):
    sweep_dir, report = sweep
    names = sorted(os.listdir(report))
    assert "REPORT.md" in names and "report.html" in names
    pngs = [n for n in names if n.endswith(".png")]
    # per column: loss against lr, loss curves and layer statistics; the 3-layer column also the depth analyses of
    # its lns run
    assert sorted(pngs) == sorted(["lr_n_layers=2.png", "loss_n_layers=2.png", "layers_n_layers=2.png",
                                   "lr_n_layers=3.png", "loss_n_layers=3.png", "layers_n_layers=3.png",
                                   "depth_n_layers=3.png", "skip_n_layers=3.png"])
    for name in pngs:
        assert (report / name).read_bytes()[:8] == PNG_MAGIC
    text = (report / "REPORT.md").read_text()
    assert "## Table 1: validation perplexity at the best learning rate per scheme" in text
    table = markdown_table1(text)
    assert [row[0] for row in table] == ["norm scheme", "pre_ln", "lns"]
    assert table[0][1].startswith("n_layers=2 (") and table[0][2].startswith("n_layers=3 (")
    bpb_table = markdown_table1(text, "## Table 1b:")  # the same evaluations in bits per byte
    assert bpb_table[0] == table[0] and [row[0] for row in bpb_table] == ["norm scheme", "pre_ln", "lns"]
    for j, layers in enumerate((2, 3), start=1):
        # each scheme at its best lr of the column (every run of this sweep trains to its end: no divergence)
        runs = {(s, lr): sweep_dir / f"norm_scheme={s},n_layers={layers},lr={lr}"
                for s in ("pre_ln", "lns") for lr in LRS}
        best_lr = {s: min(LRS, key=lambda lr: final_ppl(runs[s, lr])) for s in ("pre_ln", "lns")}
        expected = {s: final_ppl(runs[s, best_lr[s]]) for s in best_lr}
        best = min(expected, key=expected.get)
        for row in table[1:]:
            want = f"{expected[row[0]]:.2f} (lr {best_lr[row[0]]})"
            assert row[j] == (f"**{want}**" if row[0] == best else want), (row, expected)
        for row in bpb_table[1:]:
            assert row[j].strip("*") == f"{final_bpb(runs[row[0], best_lr[row[0]]]):.4f} (lr {best_lr[row[0]]})", row
    for name in pngs:
        assert f"]({name})" in text
    page = (report / "report.html").read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == len(pngs)
    assert not re.search(r'(src|href)="(?!data:)', page), "report.html must be self-contained"


def test_report_replaces_an_earlier_report_and_refuses_other_folders(sweep, tmp_path, capsys):
    sweep_dir, report = sweep
    run = sweep_dir / f"norm_scheme=pre_ln,n_layers=2,lr={LRS[0]}"
    out = tmp_path / "r"
    lns = sweep_dir / f"norm_scheme=lns,n_layers=2,lr={LRS[0]}"
    assert main(["report", str(run), str(lns), "--out", str(out)]) == 0
    assert "## Table 1: validation perplexity\n" in (out / "REPORT.md").read_text()  # one lr: today's Table 1
    assert main(["report", str(run), "--out", str(out), "--title", "again"]) == 0  # replaced
    assert (out / "REPORT.md").read_text().startswith("# again\n")
    assert not [n for n in os.listdir(tmp_path) if n != "r"], "temporary folders left behind"
    capsys.readouterr()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    for argv, message in ([[str(run), "--out", str(other)], "holds no earlier report"],
                          [[str(tmp_path / "nope"), "--out", str(tmp_path / "x")], "does not exist"],
                          [[str(run), "--out", str(tmp_path / "x"), "--columns", "model.nope"], "--columns model.nope"]):
        assert main(["report", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert os.listdir(other) == ["notes.txt"] and not (tmp_path / "x").exists()


HARNESS = """<!DOCTYPE html><html><body>
<iframe id="r" src="report.html" style="width:1300px;height:900px"></iframe>
<script>
document.getElementById("r").addEventListener("load", () => {
  const doc = document.getElementById("r").contentDocument;
  const out = {};
  const t = doc.getElementById("table1");
  if (t) {
    const box = t.getBoundingClientRect();
    out.table = {width: box.width, height: box.height,
      rows: [...t.rows].map(r => [...r.cells].map(c => c.textContent.trim())),
      best: [...t.querySelectorAll("td.best")].map(c => [c.textContent.trim(), getComputedStyle(c).fontWeight])};
  }
  out.images = [...doc.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]);
  const pre = document.createElement("pre");
  pre.id = "result";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script></body></html>
"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
def test_report_renders_in_a_headless_browser(sweep, tmp_path):
    """The page in a real browser: a harness page frames report.html and reads back Table 1 as laid out (cell
    texts, size on screen, the weight of the best cells) and whether every embedded image decoded."""
    _, report = sweep
    shutil.copy(report / "report.html", tmp_path / "report.html")
    (tmp_path / "harness.html").write_text(HARNESS)
    out = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          "--virtual-time-budget=15000", "--dump-dom", (tmp_path / "harness.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="result">(.*?)</pre>', out.stdout, re.S)
    assert found, f"no result from the browser (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    seen = json.loads(html.unescape(found.group(1)))
    md = markdown_table1((report / "REPORT.md").read_text())
    assert seen["table"]["rows"] == [[c.strip("*") for c in row] for row in md], seen["table"]
    assert seen["table"]["width"] > 200 and seen["table"]["height"] > 50, seen["table"]
    assert len(seen["table"]["best"]) == 2 and all(int(w) >= 700 for _, w in seen["table"]["best"]), seen["table"]
    pngs = [n for n in os.listdir(report) if n.endswith(".png")]
    assert len(seen["images"]) == len(pngs) and all(ok and w > 100 and h > 100 for ok, w, h in seen["images"]), seen

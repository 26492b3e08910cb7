"""`pretrain report` on a learning-rate sweep: Table 1 as the best learning rate per scheme, chosen by hand on
made-up runs (seeds averaged, a diverged run never the best), its cells' text, the loss-vs-lr figure, and
`launch.sweep`'s plan of an lr grid. The real sweep with an lr axis: tests/pretrain/analysis/test_report.py."""

from __future__ import annotations

import io
import math
import os
import statistics

import pytest
from helpers.train import REPO

from pretrain.analysis import figures
from pretrain.analysis.report import report_blocks, table1_block
from pretrain.analysis.report_table import Run, build_table, column_keys, lr_text, row_differences
from pretrain.errors import UserError


def run(scheme: str, layers: int, lr: float, ppls: list[float], seed: int = 0, diverged: bool = False) -> Run:
    """A run folder as read: validation perplexities at 100, 200, ... tokens; `diverged`: its trainer stopped for
    non-finite steps (exit 3)."""
    flat = {"model.norm_scheme": scheme, "model.n_layers": layers, "train.lr": lr, "train.seed": seed,
            "train.steps": 100, "eval.tokens": 1000, "data.seq_len": 64, "data.paths": ["d"],
            "run.dir": f"r/{scheme}-{layers}-{lr}-{seed}"}
    val = [{"step": 10 * (i + 1), "tokens": 100 * (i + 1), "val_loss": math.log(p), "val_ppl": p}
           for i, p in enumerate(ppls)]
    return Run(path=f"/r/{scheme}-{layers}-{lr}-{seed}", name=f"{scheme}-{layers}-lr{lr}-s{seed}", config=flat,
               scheme=scheme, train=[{"step": 100, "loss": float("nan") if diverged else 3.0,
                                      "consumed_tokens": 100 * len(ppls)}],
               val=val, exit_codes=[3] if diverged else [], params=1000 * layers)


def sweep_runs() -> list[Run]:
    return [
        # pre_ln, 4 layers: 3e-3 wins on the seeds' mean (30 ± 1) though one seed of 1e-2 is lower (28)
        run("pre_ln", 4, 1e-3, [60.0, 40.0]),
        run("pre_ln", 4, 1e-3, [61.0, 41.0], seed=1),
        run("pre_ln", 4, 3e-3, [50.0, 29.0]),
        run("pre_ln", 4, 3e-3, [51.0, 31.0], seed=1),
        run("pre_ln", 4, 1e-2, [45.0, 28.0]),
        run("pre_ln", 4, 1e-2, [47.0, 34.0], seed=1),
        # lns, 4 layers: 1e-2's seed 0 has the lowest perplexity of the column, but seed 1 diverged
        run("lns", 4, 1e-3, [55.0, 35.0]),
        run("lns", 4, 1e-3, [56.0, 36.0], seed=1),
        run("lns", 4, 3e-3, [50.0, 33.0]),
        run("lns", 4, 3e-3, [50.0, 32.0], seed=1),
        run("lns", 4, 1e-2, [40.0, 20.0]),
        run("lns", 4, 1e-2, [40.0], seed=1, diverged=True),
        # 8 layers, one seed: post_ln diverged at every lr
        run("pre_ln", 8, 1e-3, [50.0, 30.0]),
        run("pre_ln", 8, 3e-3, [45.0, 26.0]),
        run("pre_ln", 8, 1e-2, [44.0, 27.0]),
        run("lns", 8, 1e-3, [48.0, 25.0]),
        run("lns", 8, 3e-3, [47.0, 24.5]),
        run("lns", 8, 1e-2, [46.0, 26.0]),
        run("post_ln", 8, 1e-3, [90.0], diverged=True),
        run("post_ln", 8, 3e-3, [80.0], diverged=True),
    ]


def test_best_lr_table_chosen_on_the_seed_mean_and_never_a_diverged_run():
    runs = sweep_runs()
    keys = column_keys(runs)
    assert keys == ["model.n_layers"]  # lr and seed are no columns: grouped in each cell
    assert column_keys(runs, ["model.norm_scheme", "model.n_layers", "train.lr", "train.seed"]) == ["model.n_layers"]
    table = build_table(runs, keys)
    assert table.by_lr and table.columns == ["n_layers=4", "n_layers=8"]
    assert table.rows == ["pre_ln", "lns", "post_ln"]
    assert table.tokens == {"n_layers=4": 200, "n_layers=8": 200}  # diverged runs do not pull T down
    c = table.cells
    pre4 = c["pre_ln", "n_layers=4"]  # seed means: 1e-3 40.5, 3e-3 30.0, 1e-2 31.0
    assert pre4.lr == 3e-3 and pre4.ppl == pytest.approx(30.0) and pre4.std == pytest.approx(math.sqrt(2.0))
    assert [r.config["train.seed"] for r in pre4.runs] == [0, 1]
    lns4 = c["lns", "n_layers=4"]  # 1e-2 (20.0 on seed 0) has a diverged seed: 3e-3 (32.5) is its best
    assert lns4.lr == 3e-3 and lns4.ppl == pytest.approx(32.5) and lns4.std == pytest.approx(math.sqrt(0.5))
    assert pre4.best and not lns4.best
    assert [cell.lr for cell in table.lr_cells["lns", "n_layers=4"]] == [1e-3, 3e-3, 1e-2]
    assert table.lr_cells["lns", "n_layers=4"][2].diverged
    assert c["pre_ln", "n_layers=8"].lr == 3e-3 and c["pre_ln", "n_layers=8"].std is None
    assert c["lns", "n_layers=8"].lr == 3e-3 and c["lns", "n_layers=8"].ppl == 24.5 and c["lns", "n_layers=8"].best
    post8 = c["post_ln", "n_layers=8"]
    assert post8.diverged and post8.ppl is None and post8.lr is None and not post8.best

    block = table1_block(table)
    cells = {row[0][0]: [text for text, _ in row[1:]] for row in block.rows}
    assert cells["pre_ln"] == ["30.00 ± 1.41 (lr 3e-3)", "26.00 (lr 3e-3)"]
    assert cells["lns"] == ["32.50 ± 0.71 (lr 3e-3)", "24.50 (lr 3e-3)"]
    assert cells["post_ln"] == ["", "diverged (at every lr)"]
    assert "best learning rate" in block.caption and "1e-3, 3e-3, 1e-2" in block.caption
    # the lr and the seed are what a cell groups by design, not a setting that differs between rows
    assert row_differences(runs, table.keys + table.grouped_keys) == []


def test_table_unchanged_without_an_lr_sweep_or_with_lr_as_a_column():
    one_lr = [r for r in sweep_runs() if r.config["train.lr"] == 3e-3 and r.config["train.seed"] == 0]
    table = build_table(one_lr, column_keys(one_lr))
    assert not table.by_lr and table.grouped_keys == []
    assert table.cells["pre_ln", "n_layers=4"].lr is None
    assert [text for text, _ in table1_block(table).rows[0][1:]] == ["29.00", "26.00"]
    runs = sweep_runs()
    by_column = build_table(runs, ["model.n_layers", "train.lr"])  # --columns model.n_layers train.lr
    assert not by_column.by_lr and "n_layers=4, lr=0.003" in by_column.columns
    assert by_column.cells["lns", "n_layers=4, lr=0.01"].diverged


def test_loss_vs_lr_figure_per_column_in_the_report():
    runs = sweep_runs()
    table = build_table(runs, column_keys(runs))
    fig = figures.lr_figure(table, "n_layers=4")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["pre_ln", "lns"]
    lines = [line for line in ax.lines if line.get_linestyle() == "-"]
    (pre_x, pre_y), (lns_x, lns_y) = [(list(line.get_xdata()), list(line.get_ydata())) for line in lines]
    assert pre_x == [1e-3, 3e-3, 1e-2] and lns_x == [1e-3, 3e-3]  # a diverged run's lr is left out
    # the seeds' mean validation loss at the column's tokens, their standard deviation as the error bar
    assert pre_y[1] == pytest.approx(statistics.fmean([math.log(29.0), math.log(31.0)]))
    bars = [c for c in ax.collections if c.__class__.__name__ == "LineCollection"]
    (lo, hi) = bars[0].get_segments()[1][:, 1]
    assert hi - lo == pytest.approx(2 * statistics.stdev([math.log(29.0), math.log(31.0)]))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figures.lr_figure(table, "n_layers=8") is not None  # post_ln has no point there; the others do
    assert figures.lr_figure(build_table(runs, ["model.n_layers", "train.lr"]), "n_layers=4, lr=0.01") is None

    blocks, images = report_blocks(runs, table, "t", ["/r"])
    assert {"lr_n_layers=4.png", "lr_n_layers=8.png"} <= set(images)
    assert ("h2", "Table 1: validation perplexity at the best learning rate per scheme") in blocks
    assert ("img", "lr_n_layers=4.png", "Validation loss against learning rate: n_layers=4") in blocks
    runs_table = next(b[1] for b in blocks if b[0] == "table" and b[1].id == "runs")
    assert runs_table.header[3] == "lr" and runs_table.rows[0][3] == ("1e-3", "")


def test_lr_text():
    assert [lr_text(v) for v in (3e-3, 0.00025, 1e-2, 0.1, 1.0)] == ["3e-3", "2.5e-4", "1e-2", "1e-1", "1e0"]


def test_sweep_plans_an_lr_grid_and_refuses_one_value_written_twice(tmp_path):
    from launch.sweep import build_parser, plan

    config = os.path.join(REPO, "configs", "tiny.yaml")
    args = build_parser().parse_args([config, "train.steps=4", "--grid", "model.norm_scheme=pre_ln,lns",
                                      "train.lr=1e-3,3e-3", "--root", str(tmp_path), "--name", "lr"])
    sweep_dir, axes, runs = plan(args)
    assert axes == [("model.norm_scheme", ["pre_ln", "lns"]), ("train.lr", ["1e-3", "3e-3"])]
    assert [r[0].rsplit("/", 1)[1] for r in runs] == ["norm_scheme=pre_ln,lr=1e-3", "norm_scheme=pre_ln,lr=3e-3",
                                                       "norm_scheme=lns,lr=1e-3", "norm_scheme=lns,lr=3e-3"]
    assert runs[1][1][-2:] == ["train.lr=3e-3", f"run.dir={tmp_path}/lr/norm_scheme=pre_ln,lr=3e-3"]
    same = build_parser().parse_args([config, "--grid", "train.lr=1e-3,0.001", "--root", str(tmp_path)])
    with pytest.raises(UserError, match="runs lr=1e-3 and lr=0.001 have the same config"):
        plan(same)
    assert not any(tmp_path.iterdir()), "planning creates no folder"


"""`pretrain plot RUN_DIR [RUN_DIR ...] --out FILE`: per-layer statistics against depth, and loss, of run folders.

Reads each run folder's layer_stats.jsonl (written when diagnostics.interval > 0, see pretrain/diagnostics/),
metrics.jsonl and config.yaml (pretrain/analysis/report_table.py's read_run). One line per run (and per chosen
step), labelled by the run's norm scheme (plus the folder name when two runs share a scheme). One panel per
figure entry of the statistics registry (pretrain/diagnostics/stats.py: today the residual variance after block l
and the gradient norm of block l's parameters, against l, log scale), then the training loss (and validation
loss, dashed, where logged) against step (the figure: pretrain/analysis/figures.py's plot_figure).

`--steps` picks the measured steps to draw (default: each run's last measured step). Headless (Agg); the
figure format follows the --out extension (png, pdf, svg, ...).
"""

from __future__ import annotations

import os

from pretrain import runs as run_folder
from pretrain.analysis.figures import label_runs, plot_figure, save_figure
from pretrain.analysis.report_table import Run, read_run
from pretrain.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("plot", help="plot variance and gradient norm against depth, and loss, of run folders")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders trained with diagnostics.interval > 0")
    p.add_argument("--out", required=True, help="image file to write, e.g. depth.png (format from the extension)")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="measured steps to draw (default: each run's last measured step)")
    p.set_defaults(func=run)


def check_layer_stats(run: Run) -> None:
    """One-line UserErrors for a run without per-layer statistics to draw."""
    path = os.path.join(run.path, run_folder.LAYER_STATS_FILE)
    if not os.path.isfile(path):
        raise UserError(
            f"{run.path} has no {run_folder.LAYER_STATS_FILE}; train with diagnostics.interval=N (e.g. 50) to record "
            "per-layer statistics"
        )
    if not run.layer_stats:
        raise UserError(f"{path} is empty: the run stopped before its first measured step (diagnostics.interval)")


def run(args) -> int:
    import matplotlib  # the plotting library loads only for the command that draws

    matplotlib.use("Agg")
    runs = [read_run(p) for p in args.run_dirs]
    for r in runs:
        check_layer_stats(r)
    label_runs(runs)
    save_figure(plot_figure(runs, args.steps), args.out)
    print(f"wrote {args.out} ({len(runs)} run(s): {', '.join(r.label for r in runs)})")
    return 0

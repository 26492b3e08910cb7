"""`pretrain report RUN_DIR...|SWEEP_ROOT --out DIR`: REPORT.md and report.html of runs or a sweep
(pretrain/analysis/report.py)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="REPORT.md + report.html of runs or a sweep: Table 1, loss curves, depth plots")
    p.add_argument("paths", nargs="+", metavar="RUN_DIR|SWEEP_ROOT",
                   help="run folders, or a sweep folder (launch/sweep.py's ROOT/NAME) holding them")
    p.add_argument("--out", required=True, help="output folder (created; an earlier report there is replaced)")
    p.add_argument("--columns", nargs="+", default=None, metavar="KEY",
                   help="config keys that make the table's columns, e.g. model.n_layers (default: the sweep's grid "
                        "keys, else the keys that vary among runs of one scheme)")
    p.add_argument("--diverged-ppl", type=float, default=1000.0,
                   help="flag a run as diverged above this validation perplexity (default 1000, as the paper)")
    p.add_argument("--title", default="Normalization ablation", help="the report's title")
    p.set_defaults(func=run)


def run(args) -> int:
    # matplotlib and torch load only for the command that draws
    from pretrain.analysis.report import cmd_report

    return cmd_report(args)

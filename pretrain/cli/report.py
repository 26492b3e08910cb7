"""`pretrain report RUN_DIR...|SWEEP_ROOT --out DIR`: REPORT.md and report.html of runs or a sweep
(the content: pretrain/analysis/report.py; Table 1: report_table.py; the pictures: figures.py)."""

from __future__ import annotations

import os

from pretrain.analysis.report import REPORT_HTML, REPORT_MD, report_blocks, write_report
from pretrain.analysis.report_table import (build_table, column_keys, expand_inputs, lr_text, read_run,
                                            sweep_axes)
from pretrain.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("report", help="REPORT.md + report.html of runs or a sweep: Table 1, loss curves, depth plots")
    p.add_argument("paths", nargs="+", metavar="RUN_DIR|SWEEP_ROOT",
                   help="run folders, or a sweep folder (launch/sweep.py's ROOT/NAME) holding them")
    p.add_argument("--out", required=True, help="output folder (created; an earlier report there is replaced)")
    p.add_argument("--columns", nargs="+", default=None, metavar="KEY",
                   help="config keys that make the table's columns, e.g. model.n_layers (default: the sweep's grid "
                        "keys, else the keys that vary among runs of one scheme; when the runs differ in train.lr "
                        "and it is not a column, each cell is the scheme at its best lr, seeds averaged)")
    p.add_argument("--diverged-ppl", type=float, default=None, metavar="PPL",
                   help="also flag a run as diverged above this validation perplexity (the paper: 1000, for its "
                        "long runs); by default diverged means a non-finite loss or a validation loss that rose at "
                        "each of the last evaluations")
    p.add_argument("--title", default="Normalization ablation", help="the report's title")
    p.set_defaults(func=run)


def run(args) -> int:
    import matplotlib  # the plotting library loads only for the command that draws

    matplotlib.use("Agg")
    out = os.path.abspath(args.out)
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise UserError(f"--out {args.out}: folder {parent} does not exist")
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, REPORT_MD)):
        raise UserError(f"--out {args.out} exists and holds no earlier report; choose a new folder")
    if args.diverged_ppl is not None and args.diverged_ppl <= 1:
        raise UserError(f"--diverged-ppl must be > 1, got {args.diverged_ppl}")
    paths = expand_inputs(args.paths)
    runs = [read_run(p) for p in paths]
    keys = args.columns if args.columns is not None else column_keys(runs, sweep_axes(args.paths))
    table = build_table(runs, keys, args.diverged_ppl)
    blocks, images = report_blocks(runs, table, args.title, args.paths)
    write_report(out, blocks, images)
    best = [f"{col}: {s}" + (f" (lr {lr_text(c.lr)})" if c.lr is not None else "")
            for (s, col), c in table.cells.items() if c.best]
    print(f"wrote {args.out}/{REPORT_MD} and {REPORT_HTML}: {len(runs)} run(s), {len(table.rows)} scheme(s) x "
          f"{len(table.columns)} column(s); best per column: {'; '.join(best) or 'none'}")
    return 0

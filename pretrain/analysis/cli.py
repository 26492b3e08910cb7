"""The diagnostics subcommands of `pretrain`: `plot` (pretrain/analysis/plot.py), `analyze-depth`
(pretrain/analysis/depth.py) and `report` (pretrain/analysis/report.py)."""

from __future__ import annotations


def register(sub) -> None:
    _register_report(sub)
    p = sub.add_parser("plot", help="plot variance and gradient norm against depth, and loss, of run folders")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders trained with diagnostics.interval > 0")
    p.add_argument("--out", required=True, help="image file to write, e.g. depth.png (format from the extension)")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="measured steps to draw (default: each run's last measured step)")
    p.set_defaults(func=_plot)

    p = sub.add_parser("analyze-depth", help="per-layer angular distance and skip-one-block loss of a checkpoint")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoints/step_XXXXXXXX folder, a checkpoints/ folder or a run folder (its latest)")
    p.add_argument("--data", required=True, help="a prepared data folder or bundled:tinyshakespeare")
    p.add_argument("--out", required=True, help="output directory (must not exist): depth.json and depth.png")
    p.add_argument("--batches", type=int, default=4, help="validation micro-batches to evaluate (default 4)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="default: the run's train.micro_batch_size")
    p.add_argument("--seq-len", type=int, default=None, help="default: the run's data.seq_len")
    p.add_argument("--split", default="val", help="data split to evaluate (default val)")
    p.set_defaults(func=_analyze_depth)

    p = sub.add_parser("attribute", help="exact direct logit attribution per block of a norm-free (ln_free) model")
    p.add_argument("--checkpoint", required=True,
                   help="an ln_free checkpoint (e.g. RUN_DIR/ln_free of remove-norms), step/checkpoints/run folder")
    p.add_argument("--data", required=True, help="a prepared data folder or bundled:tinyshakespeare")
    p.add_argument("--out", required=True, help="output directory (must not exist): attribution.json and .png")
    p.add_argument("--batches", type=int, default=4, help="validation micro-batches to evaluate (default 4)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="default: the run's train.micro_batch_size")
    p.add_argument("--seq-len", type=int, default=None, help="default: the run's data.seq_len")
    p.add_argument("--split", default="val", help="data split to evaluate (default val)")
    p.set_defaults(func=_attribute)


def _plot(args) -> int:
    from pretrain.analysis.plot import cmd_plot

    return cmd_plot(args)


def _analyze_depth(args) -> int:
    from pretrain.analysis.depth import cmd_analyze_depth

    return cmd_analyze_depth(args)


def _attribute(args) -> int:
    from pretrain.analysis.attribution import cmd_attribute

    return cmd_attribute(args)


def _register_report(sub) -> None:
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
    p.set_defaults(func=_report)


def _report(args) -> int:
    from pretrain.analysis.report import cmd_report

    return cmd_report(args)

"""`pretrain plot RUN_DIR... --out FILE`: variance and gradient norm against depth, and loss, of run folders."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("plot", help="plot variance and gradient norm against depth, and loss, of run folders")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders trained with diagnostics.interval > 0")
    p.add_argument("--out", required=True, help="image file to write, e.g. depth.png (format from the extension)")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="measured steps to draw (default: each run's last measured step)")
    p.set_defaults(func=run)


def run(args) -> int:
    # matplotlib and torch load only for the command that draws
    from pretrain.analysis.plot import cmd_plot

    return cmd_plot(args)

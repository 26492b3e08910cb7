"""Seeing what a model does: per-layer diagnostics during training, plots of runs, depth analyses of checkpoints.

    diagnostics.py  per-layer variance, branch ratios, angular distance and gradient norms (layer_stats.jsonl)
    plot.py         `pretrain plot`: variance and gradient norm against depth, loss curves, from run folders
    depth.py        `pretrain analyze-depth`: per-layer analyses of a checkpoint (Csordas et al.'s included)
    report.py       `pretrain report`: REPORT.md + report.html of runs or a sweep
    report_runs.py  the report's data: run folders read, Table 1 at equal tokens
    report_figures.py  the report's pictures
    cli.py          the subcommands' parsers

Nothing here imports the `pretrain` CLI; the training loop imports `diagnostics` only.
"""

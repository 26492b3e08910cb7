"""`pretrain plot RUN_DIR [RUN_DIR ...] --out FILE.png`: variance and gradient norm against depth, and loss curves.

Reads each run folder's layer_stats.jsonl (written when diagnostics.interval > 0, see pretrain/diagnostics/),
metrics.jsonl and config.yaml. One line per run (and per chosen step), labelled by the run's norm scheme
(plus the folder name when two runs share a scheme). Three panels:

    variance of the residual stream after block l against l (log scale)
    gradient norm of block l's parameters against l (log scale)
    training loss (and validation loss, dashed, where logged) against step

`--steps` picks the measured steps to draw (default: each run's last measured step). Headless (Agg); the
figure format follows the --out extension (png, pdf, svg, ...).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from pretrain.errors import UserError


@dataclass
class Run:
    path: str
    scheme: str
    layer_stats: list[dict]
    metrics: list[dict]
    label: str = ""


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}: line {n} is not valid JSON (a file cut short?)") from None
    return rows


def read_run(path: str) -> Run:
    """A run folder's layer stats, metrics and norm scheme; one-line UserErrors for what is missing."""
    if not os.path.isdir(path):
        raise UserError(f"run folder {path} does not exist")
    stats_path = os.path.join(path, "layer_stats.jsonl")
    if not os.path.isfile(stats_path):
        raise UserError(
            f"{path} has no layer_stats.jsonl; train with diagnostics.interval=N (e.g. 50) to record per-layer "
            "statistics"
        )
    stats = sorted(_read_jsonl(stats_path), key=lambda r: r["step"])
    if not stats:
        raise UserError(f"{stats_path} is empty: the run stopped before its first measured step (diagnostics.interval)")
    metrics_path = os.path.join(path, "metrics.jsonl")
    metrics = _read_jsonl(metrics_path) if os.path.isfile(metrics_path) else []
    scheme = stats[-1].get("norm_scheme")
    config_path = os.path.join(path, "config.yaml")
    if os.path.isfile(config_path):
        import yaml

        with open(config_path) as f:
            scheme = ((yaml.safe_load(f) or {}).get("model") or {}).get("norm_scheme", scheme)
    return Run(path, scheme or "?", stats, metrics)


def label_runs(runs: list[Run]) -> None:
    """Label = norm scheme, plus the folder name where schemes repeat."""
    schemes = [r.scheme for r in runs]
    for r in runs:
        name = os.path.basename(os.path.normpath(r.path))
        r.label = r.scheme if schemes.count(r.scheme) == 1 else f"{r.scheme} ({name})"


def pick_steps(run: Run, steps: list[int] | None) -> list[dict]:
    by_step = {r["step"]: r for r in run.layer_stats}
    if not steps:
        return [run.layer_stats[-1]]
    missing = [s for s in steps if s not in by_step]
    if missing:
        have = sorted(by_step)
        shown = ", ".join(map(str, have[:10])) + (", ..." if len(have) > 10 else "")
        raise UserError(f"{run.path} has no layer statistics at step {missing[0]}; measured steps: {shown}")
    return [by_step[s] for s in steps]


def _positive(values: list) -> list[float]:
    return [v if v is not None and math.isfinite(v) and v > 0 else math.nan for v in values]


def plot_runs(runs: list[Run], steps: list[int] | None = None):
    """The three-panel matplotlib Figure (no pyplot, so no display is needed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.8), layout="constrained")
    ax_var, ax_grad, ax_loss = fig.subplots(1, 3)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors):
        picked = pick_steps(run, steps)
        for j, record in enumerate(picked):
            layers = list(range(1, record["layers"] + 1))
            # several steps: earlier ones fainter
            alpha = 1.0 if len(picked) == 1 else 0.35 + 0.65 * j / (len(picked) - 1)
            label = run.label if len(picked) == 1 else f"{run.label} @ {record['step']}"
            ax_var.plot(layers, _positive(record["variance"]), "o-", color=color, alpha=alpha, label=label, ms=3)
            ax_grad.plot(layers, _positive(record["grad_norm"]), "o-", color=color, alpha=alpha, label=label, ms=3)
        train = [(m["step"], m["loss"]) for m in run.metrics if "loss" in m]
        val = [(m["step"], m["val_loss"]) for m in run.metrics if "val_loss" in m]
        if train:
            ax_loss.plot(*zip(*train), color=color, label=run.label, lw=1)
        if val:
            ax_loss.plot(*zip(*val), "--", color=color, marker="o", ms=3, label=f"{run.label} (val)")
    when = "last measured step" if not steps else "step " + ", ".join(map(str, steps))
    ax_var.set(xlabel="layer", ylabel="output variance", yscale="log", title=f"Residual variance vs depth ({when})")
    ax_grad.set(xlabel="layer", ylabel="gradient norm", yscale="log", title="Block gradient norm vs depth")
    ax_loss.set(xlabel="step", ylabel="loss", title="Loss")
    for ax in (ax_var, ax_grad):
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in (ax_var, ax_grad, ax_loss):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return fig


def variance_figure(history: list[dict]):
    """Variance against depth, one line per entry {"step", "variance"} (the TensorBoard image)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for j, entry in enumerate(history):
        layers = list(range(1, len(entry["variance"]) + 1))
        shade = 0.25 + 0.75 * j / max(1, len(history) - 1)
        ax.plot(layers, _positive(entry["variance"]), "o-", ms=3, color=(0.1, 0.3, 0.8, shade),
                label=f"step {entry['step']}")
    ax.set(xlabel="layer", ylabel="output variance", yscale="log", title="Residual variance vs depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def save_figure(fig, out: str) -> None:
    """Save atomically (temp file, then rename), with one-line errors for a bad --out."""
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UserError(f"--out {out}: folder {parent} does not exist")
    ext = os.path.splitext(out)[1].lstrip(".").lower()
    formats = fig.canvas.get_supported_filetypes()
    if ext not in formats:
        raise UserError(f"--out {out}: unknown image format {ext!r}; use one of {', '.join(sorted(formats))}")
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, format=ext, dpi=120)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cmd_plot(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    runs = [read_run(p) for p in args.run_dirs]
    label_runs(runs)
    fig = plot_runs(runs, args.steps)
    save_figure(fig, args.out)
    print(f"wrote {args.out} ({len(runs)} run(s): {', '.join(r.label for r in runs)})")
    return 0

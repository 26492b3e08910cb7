"""The pictures of `pretrain report`, one set per column group of the table (matplotlib, headless).

Each norm scheme keeps its colour across all figures (its position in models.norms.NORM_SCHEMES).

    loss_figure            training loss (thin) and validation loss (dashed, markers) against training tokens
    layer_stats_figure     residual variance and block gradient norm against depth at each run's last measured step
    depth_figure           analyze-depth results: angular distance, block contribution ||a+m||/||x||, logit lens KL
                           and skip-one-block loss increase against layer
    skip_effect_figure     analyze-depth's skip-effect heat map, one panel per run
"""

from __future__ import annotations

import math

import numpy as np

from pretrain.analysis.plot import _positive
from pretrain.analysis.plot import variance_figure as variance_vs_depth_figure  # noqa: F401  (unified next)
from pretrain.analysis.report_table import Run


def scheme_color(scheme: str) -> str:
    from models.norms import NORM_SCHEMES

    order = list(NORM_SCHEMES)
    return f"C{order.index(scheme) % 10}" if scheme in order else "k"


def run_labels(runs: list[Run]) -> dict[str, str]:
    """Scheme name, plus the folder name where a scheme repeats within the figure."""
    schemes = [r.scheme for r in runs]
    return {r.path: r.scheme if schemes.count(r.scheme) == 1 else f"{r.scheme} ({r.name})" for r in runs}


def _finite_or_nan(values) -> list[float]:
    return [v if isinstance(v, (int, float)) and math.isfinite(v) else math.nan for v in values]


def loss_figure(runs: list[Run], title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    labels = run_labels(runs)
    for r in runs:
        color = scheme_color(r.scheme)
        train = [(m["consumed_tokens"], m["loss"]) for m in r.train if "consumed_tokens" in m]
        if train:
            x, y = zip(*train)
            ax.plot(x, _finite_or_nan(y), color=color, lw=0.8, alpha=0.6, label=f"{labels[r.path]} train")
        if r.val:
            ax.plot([v["tokens"] for v in r.val], _finite_or_nan([v["val_loss"] for v in r.val]), "--o", ms=3,
                    color=color, label=f"{labels[r.path]} val")
    ax.set(xlabel="training tokens", ylabel="loss", title=f"Loss: {title}")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, ncols=2)
    return fig


def layer_stats_figure(runs: list[Run], title: str):
    """None when no run of the group has layer statistics (trained with diagnostics.interval=0)."""
    from matplotlib.figure import Figure

    measured = [r for r in runs if r.layer_stats]
    if not measured:
        return None
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_var, ax_grad = fig.subplots(1, 2)
    labels = run_labels(measured)
    for r in measured:
        last = r.layer_stats[-1]
        layers = list(range(1, last["layers"] + 1))
        label = f"{labels[r.path]} @ {last['step']}"
        ax_var.plot(layers, _positive(last["variance"]), "o-", ms=3, color=scheme_color(r.scheme), label=label)
        ax_grad.plot(layers, _positive(last["grad_norm"]), "o-", ms=3, color=scheme_color(r.scheme), label=label)
    ax_var.set(xlabel="layer", ylabel="output variance", yscale="log", title=f"Residual variance vs depth: {title}")
    ax_grad.set(xlabel="layer", ylabel="gradient norm", yscale="log", title="Block gradient norm vs depth")
    for ax in (ax_var, ax_grad):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def depth_figure(runs: list[Run], title: str):
    """None when no run of the group has an analyze-depth result."""
    from matplotlib.figure import Figure

    analysed = [r for r in runs if r.depth]
    if not analysed:
        return None
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2).flatten()
    panels = [("angular_distance", "angular distance / pi", "linear", "Input vs output of each block"),
              ("block_contribution", "||a+m|| / ||x||", "log", "Block contribution (Csordas et al.)"),
              ("logit_lens_kl", "KL(p_l || p_L)", "linear", "Logit lens"),
              ("skip_loss_increase", "validation loss increase", "linear", "Skipping one block")]
    labels = run_labels(analysed)
    for ax, (key, ylabel, scale, panel_title) in zip(axes, panels):
        for r in analysed:
            if key in r.depth:
                layers = list(range(1, r.depth["layers"] + 1))
                ax.plot(layers, _finite_or_nan(r.depth[key]), "o-", ms=3, color=scheme_color(r.scheme),
                        label=f"{labels[r.path]} @ {r.depth.get('step')}")
        ax.set(xlabel="layer", ylabel=ylabel, yscale=scale, title=panel_title)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"Depth analyses: {title}")
    return fig


def skip_effect_figure(runs: list[Run], title: str):
    """None when no run of the group has a skip-effect matrix."""
    from matplotlib.figure import Figure

    analysed = [r for r in runs if r.depth and r.depth.get("skip_effect")]
    if not analysed:
        return None
    n = len(analysed)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.6 * cols + 0.8, 3.3 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).flatten())
    matrices = []
    for r in analysed:
        m = np.array(r.depth["skip_effect"], dtype=float)
        m[np.tril_indices_from(m, -1)] = np.nan  # before the skipped block: 0 by definition, left blank
        matrices.append(m)
    vmax = max(1.0, max(float(np.nanmax(m)) for m in matrices))
    labels = run_labels(analysed)
    im = None
    for ax, r, m in zip(axes, analysed, matrices):
        L = m.shape[0]
        im = ax.imshow(m, vmin=0, vmax=vmax, cmap="viridis", interpolation="nearest",
                       extent=(0.5, L + 0.5, L + 0.5, 0.5))
        ax.set(xlabel="effect at layer", ylabel="layer skipped", title=labels[r.path])
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.colorbar(im, ax=list(axes[:n]), label="max relative change of contribution")
    fig.suptitle(f"Skipping block s: effect on block l's contribution: {title}")
    return fig

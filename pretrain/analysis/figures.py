"""Every figure of normlab, each drawn once here (matplotlib Figure objects, no pyplot: headless).

Per-layer panels come from the per-layer measure table (pretrain/diagnostics/measures.py): one panel per
FIGURE_STATS entry (today variance and grad_norm) and one per DEPTH_PANELS entry, so a table entry with
stats_panel=True appears in `pretrain plot` and in `pretrain report` alike, one with depth_panel=True in the
report's depth figure, with the entry's title, axis label and scale; depth.png takes its labels from the table too.

    variance_vs_depth_figure  TensorBoard's end-of-run image: variance against depth, one line per measured step
                              (pretrain/features.py hands it to the diagnostics hooks)
    plot_figure               `pretrain plot`: one panel per FIGURE_STATS entry against depth at the chosen steps,
                              and the training (and validation) loss against step
    lr_figure                 `pretrain report`, per column of a learning-rate sweep: validation loss against lr,
                              one line per scheme, seeds as error bars, each scheme's best lr starred
    loss_figure               `pretrain report`, per column: training and validation loss against training tokens
    layer_stats_figure        `pretrain report`, per column: one panel per FIGURE_STATS entry at each run's last
                              measured step
    depth_runs_figure         `pretrain report`, per column: analyze-depth results of the runs, one panel per
                              DEPTH_PANELS entry (angular distance, block contribution, logit lens KL, skip-one-block
                              loss increase)
    skip_effect_figure        `pretrain report`, per column: analyze-depth's skip-effect heat map, one panel per run
    depth_figure              `pretrain analyze-depth`: DIR/depth.png of one result
    attribution_figure        `pretrain attribute`: DIR/attribution.png of one result
    coord_check_figure        `pretrain coord-check`: DIR/coord_check.png, mean |coordinate| against width and depth

In the report each norm scheme keeps its colour across all figures (its position in models.norms.NORM_SCHEMES).
"""

from __future__ import annotations

import math
import os

import numpy as np

from pretrain.analysis.report_table import Run, Table, lr_text
from pretrain.diagnostics.measures import DEPTH_PANELS, FIGURE_STATS, LayerMeasure, measure
from pretrain.errors import UserError
from pretrain.files import atomic_writer


def _new_figure(**kwargs):
    # matplotlib loads on first draw: this module is imported by `pretrain train` (pretrain/features.py) and cli/
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


# ------------------------------------------------------------------------------------------------- helpers


def scheme_color(scheme: str) -> str:
    from models.norms import NORM_SCHEMES  # models imports torch: loaded on first draw, not with this module

    order = list(NORM_SCHEMES)
    return f"C{order.index(scheme) % 10}" if scheme in order else "k"


def run_labels(runs: list[Run]) -> dict[str, str]:
    """Scheme name, plus the folder name where a scheme repeats within the figure."""
    schemes = [r.scheme for r in runs]
    return {r.path: r.scheme if schemes.count(r.scheme) == 1 else f"{r.scheme} ({r.name})" for r in runs}


def label_runs(runs: list[Run]) -> None:
    """Set each run's `label` (run_labels) for `pretrain plot`'s legend and its printed line."""
    labels = run_labels(runs)
    for r in runs:
        r.label = labels[r.path]


def _positive(values) -> list[float]:
    return [v if isinstance(v, (int, float)) and math.isfinite(v) and v > 0 else math.nan for v in values]


def _finite_or_nan(values) -> list[float]:
    return [v if isinstance(v, (int, float)) and math.isfinite(v) else math.nan for v in values]


def _layer_axes(ax) -> None:
    """Integer layer ticks and a light grid: every against-layer panel."""
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)


def _layer_panel(ax, stat: LayerMeasure, curves: list[tuple[list, dict]], title: str, legend_size: int) -> None:
    """One training-time measure of the table against depth: `curves` = [(one value per block, line style)]."""
    for values, style in curves:
        ys = _positive(values) if stat.log_scale else _finite_or_nan(values)
        ax.plot(list(range(1, len(values) + 1)), ys, "o-", ms=3, **style)
    ax.set(xlabel="layer", ylabel=stat.label, yscale="log" if stat.log_scale else "linear", title=title)
    _layer_axes(ax)
    if ax.lines:
        ax.legend(fontsize=legend_size)


def pick_steps(run: Run, steps: list[int] | None) -> list[dict]:
    """The layer statistics of `run` at `steps` (default: its last measured step); a one-line UserError for a step
    that was not measured."""
    by_step = {r["step"]: r for r in run.layer_stats}
    if not steps:
        return [run.layer_stats[-1]]
    missing = [s for s in steps if s not in by_step]
    if missing:
        have = sorted(by_step)
        shown = ", ".join(map(str, have[:10])) + (", ..." if len(have) > 10 else "")
        raise UserError(f"{run.path} has no layer statistics at step {missing[0]}; measured steps: {shown}")
    return [by_step[s] for s in steps]


def save_figure(fig, out: str) -> None:
    """Save atomically (pretrain/files.py), with one-line errors for a bad --out."""
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UserError(f"--out {out}: folder {parent} does not exist")
    ext = os.path.splitext(out)[1].lstrip(".").lower()
    formats = fig.canvas.get_supported_filetypes()
    if ext not in formats:
        raise UserError(f"--out {out}: unknown image format {ext!r}; use one of {', '.join(sorted(formats))}")
    with atomic_writer(out) as f:
        fig.savefig(f, format=ext, dpi=120)


# ----------------------------------------------------------------------------------- per-layer statistics


def variance_vs_depth_figure(history: list[dict]):
    """Variance against depth, one line per entry {"step", "variance"}, later steps darker (TensorBoard's image)."""
    stat = measure("variance")
    fig = _new_figure(figsize=(6, 4))
    ax = fig.subplots()
    curves = [(entry["variance"], {"color": (0.1, 0.3, 0.8, 0.25 + 0.75 * j / max(1, len(history) - 1)),
                                   "label": f"step {entry['step']}"}) for j, entry in enumerate(history)]
    _layer_panel(ax, stat, curves, stat.title, legend_size=7)
    return fig


def plot_figure(runs: list[Run], steps: list[int] | None = None):
    """`pretrain plot`: one panel per FIGURE_STATS entry against depth (each run at `steps`, default its last
    measured step; several steps: earlier ones fainter), then the loss panel. Runs labelled by label_runs."""
    stats = FIGURE_STATS
    fig = _new_figure(figsize=(16 / 3 * (len(stats) + 1), 4.8))
    *stat_axes, ax_loss = fig.subplots(1, len(stats) + 1)
    curves: dict[str, list] = {s.name: [] for s in stats}
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        picked = pick_steps(run, steps)
        for j, record in enumerate(picked):
            alpha = 1.0 if len(picked) == 1 else 0.35 + 0.65 * j / (len(picked) - 1)
            label = run.label if len(picked) == 1 else f"{run.label} @ {record['step']}"
            for s in stats:
                if record.get(s.name) is not None:  # a file written before the statistic existed lacks it
                    curves[s.name].append((record[s.name], {"color": color, "alpha": alpha, "label": label}))
        train = [(m["step"], m["loss"]) for m in run.train]
        val = [(m["step"], m["val_loss"]) for m in run.val]
        if train:
            ax_loss.plot(*zip(*train), color=color, label=run.label, lw=1)
        if val:
            ax_loss.plot(*zip(*val), "--", color=color, marker="o", ms=3, label=f"{run.label} (val)")
    when = "last measured step" if not steps else "step " + ", ".join(map(str, steps))
    for k, (ax, s) in enumerate(zip(stat_axes, stats)):
        _layer_panel(ax, s, curves[s.name], f"{s.title} ({when})" if k == 0 else s.title, legend_size=8)
    ax_loss.set(xlabel="step", ylabel="loss", title="Loss")
    ax_loss.grid(alpha=0.3)
    if ax_loss.lines:
        ax_loss.legend(fontsize=8)
    return fig


def layer_stats_figure(runs: list[Run], title: str):
    """`pretrain report`: one panel per FIGURE_STATS entry at each run's last measured step; None when no run of the
    group has layer statistics (trained with diagnostics.interval=0)."""
    measured = [r for r in runs if r.layer_stats]
    if not measured:
        return None
    stats = FIGURE_STATS
    fig = _new_figure(figsize=(5.5 * len(stats), 4))
    axes = np.atleast_1d(fig.subplots(1, len(stats)))
    labels = run_labels(measured)
    for k, (ax, s) in enumerate(zip(axes, stats)):
        curves = []
        for r in measured:
            last = r.layer_stats[-1]
            if last.get(s.name) is not None:
                curves.append((last[s.name], {"color": scheme_color(r.scheme),
                                              "label": f"{labels[r.path]} @ {last['step']}"}))
        _layer_panel(ax, s, curves, f"{s.title}: {title}" if k == 0 else s.title, legend_size=7)
    return fig


def lr_figure(table: Table, column: str):
    """`pretrain report`, per column of a learning-rate sweep (Table.by_lr): each scheme's validation loss at the
    column's tokens (Table 1's evaluations) against train.lr on a log axis, the mean over seeds with their standard
    deviation as error bars, the lr Table 1 chose starred; a learning rate where a run diverged is left out. None
    when train.lr is not swept or no learning rate of the column has a finite loss without a diverged run."""
    curves = {scheme: [c for c in table.lr_cells.get((scheme, column), []) if c.loss is not None and not c.diverged]
              for scheme in table.rows}
    if not any(curves.values()):
        return None
    fig = _new_figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for scheme, shown in curves.items():
        if not shown:
            continue
        color = scheme_color(scheme)
        ax.errorbar([c.lr for c in shown], [c.loss for c in shown], yerr=[c.loss_std or 0.0 for c in shown],
                    fmt="-o", ms=4, capsize=3, color=color, label=scheme)
        best = table.cells.get((scheme, column))
        if best is not None and best.lr is not None and best.loss is not None:
            ax.plot([best.lr], [best.loss], "*", ms=13, color=color, markeredgecolor="k")
    ax.set_xscale("log")
    lrs = sorted({c.lr for (_, col), cells in table.lr_cells.items() if col == column for c in cells
                  if isinstance(c.lr, (int, float))})
    ax.set_xticks(lrs, [lr_text(v) for v in lrs], minor=False)
    ax.minorticks_off()
    ax.set(xlabel="train.lr", ylabel="validation loss", title=f"Loss against learning rate: {column}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def loss_figure(runs: list[Run], title: str):
    """`pretrain report`: training loss (thin) and validation loss (dashed, markers) against training tokens."""
    fig = _new_figure(figsize=(7, 4.2))
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


# --------------------------------------------------------------------------------- analyze-depth, attribute


# depth.png's sublayer-contribution panel: one line per measure, its legend the sublayer and the table's label
CONTRIBUTIONS = (("attention", "attn_contribution"), ("MLP", "mlp_contribution"), ("block", "block_contribution"))


def _depth_axes(ax, m: LayerMeasure, xlabel: str = "layer", title: str | None = None) -> None:
    """An analyze-depth measure's panel: the table's label, scale and (unless given) title."""
    ax.set(xlabel=xlabel, ylabel=m.label, yscale="log" if m.log_scale else "linear", title=title or m.title)
    _layer_axes(ax)


def _layer_positions(result: dict, key: str) -> list[int]:
    """x positions of a per-layer list: blocks 1..L, or 0..L where the list starts at the embedding (the logit lens;
    depth.json files written before it did have L entries)."""
    start = 0 if len(result[key]) == result["layers"] + 1 else 1
    return list(range(start, result["layers"] + 1))


def _skip_effect_matrix(result: dict) -> np.ndarray:
    m = np.array(result["skip_effect"], dtype=float)
    m[np.tril_indices_from(m, -1)] = np.nan  # before the skipped block: 0 by definition, left blank
    return m


def _skip_effect_panel(ax, m: np.ndarray, vmax: float, title: str):
    """The heat map: row = skipped block, column = affected block; returns the image for a colour bar."""
    n = m.shape[0]
    im = ax.imshow(m, vmin=0, vmax=vmax, cmap="viridis", interpolation="nearest", extent=(0.5, n + 0.5, n + 0.5, 0.5))
    ax.set(xlabel="effect at layer", ylabel="layer skipped", title=title)
    return im


def depth_figure(result: dict):
    """DIR/depth.png of `pretrain analyze-depth`: angular distance, sublayer contributions, logit lens, skip loss,
    skip output change and the skip-effect map of one result (depth.json)."""
    layers = list(range(1, result["layers"] + 1))
    fig = _new_figure(figsize=(15, 8))
    axes = fig.subplots(2, 3)
    ax_angle, ax_contrib, ax_lens = axes[0]
    ax_skip, ax_out, ax_map = axes[1]
    skip_effect = measure("skip_effect")
    ax_angle.plot(layers, result["angular_distance"], "o-", ms=4)
    _depth_axes(ax_angle, measure("angular_distance"))
    if "block_contribution" in result:  # depth.json files written before these analyses existed lack them
        for sublayer, key in CONTRIBUTIONS:
            ax_contrib.plot(layers, result[key], "o-", ms=3, label=f"{sublayer} {measure(key).label}")
        ax_contrib.legend(fontsize=8)
        ax_lens.plot(_layer_positions(result, "logit_lens_kl"), result["logit_lens_kl"], "o-", ms=4, color="C4")
        ax_out.bar(layers, result["skip_output_change"], color="C1")
        effect = _skip_effect_matrix(result)
        im = _skip_effect_panel(ax_map, effect, max(1.0, float(np.nanmax(effect))), skip_effect.title)
        fig.colorbar(im, ax=ax_map, label=skip_effect.label)
    else:
        ax_map.set(xlabel="effect at layer", ylabel="layer skipped", title=skip_effect.title)
    ax_contrib.set(xlabel="layer", ylabel="relative contribution", yscale="log",
                   title="Sublayer contributions (Csordas et al.)")
    _layer_axes(ax_contrib)
    _depth_axes(ax_lens, measure("logit_lens_kl"))
    increase = result["skip_loss_increase"]
    ax_skip.bar(layers, increase, color=["C3" if v > 0 else "C2" for v in increase])
    ax_skip.axhline(0.0, color="k", lw=0.8)
    skip_loss_increase = measure("skip_loss_increase")
    _depth_axes(ax_skip, skip_loss_increase, xlabel="layer skipped",
                title=f"{skip_loss_increase.title} (val loss {result['val_loss']:.3f})")
    _depth_axes(ax_out, measure("skip_output_change"), xlabel="layer skipped")
    ax_map.xaxis.get_major_locator().set_params(integer=True)
    ax_map.yaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"{result.get('norm_scheme', '')} step {result.get('step', '?')}")
    return fig


def depth_runs_figure(runs: list[Run], title: str):
    """`pretrain report`: the analyze-depth results of the runs, one line each; None when no run of the group has
    one."""
    analysed = [r for r in runs if r.depth]
    if not analysed:
        return None
    rows = math.ceil(len(DEPTH_PANELS) / 2)
    fig = _new_figure(figsize=(11, 3.75 * rows))
    axes = fig.subplots(rows, 2).flatten()
    labels = run_labels(analysed)
    for ax, m in zip(axes, DEPTH_PANELS):
        for r in analysed:
            if m.name in r.depth:
                ax.plot(_layer_positions(r.depth, m.name), _finite_or_nan(r.depth[m.name]), "o-", ms=3,
                        color=scheme_color(r.scheme),
                        label=f"{labels[r.path]} @ {r.depth.get('step')}")
        _depth_axes(ax, m)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in axes[len(DEPTH_PANELS):]:  # an odd number of panels leaves one cell empty
        ax.set_visible(False)
    fig.suptitle(f"Depth analyses: {title}")
    return fig


def skip_effect_figure(runs: list[Run], title: str):
    """`pretrain report`: the skip-effect heat map of each run (one colour scale); None when no run of the group
    has a skip-effect matrix."""
    analysed = [r for r in runs if r.depth and r.depth.get("skip_effect")]
    if not analysed:
        return None
    n = len(analysed)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = _new_figure(figsize=(3.6 * cols + 0.8, 3.3 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).flatten())
    matrices = [_skip_effect_matrix(r.depth) for r in analysed]
    vmax = max(1.0, max(float(np.nanmax(m)) for m in matrices))
    labels = run_labels(analysed)
    im = None
    for ax, r, m in zip(axes, analysed, matrices):
        im = _skip_effect_panel(ax, m, vmax, labels[r.path])
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.colorbar(im, ax=list(axes[:n]), label=measure("skip_effect").label)
    fig.suptitle(f"Skipping block s: effect on block l's contribution: {title}")
    return fig


def attribution_figure(result: dict):
    """DIR/attribution.png of `pretrain attribute`: each block's direct contributions to the correct-token logit."""
    layers = list(range(1, result["layers"] + 1))
    fig = _new_figure(figsize=(8, 4))
    ax = fig.subplots()
    width = 0.4
    ax.bar([l - width / 2 for l in layers], result["attn"], width, label="attention")
    ax.bar([l + width / 2 for l in layers], result["mlp"], width, label="MLP")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set(xlabel="layer", ylabel="mean direct contribution to the correct-token logit",
           title=f"embedding {result['embedding']:.3f}, total logit {result['logit']:.3f}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.suptitle(f"{result.get('norm_scheme', '')} step {result.get('step', '?')}")
    return fig


# ---------------------------------------------------------------------------------------------- coordinate check


def coord_check_figure(result: dict):
    """`pretrain coord-check`: DIR/coord_check.png, the µP papers' coordinate check. Top row: mean |coordinate| of
    each summary activation against width, bottom row against depth (log-log), one line per recorded step; flat lines
    are what a parametrization that transfers gives."""
    names = result["summaries"]
    fig = _new_figure(figsize=(3.2 * len(names), 6.2))
    axes = fig.subplots(2, len(names), squeeze=False)
    steps = range(result["steps"] + 1)
    cmap = _step_colors(len(steps))
    for row, (axis, sizes_key, label) in enumerate((("width", "widths", "d_model"), ("depth", "depths", "n_layers"))):
        sizes = result[sizes_key]
        slopes = result[f"slopes_{axis}"]
        for col, name in enumerate(names):
            ax = axes[row][col]
            for step in steps:
                ax.plot(sizes, [result[axis][str(s)][name][step] for s in sizes], marker="o", ms=3,
                        color=cmap[step], label=f"step {step}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_title(f"{name} (slope {slopes[name]:+.2f})", fontsize=9)
            if col == 0:
                ax.set_ylabel("mean |coordinate|")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{result['norm_scheme']}, {result['parametrization']}: max |slope| width "
                 f"{result['max_abs_slope_width']:.2f}, depth {result['max_abs_slope_depth']:.2f}")
    return fig


def _step_colors(n: int) -> list:
    from matplotlib import colormaps  # matplotlib loads on first draw (see _new_figure)

    cmap = colormaps["viridis"]
    return [cmap(i / max(1, n - 1)) for i in range(n)]

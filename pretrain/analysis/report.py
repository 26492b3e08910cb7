"""`pretrain report RUN_DIR... | SWEEP_ROOT --out DIR`: an ablation's results at a glance (the command:
pretrain/cli/report.py; the data and Table 1: report_table.py; the pictures: figures.py; here the content and
its rendering).

Writes DIR/REPORT.md with its PNGs next to it, and DIR/report.html, the same content self-contained (images
embedded as data URIs, styles inline, no scripts): one file to mail or attach.

    Table 1          validation perplexity at equal tokens, rows = norm scheme, columns = the swept keys (a sweep's
                     grid, else the keys the runs differ in; --columns to choose), best per column in bold,
                     diverged runs flagged (pretrain/analysis/report_table.py has the exact rules). When the runs
                     differ in train.lr (not a column): the best learning rate per scheme, each cell the scheme at
                     its best lr of the column (the lr shown), seeds as mean ± std, a diverged run never the best
    Table 1b         the same evaluations' bits per byte (where the runs logged val_bpb), best per column in bold:
                     comparable across tokenizers of one text, where perplexity is not
    Table 2          downstream accuracy (where a run folder holds `pretrain eval-downstream --out` results,
                     RUN_DIR/downstream.json or RUN_DIR/*/downstream.json; else its last in-loop
                     eval.downstream record in metrics.jsonl): one row per run, a column per task
                     (OLMo's primary metric, in %) and their average, as the papers' downstream tables; best bold
    Runs             one line per run: scheme, column (and lr, when swept), steps, tokens, last losses (val ppl
                     and bpb), how it ended
    per column       validation loss against learning rate, one line per scheme, seeds as error bars (when
                     train.lr is swept); loss curves; the per-layer statistics of the measure table's stats_panel
                     entries (variance and gradient norm) against depth at the last measured step
                     (diagnostics.interval > 0);
                     `pretrain analyze-depth` results where a run folder holds one
                     (RUN_DIR/depth.json or RUN_DIR/*/depth.json): angular distance, block contribution, logit
                     lens, skip-one-block loss and the skip-effect heat maps

DIR is written as a temporary sibling and renamed into place; an existing DIR is replaced only when it holds a
report (REPORT.md), otherwise refused.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import time
from dataclasses import dataclass

from pretrain.analysis import figures
from pretrain.analysis.report_table import (LR_KEY, RISING_EVALS, Run, Table, column_label, human_tokens,
                                            lr_text, row_differences)
from pretrain.data.downstream_tasks import TASKS
from pretrain.files import atomic_folder

REPORT_MD, REPORT_HTML = "REPORT.md", "report.html"
CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.7em; text-align: right; }
th:first-child, .name { text-align: left; }
th { background: #f0f0f0; }
td.best { font-weight: bold; background: #e3f4e3; }
td.diverged { color: #b00020; }
caption { caption-side: bottom; text-align: left; font-size: 0.9em; color: #555; padding-top: 0.4em; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


@dataclass
class TableBlock:
    id: str
    header: list[str]
    rows: list[list[tuple[str, str]]]  # (text, css class)
    caption: str = ""
    left: int = 1  # the first `left` columns hold names (left-aligned), the rest numbers


# ------------------------------------------------------------------------------------------------ content


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text).strip("_") or "all"


def _cell_text(cell, bpb: bool = False) -> tuple[str, str]:
    """A Table 1 cell: its perplexity, or with `bpb` its bits per byte (Table 1b)."""
    if cell is None:
        return "", ""
    if cell.ppl is None:
        if cell.diverged:
            return ("diverged" + (f" ({cell.note})" if cell.note else ""), "diverged")
        return (cell.note or "-", "")
    if bpb:
        if cell.bpb is None:
            return "-", ""
        text = f"{cell.bpb:.4f}" + (f" ± {cell.bpb_std:.4f}" if cell.bpb_std is not None else "")
    else:
        text = f"{cell.ppl:.2f}" + (f" ± {cell.std:.2f}" if cell.std is not None else "")
    if cell.lr is not None:
        text += f" (lr {lr_text(cell.lr)})"
    if cell.earlier:
        text += f" (at {human_tokens(cell.tokens)})"
    if cell.diverged:
        return f"{text}; {cell.note}", "diverged"
    return text, "best" if (cell.bpb_best if bpb else cell.best) else ""


def table1_block(table: Table, bpb: bool = False) -> TableBlock:
    """Table 1 (perplexity), or with `bpb` Table 1b (bits per byte of the same evaluations)."""
    header = ["norm scheme"]
    for col in table.columns:
        size = f"{table.params[col]} params, " if table.params[col] else ""
        header.append(f"{col} ({size}{human_tokens(table.tokens[col])} tokens)")
    rows = [[(scheme, "")] + [_cell_text(table.cells.get((scheme, col)), bpb) for col in table.columns]
            for scheme in table.rows]
    if bpb:
        caption = ("Validation bits per byte (val_bpb: the loss in bits per UTF-8 byte of the validation text) of the "
                   "evaluations of Table 1. Lower is better; the best per column is bold. Unlike perplexity it does "
                   "not depend on the tokenizer: runs on one text tokenized differently rank by it.")
        if table.by_lr:
            caption += " Each scheme at the learning rate Table 1 chose."
        return TableBlock("table1_bpb", header, rows, caption)
    threshold = f", or perplexity above {table.diverged_ppl:g}" if table.diverged_ppl is not None else ""
    caption = ("Validation perplexity at equal training tokens (the column header's count; a value marked "
               "'at N' is the run's last evaluation before it). Lower is better; the best per column is bold; "
               f"'diverged': non-finite loss, exit 3, a validation loss that rose at each of the last "
               f"{RISING_EVALS - 1} evaluations{threshold}. Several runs in a cell: mean ± standard deviation.")
    if table.by_lr:
        lrs = sorted({c.lr for cells in table.lr_cells.values() for c in cells if isinstance(c.lr, (int, float))})
        caption += (" Each scheme at its best learning rate of the column (the lr in the cell; tried: "
                    f"{', '.join(lr_text(v) for v in lrs)}): the lowest mean perplexity over the lr's seeds (runs "
                    "differing only in train.seed), among the learning rates none of whose runs diverged.")
    return TableBlock("table1", header, rows, caption)


def downstream_block(runs: list[Run], keys: list[str]) -> TableBlock | None:
    """Table 2: per run with downstream results, each task's primary metric (%) and their average (over the
    table's tasks, for a run that has them all); the best per task bold. None when no run has results."""
    scored = [r for r in runs if r.downstream and r.downstream.get("tasks")]
    if not scored:
        return None
    names = [t for t in TASKS if any(t in r.downstream["tasks"] for r in scored)]
    names += sorted({t for r in scored for t in r.downstream["tasks"]} - set(names))
    value = {(r.path, t): 100 * r.downstream["tasks"][t]["primary"] for r in scored
             for t in names if t in r.downstream["tasks"]}
    best = {t: max((v for (_, u), v in value.items() if u == t), default=None) for t in names}
    rows = []
    for r in scored:
        row = [(r.scheme, ""), (column_label(r, keys), "")]
        for t in names:
            v = value.get((r.path, t))
            row.append((f"{v:.1f}", "best" if v is not None and v == best[t] else "") if v is not None else ("-", ""))
        mine = [value[r.path, t] for t in names if (r.path, t) in value]
        row.append((f"{sum(mine) / len(mine):.1f}", "") if len(mine) == len(names) else ("-", ""))
        rows.append(row)
    metrics = {t: r.downstream["tasks"][t]["primary_metric"]
               for r in scored for t in names if t in r.downstream["tasks"]}
    settings = sorted({(r.downstream.get("format"), r.downstream.get("shots"), r.downstream.get("limit"))
                       for r in scored}, key=str)
    about = "; ".join(f"format {f}, {s}-shot, " + (f"{n} questions per task" if n else "every question")
                      for f, s, n in settings)
    caption = ("Downstream accuracy (%) from `pretrain eval-downstream --out RUN_DIR/downstream.json`, else the run's "
               "last in-loop eval.downstream record: OLMo's primary "
               "metric per task (" + ", ".join(f"{t} {m}" for t, m in metrics.items()) + "; acc_raw is plain "
               f"accuracy, acc_per_char normalizes by the continuation's characters); {about}. Higher is better; "
               "the best per task is bold; Avg over the table's tasks. Small models score near chance (25% for "
               "four choices, 50% for two).")
    if len(settings) > 1:
        caption += " The runs were scored with different settings: compare rows with care."
    return TableBlock("downstream", ["norm scheme", "column", *names, "Avg"], rows, caption, left=2)


def _run_state(r: Run) -> str:
    total = r.config.get("train.steps")
    step = r.train[-1]["step"] if r.train else None
    if r.diverged_in_training:
        return "diverged"
    if step is not None and total and step >= total:
        return "finished"
    last_exit = r.exit_codes[-1] if r.exit_codes else None
    if last_exit == 75:
        return "preempted"
    if last_exit not in (None, 0):
        return f"failed (exit {last_exit})"
    return "not started" if step is None else "in progress or stopped"


def runs_block(runs: list[Run], keys: list[str], lr: bool = False) -> TableBlock:
    """One line per run; with `lr` (a learning-rate sweep's best-lr table) its train.lr next to its column."""
    header = ["run", "scheme", "column", *(["lr"] if lr else []), "step", "tokens", "train loss", "val ppl (step)",
              "val bpb", "state", "spikes"]
    rows = []
    for r in runs:
        last = r.train[-1] if r.train else {}
        val = r.val[-1] if r.val else None
        rows.append([(r.name, ""), (r.scheme, ""), (column_label(r, keys), ""),
                     *([(lr_text(r.config.get(LR_KEY)), "")] if lr else []),
                     (f"{last.get('step', '-')}/{r.config.get('train.steps')}", ""),
                     (human_tokens(r.last_tokens), ""),
                     (f"{last['loss']:.4f}" if "loss" in last else "-", ""),
                     (f"{val['val_ppl']:.2f} ({val['step']})" if val else "-", ""),
                     (f"{val['val_bpb']:.4f}" if val and val.get("val_bpb") is not None else "-", ""),
                     (_run_state(r), "diverged" if r.diverged_in_training else ""), (str(r.spikes), "")])
    return TableBlock("runs", header, rows, left=len(header))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def report_blocks(runs: list[Run], table: Table, title: str, paths: list[str]) -> tuple[list, dict[str, bytes]]:
    """The report's content (headings, paragraphs, tables, images by name) and its PNGs."""
    images: dict[str, bytes] = {}
    blocks: list = [("h1", title),
                    ("p", f"{len(runs)} run(s) from {', '.join(f'`{p}`' for p in paths)}; written "
                          f"{time.strftime('%Y-%m-%d %H:%M')} by `pretrain report`.")]
    heading = "Table 1: validation perplexity" + (" at the best learning rate per scheme" if table.by_lr else "")
    blocks += [("h2", heading), ("table", table1_block(table))]
    if table.has_bpb:
        blocks += [("h2", "Table 1b: validation bits per byte"), ("table", table1_block(table, bpb=True))]
    downstream = downstream_block(runs, table.keys)
    if downstream:
        blocks += [("h2", "Table 2: downstream accuracy"), ("table", downstream)]
    notes = [*table.warnings]
    differences = row_differences(runs, table.keys + table.grouped_keys)
    if differences:
        notes.append("Other settings that differ between rows: " + "; ".join(differences))
    if notes:
        blocks.append(("ul", notes))
    blocks += [("h2", "Runs"), ("table", runs_block(runs, table.keys, lr=table.by_lr))]
    for col in table.columns:
        group = sorted((r for r in runs if column_label(r, table.keys) == col), key=lambda r: table.rows.index(r.scheme))
        slug = _slug(col)
        blocks.append(("h2", col if table.keys else "All runs"))
        made = [("lr", "Validation loss against learning rate", figures.lr_figure(table, col)),
                ("loss", "Loss curves", figures.loss_figure(group, col)),
                ("layers", "Per-layer statistics against depth (last measured step)",
                 figures.layer_stats_figure(group, col)),
                ("depth", "Depth analyses (pretrain analyze-depth)", figures.depth_runs_figure(group, col)),
                ("skip", "Layer skipping: effect on later blocks' contributions", figures.skip_effect_figure(group, col))]
        for kind, heading, fig in made:
            if fig is None:
                continue
            name = f"{kind}_{slug}.png"
            images[name] = _png(fig)
            blocks += [("h3", heading), ("img", name, f"{heading}: {col}")]
        if not any(r.layer_stats for r in group):
            blocks.append(("p", "No per-layer statistics: train with diagnostics.interval > 0 to get them."))
        if not any(r.depth for r in group):
            blocks.append(("p", "No depth analyses: run `pretrain analyze-depth --checkpoint RUN_DIR --data DATA "
                                "--out RUN_DIR/depth` to add them."))
    return blocks, images


# ---------------------------------------------------------------------------------------------- rendering


def _md_cell(text: str, css: str) -> str:
    text = text.replace("|", "\\|")
    return f"**{text}**" if css == "best" and text else text


def render_markdown(blocks: list) -> str:
    out: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            out += [block[1], ""]
        elif kind == "ul":
            out += [f"* {item}" for item in block[1]] + [""]
        elif kind == "img":
            out += [f"![{block[2]}]({block[1]})", ""]
        elif kind == "table":
            t: TableBlock = block[1]
            out.append("| " + " | ".join(h.replace("|", "\\|") for h in t.header) + " |")
            out.append("| " + " | ".join(["---"] * t.left + ["---:"] * (len(t.header) - t.left)) + " |")
            out += ["| " + " | ".join(_md_cell(text, css) for text, css in row) + " |" for row in t.rows]
            out += ([""] + [f"*{t.caption}*"] if t.caption else []) + [""]
    return "\n".join(out)


def _inline_code(text: str) -> str:
    """Escaped text with `code` spans as <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(blocks: list, images: dict[str, bytes], title: str) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline_code(block[1])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline_code(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "img":
            data = base64.b64encode(images[block[1]]).decode()
            out.append(f'<img src="data:image/png;base64,{data}" alt="{html.escape(block[2])}">')
        elif kind == "table":
            t: TableBlock = block[1]
            out.append(f'<table id="{t.id}">')
            if t.caption:
                out.append(f"<caption>{html.escape(t.caption)}</caption>")
            heads = [f'<th class="name">{html.escape(h)}</th>' if i < t.left else f"<th>{html.escape(h)}</th>"
                     for i, h in enumerate(t.header)]
            out.append("<thead><tr>" + "".join(heads) + "</tr></thead><tbody>")
            for row in t.rows:
                cells = []
                for i, (text, css) in enumerate(row):
                    tag = "th" if i == 0 and t.id.startswith("table1") else "td"
                    css = " ".join(c for c in (css, "name" if i < t.left else "") if c)
                    cls = f' class="{css}"' if css else ""
                    cells.append(f"<{tag}{cls}>{html.escape(text)}</{tag}>")
                out.append("<tr>" + "".join(cells) + "</tr>")
            out.append("</tbody></table>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(out: str, blocks: list, images: dict[str, bytes]) -> None:
    """Everything into a temporary sibling, then renamed into place (an earlier report is replaced, and kept if
    the rename fails: pretrain/files.py)."""
    title = next((b[1] for b in blocks if b[0] == "h1"), "Report")
    with atomic_folder(out, replace=True) as tmp:
        for name, data in images.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        with open(os.path.join(tmp, REPORT_MD), "w") as f:
            f.write(render_markdown(blocks))
        with open(os.path.join(tmp, REPORT_HTML), "w") as f:
            f.write(render_html(blocks, images, title))

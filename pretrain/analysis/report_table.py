"""The data behind `pretrain report` and `pretrain plot`: run folders read once, grouped into columns, and the
Table-1 grid.

A run folder (its format: pretrain/runs.py) gives its resolved config (config.yaml), training and validation
entries (metrics.jsonl), per-layer statistics (layer_stats.jsonl, optional), the newest `pretrain analyze-depth`
result found as RUN_DIR/depth.json or RUN_DIR/*/depth.json (optional) and, where a launcher wrote one, its exit
codes (launch.jsonl).

Table 1 (after the Curse of Depth paper's): one row per norm scheme, one column per value of the column keys
(default: the keys the runs differ in, e.g. model.n_layers or model.preset), each cell the validation perplexity
at equal tokens: for a column, the largest number of training tokens T at which every run of the column that
did not diverge has a validation entry; each cell is the run's validation perplexity at T (or at its last
evaluation before T, marked). Several runs in one cell (e.g. seeds) give their mean and standard deviation.
Each cell also carries the bits per byte of the same evaluations (val_bpb, where every one of them has it), the
report's Table 1b, its best per column marked by bpb: perplexity depends on the tokenizer, bits per byte does not,
so runs on one text tokenized differently (a sweep over tokenizers) rank by bpb.
A run is flagged diverged when its last training loss or a validation loss is non-finite, its trainer stopped
for non-finite steps (exit 3), or its validation loss rose at each of its last RISING_EVALS - 1 evaluations (a
finite run that is still falling, however high, is not diverged: a short run of a slow starter is not a failure);
`diverged_ppl` adds the paper's fixed criterion (perplexity above 1000 at T or at the last evaluation) for runs long
enough for it to mean divergence. Diverged runs do not count when T is chosen.

Best learning rate per scheme: when the runs differ in train.lr and train.lr is not a column key (a sweep's grid
with train.lr, or runs that differ in it; `--columns train.lr` keeps one column per lr), the lr and the seed are not
columns: each (scheme, column, lr) group's runs (seeds, differing only in train.seed) give a cell as above (mean and
standard deviation at the column's T), and the scheme's cell is the group with the lowest mean perplexity among
groups none of whose runs diverged (a diverged run is never the best; a scheme diverged at every lr shows
"diverged"). The table keeps every group (Table.lr_cells) for the report's loss-vs-lr figure.
"""

from __future__ import annotations

import glob
import json
import math
import os
import statistics
from dataclasses import dataclass, field

from pretrain import runs as run_folder
from pretrain.analysis.downstream_record import as_result, is_downstream
from pretrain.errors import UserError

# Config keys that never make runs different experiments (where they write, how often they log, ...).
NOT_EXPERIMENT_KEYS = ("run.", "logging.", "checkpoint.", "diagnostics.", "train.resume", "train.stop_at_step",
                       "train.max_bad_steps", "train.compile", "data.cache_dir", "eval.interval",
                       "train.spike_window", "train.spike_threshold", "train.snapshot_interval", "train.max_rollbacks")
SCHEME_KEY = "model.norm_scheme"
LR_KEY, SEED_KEY = "train.lr", "train.seed"  # swept lr: each scheme's cell at its best lr, seeds grouped


@dataclass
class Run:
    path: str
    name: str
    config: dict  # flat {"section.key": value} of the resolved config
    scheme: str
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)  # with "tokens" added
    layer_stats: list[dict] = field(default_factory=list)
    depth: dict | None = None
    downstream: dict | None = None  # the newest `pretrain eval-downstream --out` result in the run folder
    exit_codes: list[int] = field(default_factory=list)
    params: int | None = None
    spikes: int = 0  # loss or gradient-norm spike events in metrics.jsonl (pretrain/train/spikes.py)
    label: str = ""  # the run's name in a figure's legend (pretrain.analysis.figures.label_runs)

    @property
    def last_tokens(self) -> int | None:
        return self.train[-1].get("consumed_tokens") if self.train else None

    @property
    def diverged_in_training(self) -> bool:
        last_loss = self.train[-1].get("loss") if self.train else None
        return (3 in self.exit_codes or (last_loss is not None and not _finite(last_loss))
                or any(not _finite(v.get("val_loss")) for v in self.val))

    @property
    def loss_rising(self) -> bool:
        """The validation loss rose at each of the last RISING_EVALS - 1 evaluations."""
        last = [v.get("val_loss") for v in self.val[-RISING_EVALS:]]
        return len(last) == RISING_EVALS and all(a < b for a, b in zip(last, last[1:]))


RISING_EVALS = 3  # diverged: the validation loss rose twice in a row, at the last three evaluations

def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def expand_inputs(paths: list[str]) -> list[str]:
    """Run folders from the arguments: run folders as given, a sweep folder as its started runs (sweep.json's order;
    a run only submitted has nothing to report yet)."""
    runs: list[str] = []
    for path in paths:
        if not os.path.isdir(path):
            raise UserError(f"{path} does not exist; give run folders or a sweep folder")
        if run_folder.is_run_dir(path):
            runs.append(path)
            continue
        manifest = run_folder.read_manifest(path) or {}
        names = [r["dir"] for r in manifest.get("runs") or [] if isinstance(r, dict) and "dir" in r]
        names += sorted(n for n in os.listdir(path) if n not in names)
        found = [os.path.join(path, n) for n in names if run_folder.has_started(os.path.join(path, n))]
        if not found:
            raise UserError(f"{path} is neither a run folder nor a sweep folder with started runs (a "
                            f"{run_folder.CONFIG_FILE}) in it")
        runs += found
    unique = list(dict.fromkeys(os.path.abspath(p) for p in runs))
    return unique


def _flat_config(path: str):
    """(flat {"section.key": value}, ExperimentConfig) of a run's stored config."""
    from pretrain.config import to_dict  # it imports the model code (torch): loaded when a run is read

    cfg = run_folder.read_stored_config(path)
    flat = {}
    for section, values in to_dict(cfg).items():  # the config keys (not the internal given_keys)
        if isinstance(values, dict) and section != "deepspeed":
            flat.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            flat[section] = values
    return flat, cfg


def _newest_result(path: str, name: str) -> dict | None:
    """The newest (by step, then time) JSON result `name` in the run folder or one folder below it."""
    found = glob.glob(os.path.join(path, name)) + glob.glob(os.path.join(path, "*", name))
    results = []
    for p in found:
        try:
            with open(p) as f:
                results.append((json.load(f), os.path.getmtime(p), p))
        except (OSError, ValueError):
            continue
    if not results:
        return None
    result, _, where = max(results, key=lambda r: (r[0].get("step") or 0, r[1]))
    result["path"] = where
    return result


def _in_loop_downstream(path: str, metrics: list[dict]) -> dict | None:
    """The run's last in-loop downstream record (eval.downstream) as an eval-downstream result, or None."""
    records = [m for m in metrics if is_downstream(m)]
    if not records:
        return None
    return {**as_result(records[-1]), "path": os.path.join(path, run_folder.METRICS_FILE)}


def read_run(path: str) -> Run:
    """A started run folder, read once (pretrain report, pretrain plot); one-line UserErrors for a missing folder,
    a run not started yet and a corrupted file."""
    from models import Llama  # torch and the model code (the parameter count on the meta device): only when a run is read

    if not os.path.isdir(path):
        raise UserError(f"run folder {path} does not exist")
    if not run_folder.has_started(path):
        what = "a run submitted but not started yet" if run_folder.is_run_dir(path) else "not a run folder"
        raise UserError(f"{path} has no {run_folder.CONFIG_FILE}: {what}")
    flat, cfg = _flat_config(path)
    metrics = run_folder.read_metrics(path)
    train = run_folder.train_records(metrics)
    tokens_at = {m["step"]: m["consumed_tokens"] for m in train if "consumed_tokens" in m}
    per_step = cfg.train.global_batch_size * cfg.data.seq_len
    val = [{**m, "tokens": tokens_at.get(m["step"], m["step"] * per_step)} for m in metrics if "val_loss" in m]
    events = run_folder.read_events(path)
    params = Llama.meta(cfg.model).num_params()
    return Run(
        path=path, name=os.path.basename(os.path.normpath(path)), config=flat, scheme=cfg.model.norm_scheme,
        train=train, val=val, layer_stats=run_folder.read_layer_stats(path),
        depth=_newest_result(path, "depth.json"),
        downstream=_newest_result(path, run_folder.DOWNSTREAM_FILE) or _in_loop_downstream(path, metrics),
        exit_codes=[e["rc"] for e in events if e.get("event") == "exit" and "rc" in e], params=params,
        spikes=run_folder.count_spikes(metrics),
    )


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys (besides the scheme and bookkeeping) with more than one value among the runs."""
    keys = sorted({k for r in runs for k in r.config})
    return [k for k in keys if k != SCHEME_KEY and not k.startswith(NOT_EXPERIMENT_KEYS)
            and len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]


def _varies_within(runs: list[Run], key: str, group_key: str) -> bool:
    values: dict = {}
    for r in runs:
        values.setdefault(json.dumps(r.config.get(group_key)), set()).add(json.dumps(r.config.get(key), sort_keys=True))
    return any(len(v) > 1 for v in values.values())


def column_keys(runs: list[Run], sweep_axes: list[str] | None = None) -> list[str]:
    """The keys that tell the columns apart: a sweep's grid keys, else the keys that vary among runs of one norm
    scheme (a key fixed per scheme, e.g. a scheme-specific setting, describes the row, not a column), with
    model.preset standing for the shape keys it determines."""
    if sweep_axes is not None:
        keys = [k for k in sweep_axes if k != SCHEME_KEY]
    else:
        keys = [k for k in differing_keys(runs) if _varies_within(runs, k, SCHEME_KEY)]
        if "model.preset" in keys:
            keys = [k for k in keys if k == "model.preset" or not k.startswith("model.")
                    or _varies_within(runs, k, "model.preset")]
    if LR_KEY in keys or LR_KEY in differing_keys(runs):  # a learning-rate sweep: best lr per scheme, seeds grouped
        keys = [k for k in keys if k not in (LR_KEY, SEED_KEY)]
    return keys


def lr_swept(runs: list[Run], keys: list[str]) -> bool:
    """Table 1 is the best learning rate per scheme: the runs differ in train.lr and it is not a column key."""
    return LR_KEY not in keys and len({json.dumps(r.config.get(LR_KEY)) for r in runs}) > 1


def row_differences(runs: list[Run], columns: list[str]) -> list[str]:
    """'key: scheme=value, ...' for keys other than the columns that differ between the schemes' runs: settings
    that come with a row (or a code change between runs), worth knowing when comparing rows."""
    notes = []
    for key in differing_keys(runs):
        if key in columns or (key.startswith("model.") and "model.preset" in columns
                              and not _varies_within(runs, key, "model.preset")):
            continue
        by_scheme: dict = {}
        for r in runs:
            by_scheme.setdefault(r.scheme, [])
            value = _value_text(r.config.get(key))
            if value not in by_scheme[r.scheme]:
                by_scheme[r.scheme].append(value)
        notes.append(f"{key}: " + ", ".join(f"{s}={'/'.join(v)}" for s, v in by_scheme.items()))
    return notes


def sweep_axes(paths: list[str]) -> list[str] | None:
    """The grid keys of a single sweep folder argument (its sweep.json), else None."""
    if len(paths) != 1 or run_folder.is_run_dir(paths[0]):
        return None
    manifest = run_folder.read_manifest(paths[0])
    if manifest is None:
        return None
    return list(manifest.get("axes") or {})


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def column_label(run: Run, keys: list[str]) -> str:
    if not keys:
        return "all runs"
    return ", ".join(f"{_short(k)}={_value_text(run.config.get(k))}" for k in keys)


def _value_text(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


@dataclass
class Cell:
    runs: list[Run]
    ppl: float | None = None  # mean over runs that did not diverge
    std: float | None = None
    tokens: int | None = None  # the evaluation's tokens (the column's T unless `earlier`)
    earlier: bool = False
    diverged: bool = False
    best: bool = False
    note: str = ""
    bpb: float | None = None  # mean bits per byte of the same evaluations (None unless each has one)
    bpb_std: float | None = None
    bpb_best: bool = False  # the lowest bpb of its column (Table 1b)
    loss: float | None = None  # mean validation loss of the same evaluations (the loss-vs-lr figure)
    loss_std: float | None = None
    lr: float | None = None  # best-lr table: the learning rate of the cell's runs


@dataclass
class Table:
    keys: list[str]
    columns: list[str]
    rows: list[str]  # schemes
    cells: dict  # (scheme, column) -> Cell
    tokens: dict  # column -> T (None when no run of the column has a validation entry)
    params: dict  # column -> parameter count(s) text
    warnings: list[str]
    diverged_ppl: float | None = None  # the optional fixed threshold the table was built with
    lr_cells: dict = field(default_factory=dict)  # best-lr table: (scheme, column) -> [Cell per lr], by lr

    @property
    def has_bpb(self) -> bool:
        return any(c.bpb is not None for c in self.cells.values())

    @property
    def by_lr(self) -> bool:
        """Each scheme's cell is its best learning rate's (lr_swept)."""
        return bool(self.lr_cells)

    @property
    def grouped_keys(self) -> list[str]:
        """Keys that differ between a cell's runs by design: not worth a note as settings that differ between rows."""
        return [LR_KEY, SEED_KEY] if self.by_lr else []


def build_table(runs: list[Run], keys: list[str], diverged_ppl: float | None = None) -> Table:
    from models.norms import NORM_SCHEMES  # models imports torch: loaded when a table is built, not with this module

    for k in keys:
        if not any(k in r.config for r in runs):
            raise UserError(f"--columns {k}: no run has this config key; use dotted keys such as model.n_layers")
    columns: list[str] = []
    for r in runs:
        label = column_label(r, keys)
        if label not in columns:
            columns.append(label)
    order = list(NORM_SCHEMES)
    rows = sorted({r.scheme for r in runs}, key=lambda s: order.index(s) if s in order else len(order))
    by_lr = lr_swept(runs, keys)
    cells, lr_cells, tokens, params, warnings = {}, {}, {}, {}, []
    for col in columns:
        in_col = [r for r in runs if column_label(r, keys) == col]
        sizes = sorted({r.params for r in in_col if r.params})
        params[col] = " / ".join(dict.fromkeys(_human(p) for p in sizes))  # schemes without norms differ by a few
        healthy = [r for r in in_col if r.val and not _diverged(r, diverged_ppl)]
        tokens[col] = min((r.val[-1]["tokens"] for r in healthy), default=None)
        evals = {(r.config.get("eval.tokens"), r.config.get("data.seq_len"), json.dumps(r.config.get("data.paths")))
                 for r in in_col}
        if len(evals) > 1:
            warnings.append(f"column {col}: the runs were validated on different sets (eval.tokens, data.seq_len "
                            "or data.paths differ); their perplexities are not comparable (their bits per byte, "
                            "Table 1b, are where the sets hold one text tokenized differently)")
        for scheme in rows:
            members = [r for r in in_col if r.scheme == scheme]
            if members and by_lr:
                lr_cells[(scheme, col)] = _lr_cells(members, tokens[col], diverged_ppl)
                cells[(scheme, col)] = _best_lr_cell(members, lr_cells[(scheme, col)])
            elif members:
                cells[(scheme, col)] = _cell(members, tokens[col], diverged_ppl)
        finite = [c for (s, c_), c in cells.items() if c_ == col and c.ppl is not None and not c.diverged]
        if finite:
            min(finite, key=lambda c: c.ppl).best = True
        with_bpb = [c for (s, c_), c in cells.items() if c_ == col and c.bpb is not None and not c.diverged]
        if with_bpb:
            min(with_bpb, key=lambda c: c.bpb).bpb_best = True
    return Table(keys, columns, rows, cells, tokens, params, warnings, diverged_ppl, lr_cells)


def _lr_cells(members: list[Run], target: int | None, diverged_ppl: float | None) -> list[Cell]:
    """One cell per learning rate of a scheme's runs in a column (its seeds averaged), by increasing lr."""
    by_lr: dict = {}
    for r in members:
        by_lr.setdefault(r.config.get(LR_KEY), []).append(r)
    out = []
    for lr in sorted(by_lr, key=lambda v: (not _finite(v), v if _finite(v) else 0)):
        cell = _cell(by_lr[lr], target, diverged_ppl)
        cell.lr = lr
        out.append(cell)
    return out


def _best_lr_cell(members: list[Run], per_lr: list[Cell]) -> Cell:
    """The cell of the lowest mean perplexity among the learning rates none of whose runs diverged."""
    healthy = [c for c in per_lr if c.ppl is not None and not c.diverged]
    if healthy:
        return min(healthy, key=lambda c: c.ppl)
    diverged = [c for c in per_lr if c.diverged]
    if not diverged:
        return Cell(members, note="no evaluation by then")
    note = "at every lr" if len(diverged) == len(per_lr) else "a run diverged at each lr evaluated"
    return Cell(members, diverged=True, note=note)


def _diverged(run: Run, diverged_ppl: float | None) -> bool:
    last_ppl = run.val[-1].get("val_ppl") if run.val else None
    return run.diverged_in_training or run.loss_rising or _above(last_ppl, diverged_ppl)


def _above(ppl: float | None, diverged_ppl: float | None) -> bool:
    return diverged_ppl is not None and ppl is not None and ppl > diverged_ppl


def _cell(members: list[Run], target: int | None, diverged_ppl: float | None) -> Cell:
    cell = Cell(members)
    values, at, bpbs, losses = [], [], [], []
    for r in members:
        if _diverged(r, diverged_ppl):
            cell.diverged = True
            continue
        entries = [v for v in r.val if target is not None and v["tokens"] <= target]
        if not entries:
            continue
        entry = entries[-1]
        if not _finite(entry.get("val_ppl")) or _above(entry["val_ppl"], diverged_ppl):
            cell.diverged = True
            continue
        values.append(entry["val_ppl"])
        at.append(entry["tokens"])
        bpbs.append(entry.get("val_bpb"))
        losses.append(entry.get("val_loss"))
    if values:
        cell.ppl = statistics.fmean(values)
        cell.std = statistics.stdev(values) if len(values) > 1 else None
        if all(_finite(v) for v in losses):
            cell.loss = statistics.fmean(losses)
            cell.loss_std = statistics.stdev(losses) if len(losses) > 1 else None
        if all(_finite(b) for b in bpbs):
            cell.bpb = statistics.fmean(bpbs)
            cell.bpb_std = statistics.stdev(bpbs) if len(bpbs) > 1 else None
        cell.tokens = min(at)
        cell.earlier = target is not None and cell.tokens < target
    if cell.diverged and values:
        cell.note = f"{len(members) - len(values)} of {len(members)} runs diverged"
    elif not values and not cell.diverged:
        cell.note = "no evaluation by then"
    return cell


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def human_tokens(n: int | None) -> str:
    return "-" if n is None else _human(n)


def lr_text(lr) -> str:
    """A learning rate as sweeps write it: 0.003 -> 3e-3, 0.00025 -> 2.5e-4."""
    if not isinstance(lr, (int, float)) or isinstance(lr, bool):
        return str(lr)
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"

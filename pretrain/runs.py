"""The run folder's format: what trainers and launchers write into RUN_DIR (and a sweep's ROOT/NAME), read back
here by resume, `pretrain plot`, `pretrain report` and `python -m launch.sweep status`.

    RUN_DIR/config.yaml         the resolved config (the trainer's first write)
    RUN_DIR/metrics.jsonl       one JSON object per logged step, and validation entries (pretrain/train/metrics.py)
    RUN_DIR/layer_stats.jsonl   per-layer statistics every diagnostics.interval steps (pretrain/diagnostics/)
    RUN_DIR/launch.jsonl        the launchers' events (below)
    RUN_DIR/tracking.json       the W&B and trackio run ids of logging.backends (pretrain/train/trackers.py):
                                {"wandb": {"project", "id", "name"}, "trackio": {"project", "name", "id"}}
    RUN_DIR/tb/, wandb/, trackio/   the trackers' own files
    RUN_DIR/checkpoints/        step_N folders and `latest` (pretrain/state/)
    ROOT/NAME/sweep.json        a sweep's runs and grid (below)

JSONL files are appended one line per entry, so a write cut off (a node dying, a full disk) leaves at most a torn
LAST line. One rule for every reader: a torn last line is skipped (resume drops it, see `truncate_jsonl`); an
unreadable line before the last cannot come from a cut-off write: it is corruption, refused with a one-line
UserError naming the file and the line.

ROOT/NAME/sweep.json (written by launch/sweep.py when it submits or runs; a later launch of the same sweep adds
its runs):

    {"name": "norms", "config": "configs/tiny.yaml", "overrides": ["train.steps=1000"],
     "axes": {"model.norm_scheme": ["pre_ln", "lns"]},
     "runs": [{"dir": "norm_scheme=pre_ln", "values": {"model.norm_scheme": "pre_ln"}}, ...]}

RUN_DIR/launch.jsonl, one JSON object per event, appended:

    {"event": "submitted", "launcher": "slurm", "job_id": "123", "time": 1763000000}        launch/sweep.py
    {"event": "start", "launcher": "slurm", "job_id": "123", "restart": 0, "host": "n1",
     "log": "/path/slurm-123.out", "time": ...}                                               launch/train.sbatch
    {"event": "exit", "launcher": "slurm", "job_id": "123", "restart": 0, "rc": 75, "time": ...}
    {"event": "start", "launcher": "local", "pid": 4242, "host": "n1", "log": "RUN_DIR/train.log", "time": ...}
    {"event": "exit", "launcher": "local", "pid": 4242, "rc": 0, "time": ...}                launch/sweep.py --local

`restart` is SLURM_RESTART_COUNT (the number of requeues before this start); `rc` the trainer's exit code
(0 done, 2 bad input, 3 non-finite steps, 75 saved on a signal and requeued, anything else a crash).

launch/ imports this module: it stays free of torch, matplotlib and the model code.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import TYPE_CHECKING, Callable

import yaml

from pretrain.errors import UserError
from pretrain.files import atomic_write

if TYPE_CHECKING:
    # annotations only: pretrain.config loads torch, which launch/ (importing this module) must not
    from pretrain.config import ExperimentConfig

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LAYER_STATS_FILE = "layer_stats.jsonl"
EVENTS_FILE = "launch.jsonl"
MANIFEST_FILE = "sweep.json"
CHECKPOINTS_DIR = "checkpoints"
TRACKING_FILE = "tracking.json"
# `pretrain eval-downstream --out RUN_DIR/downstream.json` (or RUN_DIR/*/downstream.json): the report's downstream table
DOWNSTREAM_FILE = "downstream.json"
LATEST_FILE = "latest"  # CHECKPOINTS_DIR/latest: the name of the newest complete checkpoint

# What makes a folder a run: anything a launcher or a trainer writes into it. A launcher writes launch.jsonl when
# it submits, before any trainer starts (a queued run must show in `launch.sweep status`); a trainer writes
# config.yaml as it starts, metrics.jsonl from its first step and checkpoints/ (what resume continues from). So the
# one definition covers every stage from submitted to finished, for status, resume, plot and report alike; a
# sweep folder holds sweep.json and run folders, none of these, so the two never mix. Readers that need results
# (plot, report) then ask for config.yaml (has_started) with a message of their own instead of a narrower
# definition.
RUN_MARKERS = (CONFIG_FILE, METRICS_FILE, EVENTS_FILE, CHECKPOINTS_DIR)


def is_run_dir(path: str) -> bool:
    """A run folder: one a launcher or trainer has written into (RUN_MARKERS), submitted, running or done."""
    return any(os.path.exists(os.path.join(path, name)) for name in RUN_MARKERS)


def has_started(path: str) -> bool:
    """A trainer has started in the run folder (it wrote the resolved config)."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


# ------------------------------------------------------------------------------------------------ JSONL


def _entries(path: str, valid: Callable[[object], bool], what: str,
             advice: str) -> tuple[list[tuple[int, str, dict]], str | None]:
    """([(line number, line, entry)], torn last line or None) of a JSONL file under the one torn-line rule: a last
    line that is not `valid` is torn (a write cut off); an earlier one is corruption, a one-line UserError."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(number, line) for number, line in enumerate(f, start=1) if line.strip()]
    entries = []
    for i, (number, line) in enumerate(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if entry is None or not valid(entry):
            if i == len(lines) - 1:
                return entries, line.rstrip("\n")
            raise UserError(f"{path}: line {number} is not {what} (corrupted, not a torn last line); {advice}")
        entries.append((number, line, entry))
    return entries, None


def read_jsonl(path: str) -> list[dict]:
    """The entries of a JSONL file of a run folder, oldest first ([] when there is none); a torn last line (a run
    still writing, or cut off) is skipped, an unreadable earlier line refused with a one-line UserError."""
    if not os.path.isfile(path):
        return []
    entries, _ = _entries(path, lambda e: isinstance(e, dict), "a JSON object", "fix or delete that line")
    return [entry for _, _, entry in entries]


def _has_step(entry) -> bool:
    step = entry.get("step", 0) if isinstance(entry, dict) else None
    return isinstance(step, (int, float)) and not isinstance(step, bool)


def truncate_jsonl(path: str, after_step: int) -> str | None:
    """Drop entries logged after `after_step` (a run resumed from an earlier checkpoint re-logs them).

    A node dying mid-write leaves a torn last line: it is dropped and returned (None when there was none), for
    the caller to report. An unreadable line before the last is real corruption: a one-line UserError.
    """
    if not os.path.isfile(path):
        return None
    name = os.path.basename(path)
    entries, torn = _entries(path, _has_step, "a JSON object with a numeric step",
                             f"fix or delete that line (or move {name} away) and resume")
    kept = [line if line.endswith("\n") else line + "\n"  # appends must start on a new line
            for _, line, entry in entries if entry.get("step", 0) <= after_step]
    atomic_write(path, "".join(kept))
    return torn


def torn_line_message(path: str, torn: str) -> str:
    """The log line for a dropped torn last line, e.g. metrics.jsonl: dropped a torn last line (...): '{"step": 1'."""
    shown = torn if len(torn) <= 80 else torn[:77] + "..."
    return f"{os.path.basename(path)}: dropped a torn last line (a write was cut off): {shown!r}"


def read_metrics(run_dir: str) -> list[dict]:
    return read_jsonl(os.path.join(run_dir, METRICS_FILE))


def train_records(metrics: list[dict]) -> list[dict]:
    """The training records of a run's metrics.jsonl entries as the run stands: after a rollback
    (pretrain/train/spikes.py) the records of the steps it discarded are followed by those of the same steps trained
    again, and only the later ones count."""
    kept: list[dict] = []
    for entry in metrics:
        if "loss" in entry:
            while kept and kept[-1].get("step", 0) >= entry.get("step", 0):
                kept.pop()
            kept.append(entry)
    return kept


def count_spikes(metrics: list[dict]) -> int:
    """The loss or gradient-norm spikes of a run's metrics.jsonl entries (pretrain/train/spikes.py): its `"event":
    "spike"` entries, the loss and gradient-norm events of one step counted once."""
    count, last = 0, None
    for entry in metrics:
        if entry.get("event") == "spike":
            if entry.get("step") != last:
                count += 1
            last = entry.get("step")
        elif "loss" in entry:  # a train record between two events: a later spike at the same step (after a rollback)
            last = None
    return count


def read_layer_stats(run_dir: str) -> list[dict]:
    """layer_stats.jsonl's entries, by step."""
    return sorted(read_jsonl(os.path.join(run_dir, LAYER_STATS_FILE)), key=lambda r: r.get("step", 0))


def read_config(run_dir: str) -> dict | None:
    """config.yaml as stored (plain YAML, no validation: for launchers and status); None when missing or unreadable.
    `read_stored_config` reads it as an ExperimentConfig."""
    try:
        with open(os.path.join(run_dir, CONFIG_FILE)) as f:
            cfg = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return cfg if isinstance(cfg, dict) else None


def read_stored_config(folder: str) -> ExperimentConfig:
    """The experiment config a run folder or a checkpoint's step folder stores (CONFIG_FILE), validated: the one
    reader of a stored config for the trainer and the commands (keys of earlier versions are dropped, not refused).
    `read_config` is the launchers' plain-YAML view of the same file."""
    # pretrain.config imports the model code (torch), which launch/ (importing this module) must not load
    from pretrain.config import load_config

    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{folder} has no {CONFIG_FILE}: not a run folder or a checkpoint")
    return load_config(path, stored=True)


def latest_checkpoint(run_dir: str) -> str | None:
    """The name checkpoints/latest holds (the newest complete checkpoint), None when there is none."""
    try:
        with open(os.path.join(run_dir, CHECKPOINTS_DIR, LATEST_FILE)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def find_checkpoint(path: str) -> str:
    """A step folder, or a checkpoints/ root (its `latest`), or a run folder (its checkpoints/latest)."""
    for root in (path, os.path.join(path, CHECKPOINTS_DIR)):
        latest = os.path.join(root, LATEST_FILE)
        if os.path.isfile(latest):
            with open(latest) as f:
                return os.path.join(root, f.read().strip())
    return path


def read_tracking(run_dir: str) -> dict:
    """tracking.json: {backend: {"id", ...}} of the trackers that logged this run ({} when none did yet)."""
    path = os.path.join(run_dir, TRACKING_FILE)
    try:
        with open(path) as f:
            ids = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}); it holds the W&B/trackio run ids: fix it or remove it (the run "
                        "then logs to a new tracker run)") from None
    if not isinstance(ids, dict):
        raise UserError(f"{path}: expected a JSON object of tracker run ids; fix it or remove it")
    return ids


def write_tracking(run_dir: str, ids: dict) -> None:
    """Replace tracking.json atomically (a requeued run reads the old file or the new one, never half of one)."""
    atomic_write(os.path.join(run_dir, TRACKING_FILE), json.dumps(ids, indent=1, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------- launch.jsonl, sweep.json


def append_event(run_dir: str, event: str, **fields) -> None:
    """Append one event line (one write call, so concurrent writers do not interleave within a line)."""
    os.makedirs(run_dir, exist_ok=True)
    record = {"event": event, **fields, "time": round(time.time(), 3)}
    with open(os.path.join(run_dir, EVENTS_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")


def read_events(run_dir: str) -> list[dict]:
    """The run's launcher events, oldest first (read_jsonl's torn-line rule)."""
    return [e for e in read_jsonl(os.path.join(run_dir, EVENTS_FILE)) if "event" in e]


def hostname() -> str:
    return socket.gethostname().split(".")[0]


def read_manifest(sweep_dir: str) -> dict | None:
    path = os.path.join(sweep_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except ValueError:
        return None
    return manifest if isinstance(manifest, dict) else None


def update_manifest(sweep_dir: str, name: str, config: str, overrides: list[str], axes: list[tuple[str, list[str]]],
                    runs: list[tuple[str, dict[str, str]]]) -> None:
    """Write sweep.json (atomically), keeping the runs of earlier launches of the same sweep."""
    old = read_manifest(sweep_dir) or {}
    merged_axes = {k: list(v) for k, v in (old.get("axes") or {}).items()}
    for key, values in axes:
        merged_axes[key] = merged_axes.get(key, []) + [v for v in values if v not in merged_axes.get(key, [])]
    by_dir = {r["dir"]: r for r in old.get("runs") or [] if isinstance(r, dict) and "dir" in r}
    for run_dir, values in runs:
        by_dir[os.path.basename(run_dir)] = {"dir": os.path.basename(run_dir), "values": values}
    manifest = {"name": name, "config": config, "overrides": list(overrides), "axes": merged_axes,
                "runs": list(by_dir.values())}
    os.makedirs(sweep_dir, exist_ok=True)
    atomic_write(os.path.join(sweep_dir, MANIFEST_FILE), json.dumps(manifest, indent=1))

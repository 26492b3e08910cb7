"""What the launchers leave in sweep and run folders for `python -m launch.sweep status` to read back.

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
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time

EVENTS_FILE = "launch.jsonl"
MANIFEST_FILE = "sweep.json"


def append_event(run_dir: str, event: str, **fields) -> None:
    """Append one event line (one write call, so concurrent writers do not interleave within a line)."""
    os.makedirs(run_dir, exist_ok=True)
    record = {"event": event, **fields, "time": round(time.time(), 3)}
    with open(os.path.join(run_dir, EVENTS_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")


def read_events(run_dir: str) -> list[dict]:
    """The run's events, oldest first; unreadable lines (a write cut off) are skipped."""
    path = os.path.join(run_dir, EVENTS_FILE)
    if not os.path.isfile(path):
        return []
    events = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "event" in record:
                events.append(record)
    return events


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
    """Write sweep.json (temp file, then rename), keeping the runs of earlier launches of the same sweep."""
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
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST_FILE}.", dir=sweep_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, os.path.join(sweep_dir, MANIFEST_FILE))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

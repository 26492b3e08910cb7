"""`python -m launch.sweep status NAME|ROOT [--json]`: one row per run of a sweep.

    python -m launch.sweep status norms                      # runs/sweeps/norms (or --root R: R/norms)
    python -m launch.sweep status runs/sweeps/norms --json   # a sweep folder; a single run folder works too

Per run: the swept values, the state, the job id, step/total, tokens/s, ETA, last train loss, last validation
perplexity and bits per byte (val_bpb: comparable across tokenizers), last checkpoint, requeue count, spikes (loss or
gradient-norm spike events, pretrain/train/spikes.py), and for a run that failed, its error line. Sources:

* sweep.json (launch/sweep.py) lists the runs and their swept values, including runs not started yet; without
  it the run folders under ROOT are listed, their values read from the folder names (key=value,...).
* RUN_DIR/launch.jsonl (pretrain/runs.py): submissions, starts (job id or pid, requeue count, log) and
  exit codes, written by sweep.py, train.sbatch and `sweep.py --local`.
* squeue (all states: finished jobs stay listed for slurmctld's MinJobAge) and, where accounting is enabled,
  sacct: the scheduler's state of each run's latest job, shown in the `slurm` column.
* the run folder: config.yaml (train.steps), metrics.jsonl, checkpoints/latest, the job log (error line). A run
  folder whose launch.jsonl or metrics.jsonl is corrupted (an unreadable line before the last) still gets its row,
  with the file's one-line error in the error column.

`state` is one of: not started, pending (queued), running, finished, failed, diverged (stopped after
non-finite steps, exit 3), preempted (saved on a signal, exit 75, not requeued), stopped (metrics stop short
of train.steps and no launcher record says why: a run started by hand), unknown (squeue did not answer, or a
run file is unreadable).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from pretrain import runs as run_folder
from pretrain.errors import EXIT_USER_ERROR, UserError

# A local run without a launcher record counts as running while its metrics.jsonl changed this recently.
RECENT_S = 300
ERROR_LINE = re.compile(r"(^|\] )error: |^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")
SLURM_ACTIVE = {"PENDING": "pending", "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running",
                "SUSPENDED": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending", "REQUEUE_FED": "pending",
                "RESIZING": "running", "SIGNALING": "running", "STAGE_OUT": "running"}
SLURM_DONE = {"COMPLETED": "finished", "FAILED": "failed", "TIMEOUT": "failed", "CANCELLED": "failed",
              "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed", "BOOT_FAIL": "failed", "DEADLINE": "failed",
              "PREEMPTED": "preempted"}


@dataclass
class RunStatus:
    run: str
    values: dict = field(default_factory=dict)
    state: str = "not started"
    slurm_state: str | None = None
    job_id: str | None = None
    step: int | None = None
    total_steps: int | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None
    train_loss: float | None = None
    val_ppl: float | None = None
    val_bpb: float | None = None
    val_step: int | None = None
    checkpoint: str | None = None
    requeues: int = 0
    spikes: int = 0  # loss or gradient-norm spikes (metrics.jsonl's spike events)
    exit_code: int | None = None
    error: str | None = None
    log: str | None = None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.sweep status",
                                description="One row per run of a sweep: state, progress, losses, errors.")
    p.add_argument("sweep", metavar="NAME|ROOT", help="the sweep's folder, or its --name under --root")
    p.add_argument("--root", default=os.path.join("runs", "sweeps"), help="parent of sweep folders (default: runs/sweeps)")
    p.add_argument("--json", action="store_true", help="print one JSON object {sweep, runs: [...]} instead of a table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        folder = resolve_sweep(args.sweep, args.root)
        rows = sweep_status(folder)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.json:
        json.dump({"sweep": os.path.abspath(folder), "runs": [asdict(r) for r in rows]}, sys.stdout, indent=1)
        print()
    else:
        print(format_table(rows))
    return 0


def resolve_sweep(name: str, root: str) -> str:
    for candidate in (name, os.path.join(root, name)):
        if os.path.isdir(candidate):
            return candidate
    raise UserError(f"no sweep folder {name} (nor {os.path.join(root, name)}); give the sweep's folder or its --name "
                    "(and --root if the sweep was launched with one)")


def list_runs(folder: str) -> list[tuple[str, dict]]:
    """[(run folder, swept values)] from sweep.json, else from the sub-folders' names."""
    if run_folder.is_run_dir(folder) and not os.path.isfile(os.path.join(folder, run_folder.MANIFEST_FILE)):
        return [(folder, {})]
    manifest = run_folder.read_manifest(folder)
    if manifest is not None:
        return [(os.path.join(folder, r["dir"]), dict(r.get("values") or {})) for r in manifest.get("runs", [])]
    runs = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not name.startswith(".") and run_folder.is_run_dir(path):
            pairs = [part.split("=", 1) for part in name.split(",")]
            runs.append((path, {k: v for k, v in pairs} if all(len(p) == 2 for p in pairs) else {}))
    if not runs:
        raise UserError(f"{folder} holds no sweep.json and no run folders; is it the sweep's folder (ROOT/NAME)?")
    return runs


def sweep_status(folder: str) -> list[RunStatus]:
    runs = list_runs(folder)
    events, unreadable = [], []
    for path, _ in runs:
        try:
            events.append(run_folder.read_events(path))
            unreadable.append(None)
        except UserError as e:  # a corrupted launch.jsonl: the run keeps its row, the error goes in it
            events.append([])
            unreadable.append(str(e))
    rows = [run_status(path, values, run_events) for (path, values), run_events in zip(runs, events)]
    unreadable = [error or row.error for error, row in zip(unreadable, rows)]  # run_status: a corrupted metrics.jsonl
    with_jobs = [r for r in rows if r.job_id]
    answered = apply_scheduler_states(with_jobs)
    for row, (path, _), run_events, error in zip(rows, runs, events, unreadable):
        finish_state(row, path, run_events, scheduler_answered=answered or not row.job_id)
        if error:  # what the folder could not tell is said first: the state may rest on missing entries
            row.error = error
            row.state = "unknown" if row.state == "not started" else row.state
    return rows


# ------------------------------------------------------------------------------------------- one run folder


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _total_steps(path: str) -> int | None:
    try:
        train = (run_folder.read_config(path) or {}).get("train") or {}
        return int(train.get("stop_at_step") or train["steps"]) if train.get("steps") else None
    except (AttributeError, ValueError, TypeError, KeyError):
        return None


def run_status(path: str, values: dict, events: list[dict]) -> RunStatus:
    """Everything the run folder says; the state is settled in finish_state (after the scheduler's answer)."""
    row = RunStatus(run=os.path.basename(os.path.normpath(path)), values=values)
    if not os.path.isdir(path):
        return row
    row.total_steps = _total_steps(path)
    try:
        metrics = run_folder.read_metrics(path)
    except UserError as e:  # corrupted: the row shows the file's error, not a traceback
        metrics, row.error = [], str(e)
    train = run_folder.train_records(metrics)
    val = [m for m in metrics if "val_loss" in m]
    row.spikes = run_folder.count_spikes(metrics)
    if train:
        last = train[-1]
        row.step, row.train_loss, row.tokens_per_s = last.get("step"), last.get("loss"), last.get("tokens_per_s")
    if val:
        row.val_ppl, row.val_bpb, row.val_step = val[-1].get("val_ppl"), val[-1].get("val_bpb"), val[-1].get("step")
    row.checkpoint = run_folder.latest_checkpoint(path)
    with_job = [e for e in events if e.get("job_id")]
    if with_job:
        row.job_id = str(with_job[-1]["job_id"])
        # SLURM_RESTART_COUNT of the latest job's newest start = how often that job was requeued
        row.requeues = max((int(e.get("restart") or 0) for e in with_job if str(e["job_id"]) == row.job_id), default=0)
    return row


def apply_scheduler_states(rows: list[RunStatus]) -> bool:
    """slurm_state and elapsed time of each row's job from squeue (all states), else sacct where it works.
    False when there is no scheduler to ask, or it did not answer."""
    if not rows or shutil.which("squeue") is None:
        return False
    ids = sorted({r.job_id for r in rows})
    known: dict[str, tuple[str, str]] = {}
    ok, out, err = _run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%M"])
    if not ok and not (len(ids) == 1 and "Invalid job id" in err):  # one unknown id is an error, several are not
        return False
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            known[parts[0]] = (parts[1], parts[2])
    missing = [r.job_id for r in rows if r.job_id not in known]
    if missing and shutil.which("sacct"):
        _, out, _ = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(missing), "-o", "JobID,State,Elapsed"])
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                known[parts[0]] = (parts[1].split()[0], parts[2])  # "CANCELLED by 0" -> CANCELLED
    for r in rows:
        if r.job_id in known:
            r.slurm_state, elapsed = known[r.job_id]
            r.elapsed_s = _slurm_seconds(elapsed)
    return True


def _run(cmd: list[str]) -> tuple[bool, str, str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, "", str(e)
    return out.returncode == 0, out.stdout if out.returncode == 0 else "", out.stderr


def _slurm_seconds(text: str) -> float | None:
    """squeue/sacct elapsed time [D-]HH:MM:SS or MM:SS -> seconds."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if not m:
        return None
    d, h, mi, s = (int(g or 0) for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def finish_state(row: RunStatus, path: str, events: list[dict], scheduler_answered: bool) -> None:
    """The state from the scheduler's answer, the launcher events and the metrics; elapsed, ETA, error line."""
    last = events[-1] if events else None
    starts = [e for e in events if e["event"] == "start"]
    if last is not None and last["event"] == "exit":
        row.exit_code = last.get("rc")
        if starts and row.elapsed_s is None:
            row.elapsed_s = float(last["time"]) - float(starts[-1]["time"])
    logs = [e["log"] for e in starts if e.get("log")]
    row.log = logs[-1] if logs else None
    if row.log is None and row.job_id and os.path.isfile(os.path.join(path, f"slurm-{row.job_id}.out")):
        row.log = os.path.join(path, f"slurm-{row.job_id}.out")
    reached_end = row.total_steps is not None and row.step is not None and row.step >= row.total_steps

    if row.slurm_state in SLURM_ACTIVE:
        row.state = SLURM_ACTIVE[row.slurm_state]
    elif row.exit_code is not None:  # the launcher recorded how the trainer ended
        row.state = {0: "finished", 75: "preempted", 3: "diverged"}.get(row.exit_code, "failed")
    elif row.slurm_state in SLURM_DONE:
        row.state = SLURM_DONE[row.slurm_state]
    elif last is not None and last["event"] == "start":
        if last.get("launcher") == "local" and last.get("host") == run_folder.hostname():
            alive = _pid_alive(last.get("pid"))
        elif last.get("launcher") == "local":  # started on another machine: judge by the metrics file
            alive = _recently_written(path)
        else:  # a job the scheduler no longer knows ended without train.sbatch's exit record
            alive = None if not scheduler_answered else False
        if alive is None:
            row.state = "unknown"
            row.error = "SLURM did not answer (squeue failed); run `squeue` to see why"
        elif alive:
            row.state = "running"
            row.elapsed_s = time.time() - float(last["time"])
        else:
            row.state = "failed"
            row.error = "the trainer ended without an exit record (killed, cancelled or out of time?)"
    elif last is not None and last["event"] == "submitted":
        if scheduler_answered:
            row.state = "failed"
            row.error = f"job {row.job_id} left the queue without starting (cancelled while pending?)"
        else:
            row.state = "unknown"
            row.error = "SLURM did not answer (squeue failed); run `squeue` to see why"
    elif row.step is None:
        row.state = "not started"
    elif reached_end:
        row.state = "finished"
    elif row.train_loss is not None and not _finite(row.train_loss):
        row.state = "diverged"
    else:
        row.state = "running" if _recently_written(path) else "stopped"
    if row.state in ("failed", "diverged") and row.log:
        row.error = error_line(row.log) or row.error
    if row.state == "running" and row.tokens_per_s and row.step is not None and row.total_steps:
        tokens_per_step = _tokens_per_step(path)
        if tokens_per_step:
            row.eta_s = (row.total_steps - row.step) * tokens_per_step / row.tokens_per_s


def _recently_written(path: str) -> bool:
    try:
        return time.time() - os.path.getmtime(os.path.join(path, run_folder.METRICS_FILE)) < RECENT_S
    except OSError:
        return False


def _tokens_per_step(path: str) -> float | None:
    try:
        cfg = run_folder.read_config(path) or {}
        return float(cfg["train"]["global_batch_size"]) * float(cfg["data"]["seq_len"])
    except (KeyError, TypeError, ValueError):
        return None


def error_line(log: str, max_bytes: int = 1 << 20) -> str | None:
    """The last `error: ...` line (ours, or train.sbatch's) or Python exception line of a log's tail."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - max_bytes))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    found = [line.strip() for line in lines if ERROR_LINE.search(line.strip())]
    # train.sbatch's own summary ("training failed with exit code N") says less than the trainer's line
    specific = [line for line in found if "[train.sbatch" not in line]
    return (specific or found or [None])[-1]


# ------------------------------------------------------------------------------------------------ output


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else (format(value, spec) if _finite(value) else str(value))


def format_table(rows: list[RunStatus]) -> str:
    keys = []
    for r in rows:
        keys += [k for k in r.values if k not in keys]
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    with_slurm = any(r.slurm_state for r in rows)
    header = [short[k] for k in keys] or ["run"]
    header += ["state"] + (["slurm"] if with_slurm else []) + ["job", "step", "tok/s", "elapsed", "ETA", "loss",
                                                               "val_ppl", "val_bpb", "checkpoint", "requeues",
                                                               "spikes", "error"]
    table = [header]
    for r in rows:
        cells = [str(r.values.get(k, "-")) for k in keys] or [r.run]
        cells += [r.state] + ([r.slurm_state or "-"] if with_slurm else [])
        step = "-" if r.step is None else f"{r.step}/{r.total_steps if r.total_steps is not None else '?'}"
        cells += [r.job_id or "-", step, _fmt(r.tokens_per_s, ",.0f"), _fmt_duration(r.elapsed_s), _fmt_duration(r.eta_s),
                  _fmt(r.train_loss, ".4f"), _fmt(r.val_ppl, ".2f"), _fmt(r.val_bpb, ".4f"), r.checkpoint or "-",
                  str(r.requeues), str(r.spikes),
                  (r.error or "-")[:120]]
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines.append(f"{len(rows)} run(s): " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)

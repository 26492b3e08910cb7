"""`python -m launch.sweep status`: a local sweep watched while it runs, and a sweep on the REAL single-node SLURM.

Both sweeps have two runs: one that trains (tiny model, short sequences) and one whose `train.init_from` does not
exist, so its trainer stops at start-up with exit 2 and one `error:` line. The local one is watched while it runs
(running / not started), preempted with SIGUSR1 (exit 75) and then checked; the SLURM one is checked while queued
and after both jobs ended (scheduler states from squeue). Requeue counts are checked by the preemption test in
tests/launch/test_launch_slurm.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes  # starts subprocesses, ranks or training runs (tests/conftest.py: tiers)

REPO = Path(__file__).resolve().parents[2]
TINY = ["data.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=4", "train.warmup_steps=2",
        "eval.interval=0", "logging.interval=1", "logging.progress_bar=false", "logging.backends=[]",
        "checkpoint.interval=0"]
GRID = ["--grid", "train.init_from=null,/nonexistent/weights"]
needs_slurm = pytest.mark.skipif(shutil.which("sbatch") is None,
                                 reason="SLURM is not installed (no sbatch on PATH); start a test cluster with "
                                        "`sudo bash launch/slurm_setup.sh`")


def env(cache: str) -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(drop)}, "PRETRAIN_CACHE": cache,
            "PRETRAIN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "PYTHONUNBUFFERED": "1"}


def status(sweep: Path, cache: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "launch.sweep", "status", str(sweep), "--json"], cwd=REPO,
                         env=env(cache), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["runs"]


def poll(sweep: Path, cache: str, done, timeout: float, what: str) -> list[dict]:
    deadline = time.monotonic() + timeout
    rows = []
    while time.monotonic() < deadline:
        if not (sweep / "sweep.json").is_file():  # the sweep is still validating its runs
            time.sleep(1)
            continue
        rows = status(sweep, cache)
        if done(rows):
            return rows
        time.sleep(1)
    pytest.fail(f"status never showed {what} within {timeout:.0f}s; last: {json.dumps(rows, indent=1)}")


def check_failed_row(row: dict, run_dir: Path) -> None:
    assert row["state"] == "failed" and row["exit_code"] == 2, row
    assert row["values"] == {"train.init_from": "/nonexistent/weights"}, row
    assert row["error"].startswith("error: train.init_from: /nonexistent/weights does not exist"), row
    assert row["step"] is None and row["checkpoint"] is None, row
    assert row["log"] and Path(row["log"]).parent == run_dir, row


def test_local_sweep_status_while_running_and_after(tmp_path, data_cache):
    root = tmp_path / "sweeps"
    sweep_dir = root / "watch"
    cmd = [sys.executable, "-m", "launch.sweep", "configs/tiny.yaml", "train.steps=400", *TINY, *GRID,
           "--name", "watch", "--root", str(root), "--local"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(data_cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rows = poll(sweep_dir, data_cache, lambda r: r[0]["state"] == "running" and (r[0]["step"] or 0) >= 2,
                    240, "the first run training")
        first, second = rows
        assert first["values"] == {"train.init_from": "null"} and first["run"] == "init_from=null", first
        assert first["total_steps"] == 400 and first["tokens_per_s"] > 0 and first["eta_s"] > 0, first
        assert first["job_id"] is None and first["elapsed_s"] >= 0, first
        assert second["state"] == "not started" and second["step"] is None, second
        # preempt the running trainer as SLURM would: SIGUSR1, it saves and exits 75
        events = [json.loads(line) for line in (sweep_dir / "init_from=null" / "launch.jsonl").read_text().splitlines()]
        os.kill(events[-1]["pid"], signal.SIGUSR1)
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1  # one run failed, and the sweep says so
    first, second = status(sweep_dir, data_cache)
    assert first["state"] == "preempted" and first["exit_code"] == 75, first
    assert first["checkpoint"] == f"step_{first['step']:08d}" and 2 <= first["step"] < 400, first
    assert first["eta_s"] is None and first["error"] is None and first["requeues"] == 0, first
    check_failed_row(second, sweep_dir / "init_from=_nonexistent_weights")
    # the table: a header with the swept key, one line per run and a summary
    table = subprocess.run([sys.executable, "-m", "launch.sweep", "status", "watch", "--root", str(root)], cwd=REPO,
                           env=env(data_cache), capture_output=True, text=True, timeout=120)
    lines = table.stdout.splitlines()
    assert table.returncode == 0 and lines[0].split()[:3] == ["init_from", "state", "job"], table.stdout
    assert lines[1].split()[:2] == ["null", "preempted"] and lines[2].split()[:2] == ["/nonexistent/weights", "failed"]
    assert lines[-1] == "2 run(s): 1 preempted, 1 failed"


def test_launch_is_installed_with_the_package(tmp_path):
    # outside the checkout and without PYTHONPATH: only an installed `launch` imports, with its batch script
    code = "import os, launch.sweep, launch.status; print(os.path.isfile(launch.sweep.SCRIPT))"
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr


def test_status_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "launch.sweep", "status", "no-such-sweep", "--root", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: no sweep folder no-such-sweep") and out.stderr.count("\n") == 1
    (tmp_path / "empty").mkdir()
    out = subprocess.run([sys.executable, "-m", "launch.sweep", "status", str(tmp_path / "empty")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "holds no sweep.json and no run folders" in out.stderr


@needs_slurm
def test_slurm_sweep_status(tmp_path, data_cache):
    root = tmp_path / "sweeps"
    sweep_dir = root / "slurm"
    out = subprocess.run([sys.executable, "-m", "launch.sweep", "configs/tiny.yaml", "train.steps=4", *TINY, *GRID,
                          "--name", "slurm", "--root", str(root), "--sbatch=--ntasks-per-node=1 --gpus-per-task=0 --nodes=1"],
                         cwd=REPO, env=env(data_cache), capture_output=True, text=True, timeout=120)
    jobs = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("submitted ")]
    try:
        assert out.returncode == 0 and len(jobs) == 2, out.stderr
        queued = status(sweep_dir, data_cache)  # right after submission: nothing has had time to finish
        assert [r["job_id"] for r in queued] == jobs, queued
        assert all(r["state"] in ("pending", "running") and r["slurm_state"] in ("PENDING", "RUNNING", "CONFIGURING")
                   for r in queued), queued
        rows = poll(sweep_dir, data_cache, lambda r: all(x["state"] not in ("pending", "running") for x in r), 300,
                    "both jobs ended")
    finally:
        for job in jobs:  # a failed test leaves nothing queued behind it
            subprocess.run(["scancel", job], capture_output=True, timeout=30)
    done, failed = rows
    assert done["state"] == "finished" and done["slurm_state"] == "COMPLETED" and done["exit_code"] == 0, done
    assert (done["step"], done["total_steps"], done["checkpoint"]) == (4, 4, "step_00000004"), done
    assert done["job_id"] == jobs[0] and done["requeues"] == 0 and done["tokens_per_s"] > 0, done
    assert done["log"] == str(sweep_dir / "init_from=null" / f"slurm-{jobs[0]}.out") and done["error"] is None, done
    assert failed["slurm_state"] == "FAILED" and failed["job_id"] == jobs[1], failed
    check_failed_row(failed, sweep_dir / "init_from=_nonexistent_weights")

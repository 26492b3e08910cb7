"""launch/train.sbatch and launch/sweep.py on a REAL SLURM cluster (no mocks of sbatch/srun/scontrol).

Start a single-node cluster on this machine with `sudo bash launch/slurm_setup.sh` (CI does); without
`sbatch` on PATH the cluster tests are skipped. Jobs run on CPU (gloo) with `--gpus-per-task=0` overriding
the script's GPU default, 2 tasks per node, a tiny model, short sequences and a handful of steps.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes  # starts subprocesses, ranks or training runs (tests/conftest.py: tiers)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "launch/train.sbatch"
HAVE_SBATCH = shutil.which("sbatch") is not None
needs_slurm = pytest.mark.skipif(
    not HAVE_SBATCH,
    reason="SLURM is not installed (no sbatch on PATH); start a test cluster with `sudo bash launch/slurm_setup.sh`",
)

CPU_NODE = ["--nodes=1", "--gpus-per-task=0"]  # the script asks for one GPU per task by default
TINY = [
    "eval.interval=0", "logging.interval=1", "logging.backends=[]", "data.seq_len=64",
    "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=2",
]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED", "SPECIAL_EXIT"}
JOB_TIMEOUT = 300  # seconds for one tiny job; a few times what it needs on an idle 2-core machine


def job_env() -> dict:
    return {**os.environ, "PRETRAIN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="module")
def cluster():
    """The cluster answers and has a partition that is up; yields a list that collects job ids to clean up."""
    out = subprocess.run(["sinfo", "-h", "-o", "%P %a %D %t"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or " up " not in f" {out.stdout} ":
        pytest.fail(f"sbatch is installed but the cluster is not usable (sinfo: {out.stdout.strip() or out.stderr.strip()}); "
                    "run `sudo bash launch/slurm_setup.sh`")
    jobs: list[str] = []
    yield jobs
    for job in jobs:  # a failed or timed-out test leaves nothing running behind it
        subprocess.run(["scancel", job], capture_output=True, timeout=30)


def sbatch(sbatch_opts: list[str], args: list[str], log_dir: Path, jobs: list[str],
           env: dict | None = None) -> tuple[str, Path]:
    cmd = ["sbatch", "--parsable", f"--output={log_dir}/slurm-%j.out", *sbatch_opts, SCRIPT, *args]
    out = subprocess.run(cmd, cwd=REPO, env={**job_env(), **(env or {})}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{shlex.join(cmd)} failed: {out.stderr.strip()}"
    job = out.stdout.strip().split(";")[0]
    jobs.append(job)
    return job, log_dir / f"slurm-{job}.out"


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout)) if out.returncode == 0 else {}


def tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(lines[-n:])


def describe(job: str, log: Path) -> str:
    info = job_info(job)
    state = {k: info.get(k) for k in ("JobState", "Reason", "ExitCode", "Restarts")}
    return f"job {job} {state}\n--- {log} (last lines) ---\n{tail(log)}"


def wait_for_job(job: str, log: Path, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
    """Poll until the job reaches a final state (a requeued job passes through PENDING and runs again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job)
        if not info:
            pytest.fail(f"job {job} is unknown to scontrol (purged?)\n{describe(job, log)}")
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(1)
    msg = describe(job, log)
    subprocess.run(["scancel", job], capture_output=True, timeout=30)
    pytest.fail(f"job {job} did not finish within {timeout:.0f}s\n{msg}")


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # only the line being written may be incomplete
                raise
    return [r["step"] for r in records if "loss" in r]


def latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


@needs_slurm
def test_sbatch_two_tasks_trains_to_completion(tmp_path, cluster):
    run = tmp_path / "run"
    job, log = sbatch(["--ntasks-per-node=2", *CPU_NODE],
                      ["configs/tiny.yaml", "train.steps=6", "checkpoint.interval=2", *TINY, f"run.dir={run}"],
                      tmp_path, cluster)
    info = wait_for_job(job, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", describe(job, log)
    text = log.read_text()
    assert "on 2 rank(s) [tp=1 pp=1 dp=2" in text, f"expected 2 ranks from srun's SLURM_PROCID/SLURM_NTASKS\n{describe(job, log)}"
    assert "fresh start" in text and "training finished" in text, describe(job, log)
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/latest"):
        assert (run / name).is_file(), f"{run / name} missing\n{describe(job, log)}"
    assert latest(run) == "step_00000006"
    assert logged_steps(run) == [1, 2, 3, 4, 5, 6], describe(job, log)


@needs_slurm
def test_preemption_saves_exits_75_requeues_and_resumes(tmp_path, cluster):
    steps = 120
    run = tmp_path / "run"
    # checkpoint.interval=0: the only checkpoint before the end is the one the signal causes.
    job, log = sbatch(["--ntasks-per-node=2", *CPU_NODE],
                      ["configs/tiny.yaml", f"train.steps={steps}", "checkpoint.interval=0", *TINY, f"run.dir={run}"],
                      tmp_path, cluster)

    deadline = time.monotonic() + JOB_TIMEOUT
    while len(logged_steps(run)) < 3:
        if job_info(job).get("JobState") in TERMINAL:
            pytest.fail(f"job ended before it logged 3 steps\n{describe(job, log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no 3 logged steps within {JOB_TIMEOUT}s\n{describe(job, log)}")
        time.sleep(0.2)
    # What `#SBATCH --signal=B:USR1@120` does before the time limit: SIGUSR1 to the batch shell only,
    # which forwards it to the tasks through srun.
    out = subprocess.run(["scancel", "--batch", "--signal=USR1", job], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"scancel --batch --signal=USR1 {job}: {out.stderr}"

    info = wait_for_job(job, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", describe(job, log)
    assert int(info.get("Restarts", 0)) == 1, f"expected exactly one requeue\n{describe(job, log)}"
    assert "got SIGUSR1" in text, describe(job, log)
    saved = re.search(r"stopping on signal after saving step (\d+); .*\(exit 75\)", text)
    assert saved, f"the trainer did not save and stop on the signal\n{describe(job, log)}"
    stop = int(saved.group(1))
    assert 3 <= stop < steps, f"stopped at step {stop}\n{describe(job, log)}"
    assert "stopped (exit 75); requeueing job" in text, f"srun did not return the trainer's 75\n{describe(job, log)}"
    assert f"resuming from {run}/checkpoints/step_{stop:08d}" in text, describe(job, log)
    assert "restart 1]" in text and "training finished" in text, describe(job, log)
    logged = logged_steps(run)
    assert len(logged) == len(set(logged)), f"a step was logged twice: {logged}"
    assert logged == list(range(1, steps + 1)), f"steps do not continue 1..{steps}: {logged}"
    assert latest(run) == f"step_{steps:08d}"
    # the job's launch record: two starts (restart 0 and 1), exits 75 then 0; status counts one requeue
    events = [json.loads(line) for line in (run / "launch.jsonl").read_text().splitlines()]
    assert [(e["event"], e["restart"], e.get("rc")) for e in events] == [
        ("start", 0, None), ("exit", 0, 75), ("start", 1, None), ("exit", 1, 0)], events
    out = subprocess.run([sys.executable, "-m", "launch.sweep", "status", str(run), "--json"], cwd=REPO, env=job_env(),
                         capture_output=True, text=True, timeout=120)
    (row,) = json.loads(out.stdout)["runs"]
    assert (row["state"], row["job_id"], row["requeues"], row["step"]) == ("finished", job, 1, steps), row


def sweep(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.sweep", *args], cwd=REPO, env=env or job_env(),
                          capture_output=True, text=True, timeout=120)


def test_sweep_dry_run_and_validation(tmp_path):
    root = tmp_path / "sweeps"
    out = sweep("configs/tiny.yaml", "train.steps=5", "--grid", "model.norm_scheme=pre_ln,lns,ln_free",
                "model.preset=tiny,130m", "--name", "ablation", "--root", str(root), "--dry-run")
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(line) for line in out.stdout.splitlines()]
    assert len(commands) == 6, out.stdout
    run_dirs = set()
    for cmd in commands:
        assert cmd[0] == "sbatch" and SCRIPT in cmd, cmd
        args = cmd[cmd.index(SCRIPT) + 1:]
        assert args[:2] == ["configs/tiny.yaml", "train.steps=5"], args
        (run_dir,) = [a.split("=", 1)[1] for a in args if a.startswith("run.dir=")]
        scheme = next(a.split("=", 1)[1] for a in args if a.startswith("model.norm_scheme="))
        preset = next(a.split("=", 1)[1] for a in args if a.startswith("model.preset="))
        assert run_dir == f"{root}/ablation/norm_scheme={scheme},preset={preset}", run_dir
        assert f"--output={run_dir}/slurm-%j.out" in cmd, cmd
        run_dirs.add(run_dir)
    assert len(run_dirs) == 6
    assert not root.exists(), "a dry run must not create run folders"

    # A typo in a grid key: one line, exit 2, nothing printed on stdout (also as `python launch/sweep.py`).
    bad = subprocess.run([sys.executable, "launch/sweep.py", "configs/tiny.yaml", "--grid", "model.norm_schem=x",
                          "--dry-run"], cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2, bad
    assert bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.norm_schem" in lines[0], bad.stderr

    # A bad value in the second combination: nothing is submitted (an sbatch on PATH that records calls).
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "sbatch-calls"
    (fake_bin / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\necho 1\n")
    (fake_bin / "sbatch").chmod(0o755)
    env = {**job_env(), "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    bad = sweep("configs/tiny.yaml", "--grid", "model.norm_scheme=pre_ln,bogus", "--root", str(root), env=env)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad
    assert "bogus" in bad.stderr and "pre_ln" in bad.stderr, bad.stderr
    assert not calls.exists(), f"sbatch was called before validation failed: {calls.read_text()}"
    assert not root.exists()


@needs_slurm
def test_sweep_submits_two_runs_that_finish(tmp_path, cluster):
    root = tmp_path / "sweeps"
    out = sweep("configs/tiny.yaml", "train.steps=4", "checkpoint.interval=0", *TINY,
                "--grid", "model.norm_scheme=pre_ln,lns", "train.seed=0", "--name", "norms", "--root", str(root),
                "--sbatch=--ntasks-per-node=1 --gpus-per-task=0 --nodes=1")
    submitted = re.findall(r"^submitted (\d+) (\S+)$", out.stdout, re.M)
    cluster.extend(job for job, _ in submitted)
    assert out.returncode == 0, out.stderr
    assert len(submitted) == 2, out.stdout
    expected = {f"{root}/norms/norm_scheme={s},seed=0": s for s in ("pre_ln", "lns")}
    assert {run for _, run in submitted} == set(expected), out.stdout
    for job, run_dir in submitted:
        run = Path(run_dir)
        log = run / f"slurm-{job}.out"
        info = wait_for_job(job, log)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", describe(job, log)
        assert logged_steps(run) == [1, 2, 3, 4], describe(job, log)
        assert latest(run) == "step_00000004"
        assert f"norm_scheme: {expected[run_dir]}" in (run / "config.yaml").read_text()

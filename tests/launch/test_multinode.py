"""Training across nodes on a REAL two-node SLURM cluster on this machine (`sudo bash launch/slurm_setup.sh
--nodes 2`, which CI runs): node1 and node2 each have their own network namespace, address and hostname, so a
job sees two hosts. Ranks placed across them must rendezvous at the first node's address and train as one run on
one node does; a preemption signal must lose no step; a node that dies must end the job, and the run must resume
on what is left.

Without the `multi` partition the cluster tests are skipped (under CI=true they fail: CI must run them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_launch_slurm import REPO, JOB_TIMEOUT, TERMINAL, TINY, describe, job_info, logged_steps, sbatch, wait_for_job
from helpers.train import TINY as TRAIN_TINY
from helpers.train import run_train, train_losses

from pretrain.train.distributed import Topology, placement

pytestmark = pytest.mark.processes  # starts subprocesses, ranks or training runs (tests/conftest.py: tiers)

PARTITION = "multi"
TWO_NODES = [f"--partition={PARTITION}", "--nodes=2", "--ntasks-per-node=2", "--gpus-per-task=0"]
DP4 = ["train.micro_batch_size=1"]  # 4 data-parallel ranks share test_launch_slurm.TINY's global batch of 4


def multi_nodes() -> list[str]:
    """The nodes of the `multi` partition that can take a job ([] without SLURM or without that partition)."""
    if shutil.which("sinfo") is None:
        return []
    out = subprocess.run(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %t"], capture_output=True, text=True,
                         timeout=30)
    if out.returncode != 0:
        return []
    return [line.split()[0] for line in out.stdout.splitlines() if line.split()[1].rstrip("*~#!%$@^-") in
            ("idle", "mix", "alloc", "comp")]


@pytest.fixture(scope="module")
def two_nodes():
    """node1 and node2 up in partition `multi`; yields a list that collects job ids to cancel afterwards."""
    nodes = multi_nodes()
    if len(nodes) < 2:
        reason = (f"no two-node partition '{PARTITION}' up (sinfo: {nodes}); start one with "
                  "`sudo bash launch/slurm_setup.sh --nodes 2`")
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    jobs: list[str] = []
    yield jobs
    for job in jobs:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)


def test_placement_names_each_nodes_ranks_and_warns_of_split_tensor_parallel_groups():
    cpu = torch.device("cpu")
    good = Topology(0, 4, 0, tp=2, pp=2, dp=1, tp_rank=0, pp_rank=0, dp_rank=0, device=cpu,
                    hosts=("node1", "node1", "node2", "node2"))
    assert placement(good) == ["placement: node1: ranks 0 (tp 0 pp 0 dp 0), 1 (tp 1 pp 0 dp 0)",
                               "placement: node2: ranks 2 (tp 0 pp 1 dp 0), 3 (tp 1 pp 1 dp 0)"]
    split = Topology(0, 4, 0, tp=2, pp=1, dp=2, tp_rank=0, pp_rank=0, dp_rank=0, device=cpu,
                     hosts=("node1", "node2", "node1", "node2"))
    assert placement(split)[-1] == ("warning: tensor-parallel group(s) (0, 1), (2, 3) span nodes; make the tasks "
                                    "per node a multiple of parallel.tp=2")
    assert placement(Topology(0, 1, 0, 1, 1, 1, 0, 0, 0, cpu)) == []


def test_tp2_pp2_across_two_nodes_matches_one_node(tmp_path, two_nodes, data_cache):
    steps = 4
    run = tmp_path / "run"
    layout = ["parallel.tp=2", "parallel.pp=2", f"train.steps={steps}", "checkpoint.interval=0"]
    job, log = sbatch(TWO_NODES, ["configs/tiny.yaml", *TRAIN_TINY, *TINY, *layout, f"run.dir={run}"], tmp_path,
                      two_nodes, env={"PRETRAIN_CACHE": data_cache})
    info = wait_for_job(job, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", describe(job, log)
    text = log.read_text()
    # the rendezvous is the first node's address, tensor-parallel pairs stay in a node, the pipeline spans both
    assert re.search(r"master node1:\d+", text), describe(job, log)
    assert "placement: node1: ranks 0 (tp 0 pp 0 dp 0), 1 (tp 1 pp 0 dp 0)" in text, describe(job, log)
    assert "placement: node2: ranks 2 (tp 0 pp 1 dp 0), 3 (tp 1 pp 1 dp 0)" in text, describe(job, log)
    assert "span nodes" not in text
    reference = tmp_path / "one-node"
    run_train(str(reference), *TINY, *layout, nproc=4, cache_dir=data_cache)  # after helpers.train.TINY, as above
    got, want = train_losses(str(run)), train_losses(str(reference))
    assert sorted(got) == list(range(1, steps + 1)), describe(job, log)
    assert all(got[s] == pytest.approx(want[s], rel=1e-6) for s in want), (got, want)


def wait_until(condition, job: str, log: Path, what: str, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if job_info(job).get("JobState") in TERMINAL:
            pytest.fail(f"job ended before {what}\n{describe(job, log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout:.0f}s\n{describe(job, log)}")
        time.sleep(0.2)


def test_preemption_across_nodes_saves_once_requeues_and_loses_no_step(tmp_path, two_nodes, data_cache):
    steps = 40
    run = tmp_path / "run"
    job, log = sbatch(TWO_NODES, ["configs/tiny.yaml", *TRAIN_TINY, *TINY, *DP4, f"train.steps={steps}",
                                  "checkpoint.interval=0", f"run.dir={run}"], tmp_path, two_nodes,
                      env={"PRETRAIN_CACHE": data_cache})
    wait_until(lambda: len(logged_steps(run)) >= 3, job, log, "3 logged steps")
    # what `#SBATCH --signal=B:USR1@120` does before the time limit: the batch shell forwards it to all 4 tasks
    out = subprocess.run(["scancel", "--batch", "--signal=USR1", job], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    info = wait_for_job(job, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and int(info.get("Restarts", 0)) == 1, describe(job, log)
    saved = re.findall(r"stopping on signal after saving step (\d+)", text)
    assert len(saved) == 1, describe(job, log)  # one checkpoint, written once by all four ranks together
    stop = int(saved[0])
    assert f"resuming from {run}/checkpoints/step_{stop:08d}" in text and "on 4 rank(s)" in text, describe(job, log)
    assert logged_steps(run) == list(range(1, steps + 1)), describe(job, log)  # no step lost, none twice


def test_node_loss_ends_the_job_with_a_reason_and_resumes_on_the_remaining_node(tmp_path, two_nodes, data_cache):
    steps, interval = 200, 2
    run = tmp_path / "run"
    common = ["configs/tiny.yaml", *TRAIN_TINY, *TINY, *DP4, f"train.steps={steps}",
              f"checkpoint.interval={interval}", f"run.dir={run}"]
    job, log = sbatch(TWO_NODES, common, tmp_path, two_nodes,
                      env={"PRETRAIN_CACHE": data_cache, "PRETRAIN_SRUN_WAIT": "30"})
    latest = run / "checkpoints" / "latest"
    wait_until(lambda: latest.is_file() and latest.read_text().strip() >= "step_00000004", job, log,
               "a checkpoint at step 4")
    killed = kill_node_tasks("node2")
    assert killed, f"no pretrain process found on node2\n{describe(job, log)}"
    t0 = time.monotonic()
    info = wait_for_job(job, log, timeout=240)
    ended = time.monotonic() - t0
    print(f"node loss -> job end: {ended:.1f} s")
    text = log.read_text()
    assert info["JobState"] == "FAILED", describe(job, log)
    reasons = [line for line in text.splitlines() if "error: training failed" in line]
    assert len(reasons) == 1 and "node2" in reasons[0], describe(job, log)
    # no torn checkpoint: `latest` names a complete one, every folder left is complete or is removed on resume
    tag = latest.read_text().strip()
    assert (run / "checkpoints" / tag / "trainer_state.json").is_file()
    # resubmitted on node1 alone: two ranks (data parallel 2 instead of 4) continue from `latest`
    job2, log2 = sbatch([f"--partition={PARTITION}", "--nodes=1", "--nodelist=node1", "--ntasks-per-node=2",
                         "--gpus-per-task=0"], [*common, f"train.stop_at_step={int(tag[5:]) + 4}"], tmp_path, two_nodes,
                        env={"PRETRAIN_CACHE": data_cache})
    info2 = wait_for_job(job2, log2)
    assert info2["JobState"] == "COMPLETED", describe(job2, log2)
    assert "resume: another layout" in log2.read_text(), describe(job2, log2)
    reference = tmp_path / "reference"
    run_train(str(reference), *TINY, *DP4, f"train.steps={steps}", f"train.stop_at_step={int(tag[5:]) + 4}",
              cache_dir=data_cache)
    got, want = train_losses(str(run)), train_losses(str(reference))
    resumed = range(int(tag[5:]) + 1, int(tag[5:]) + 5)
    assert all(got[s] == pytest.approx(want[s], rel=1e-4) for s in resumed), ({s: got[s] for s in resumed}, want)


def kill_node_tasks(node: str) -> list[int]:
    """SIGKILL every `pretrain train` process of the test node's network namespace: the node's tasks die as on
    a crashed host (its slurmd lives on and reports them)."""
    out = subprocess.run(["ip", "netns", "pids", f"nl-{node}"], capture_output=True, text=True, timeout=30)
    killed = []
    for pid in map(int, out.stdout.split()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pretrain" in cmdline and b"train" in cmdline:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def test_sweep_on_two_nodes_shows_job_ids_and_states(tmp_path, two_nodes, data_cache):
    """Two runs of two nodes each: the second waits for the first (each takes both nodes' CPUs), so `status`
    shows one running and one pending, then both finished, under the job ids sbatch gave."""
    from test_sweep_status import env, poll

    root = tmp_path / "sweeps"
    sweep_dir = root / "nodes"
    opts = " ".join(TWO_NODES)
    out = subprocess.run([sys.executable, "-m", "launch.sweep", "configs/tiny.yaml", "train.steps=30", *TRAIN_TINY,
                          *TINY, *DP4, "--grid", "train.seed=0,1", "--name", "nodes", "--root", str(root),
                          f"--sbatch={opts}"], cwd=REPO, env=env(data_cache), capture_output=True, text=True,
                         timeout=120)
    jobs = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("submitted ")]
    two_nodes.extend(jobs)
    assert out.returncode == 0 and len(jobs) == 2, out.stderr
    rows = poll(sweep_dir, data_cache, lambda r: [x["state"] for x in r] == ["running", "pending"], 240,
                "the first run on both nodes while the second waits")
    assert [r["job_id"] for r in rows] == jobs and rows[1]["slurm_state"] == "PENDING", rows
    rows = poll(sweep_dir, data_cache, lambda r: all(x["state"] == "finished" for x in r), 300, "both finished")
    assert [(r["job_id"], r["slurm_state"], r["step"]) for r in rows] == [(j, "COMPLETED", 30) for j in jobs], rows
    for job, row in zip(jobs, rows):
        assert "2 node(s) [node[1-2]], 4 task(s)" in Path(row["log"]).read_text(), row

"""`launch.sweep` submitting through stand-in `sinfo` and `sbatch` commands (shell scripts first on PATH): GPUs are
requested only where the cluster has them, an sbatch refusal exits 2 with a hint, and sweep.json lists only the
runs that were submitted. tests/launch/test_launch_slurm.py submits to a real SLURM."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers.train import REPO

pytestmark = pytest.mark.processes  # runs the launcher and its stand-in commands as processes

GRES_ERROR = "sbatch: error: Invalid generic resource (gres) specification"


def fake_slurm(tmp_path, gres: str, fail_from: int | None = None, message: str = GRES_ERROR) -> dict:
    """PATH with an `sinfo` printing `gres` and an `sbatch` that logs its arguments and prints a job id, refusing from
    its `fail_from`-th call on (1-based) or whenever --gpus-per-task=1 is asked of a cluster without GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text(f"#!/bin/sh\nprintf '%s\\n' '{gres}'\n")
    log = tmp_path / "sbatch.log"
    (bin_dir / "sbatch").write_text(f"""#!/bin/sh
echo "$@" >> {log}
n=$(wc -l < {log})
if [ -n "{fail_from or ''}" ] && [ "$n" -ge "{fail_from or 0}" ]; then echo "{message}" >&2; exit 1; fi
case "{gres}" in *gpu*) ;; *) case "$*" in *--gpus-per-task=0*) ;; *) echo "{GRES_ERROR}" >&2; exit 1;; esac;; esac
echo "$((100 + n));cluster"
""")
    for f in ("sinfo", "sbatch"):
        os.chmod(bin_dir / f, 0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def sweep(env, root, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.sweep", os.path.join(REPO, "configs", "tiny.yaml"),
                           "--grid", "model.norm_scheme=pre_ln,lns", "--root", str(root), "--name", "s", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_a_cluster_without_gpus_gets_cpu_jobs_and_says_so(tmp_path):
    env = fake_slurm(tmp_path, "(null)")
    proc = sweep(env, tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr
    assert "has no GPUs (sinfo lists no gpu resource): submitting with --gpus-per-task=0" in proc.stdout
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    assert len(calls) == 2 and all("--gpus-per-task=0" in c for c in calls)
    manifest = json.loads((tmp_path / "runs" / "s" / "sweep.json").read_text())
    assert [r["dir"] for r in manifest["runs"]] == ["norm_scheme=pre_ln", "norm_scheme=lns"]


def test_gpus_are_requested_where_the_cluster_has_them_or_when_asked(tmp_path):
    env = fake_slurm(tmp_path, "gpu:h100:8")
    assert sweep(env, tmp_path / "a").returncode == 0
    assert all("--gpus-per-task=0" not in c for c in (tmp_path / "sbatch.log").read_text().splitlines())
    (tmp_path / "b").mkdir()
    env = fake_slurm(tmp_path / "b", "(null)")  # no GPUs, but the user asks for a gres: theirs to choose
    proc = sweep(env, tmp_path / "b" / "runs", "--sbatch=--gres=gpu:1")
    assert "has no GPUs" not in proc.stdout and proc.returncode == 2


def test_an_sbatch_refusal_exits_2_with_the_hint_and_leaves_no_sweep(tmp_path):
    env = fake_slurm(tmp_path, "gpu:h100:8", fail_from=1)
    proc = sweep(env, tmp_path / "runs")
    assert proc.returncode == 2
    assert f"{GRES_ERROR}; this cluster may have no GPUs: pass --sbatch=\"--gpus-per-task=0\"" in proc.stderr
    assert not (tmp_path / "runs" / "s" / "sweep.json").exists()
    assert not (tmp_path / "runs" / "s" / "norm_scheme=pre_ln").exists()  # the folder made for --output: removed


def test_a_refusal_midway_lists_only_the_submitted_runs(tmp_path):
    env = fake_slurm(tmp_path, "gpu:h100:8", fail_from=2, message="sbatch: error: QOSMaxSubmitJobPerUserLimit")
    proc = sweep(env, tmp_path / "runs")
    assert proc.returncode == 2
    assert "QOSMaxSubmitJobPerUserLimit; check the --sbatch options and the batch script" in proc.stderr
    assert "already submitted and listed in" in proc.stderr and " 101 " in proc.stderr + " "
    manifest = json.loads((tmp_path / "runs" / "s" / "sweep.json").read_text())
    assert [r["dir"] for r in manifest["runs"]] == ["norm_scheme=pre_ln"]
    assert not (tmp_path / "runs" / "s" / "norm_scheme=lns").exists()

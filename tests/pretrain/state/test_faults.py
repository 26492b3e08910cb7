"""Faults a shared cluster brings, end to end: a disk that fills up while a checkpoint is written."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from helpers.train import latest, run_train, train_losses

pytestmark = pytest.mark.processes  # starts subprocesses, ranks or training runs (tests/conftest.py: tiers)


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MB tmpfs: room for one checkpoint of the tiny model (about 25 MB in fp32 with Adam), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield str(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_during_a_save_is_one_line_keeps_latest_and_resumes(small_disk, tmp_path, data_cache):
    run = os.path.join(small_disk, "run")
    proc = run_train(run, "train.steps=6", "checkpoint.interval=2", "checkpoint.keep=0", cache_dir=data_cache,
                     expect=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = errors[0]
    assert "checkpoint of step 4 could not be written to" in message and "step_00000004" in message
    assert "a checkpoint of this run takes" in message and "were free there when it began" in message, message
    assert "latest still names step_00000002" in message
    # the partial folder is gone, `latest` names the last complete step
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", "step_00000002"]
    assert latest(run) == "step_00000002"
    # moved to a disk with room, the run resumes from step 2 and logs the losses of an uninterrupted run
    moved = str(tmp_path / "moved")
    shutil.copytree(run, moved)
    run_train(moved, "train.steps=6", "checkpoint.interval=2", "checkpoint.keep=0", "train.resume=auto",
              cache_dir=data_cache)
    reference = str(tmp_path / "reference")
    run_train(reference, "train.steps=6", cache_dir=data_cache)
    got, want = train_losses(moved), train_losses(reference)
    assert sorted(got) == list(range(1, 7)) and all(got[s] == pytest.approx(want[s], rel=1e-6) for s in want)

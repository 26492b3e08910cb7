"""launcher_env: each launcher's variables, and a partial or inconsistent environment as a one-line UserError."""

import os

import pytest

from pretrain.train.distributed import launcher_env
from pretrain.errors import UserError

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Start every test without any launcher's variables (the test runner may itself run under one)."""
    for name in list(os.environ):
        if name in LAUNCHER_VARS or name.startswith("SLURM_"):
            monkeypatch.delenv(name)


def setenv(monkeypatch, **variables):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def refused(match):
    """launcher_env() raises a one-line UserError matching `match`."""
    with pytest.raises(UserError, match=match) as e:
        launcher_env()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_no_launcher_is_one_process():
    env = launcher_env()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")
    assert 0 < int(env["MASTER_PORT"]) < 65536


def test_master_addr_and_port_alone_are_one_process(monkeypatch):
    # Batch scripts export these for the launcher they then call; the script's own python runs as one process.
    setenv(monkeypatch, MASTER_ADDR="node7", MASTER_PORT="29500")
    env = launcher_env()
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")


def test_torchrun_environment(monkeypatch):
    setenv(monkeypatch, RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="node1", MASTER_PORT="29500")
    assert launcher_env() == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node1", "MASTER_PORT": "29500",
    }


def test_single_rank_without_master_is_fine(monkeypatch):
    setenv(monkeypatch, RANK="0", WORLD_SIZE="1")
    env = launcher_env()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")


def test_rank_without_world_size_is_refused(monkeypatch):
    # The bug this guards: RANK=1 alone used to run as a single process, training alone.
    setenv(monkeypatch, RANK="1")
    msg = refused(r"RANK=1 is set but WORLD_SIZE is not \(a partial launcher environment\)")
    assert "torchrun" in msg and "unset RANK" in msg


def test_world_size_without_rank_is_refused(monkeypatch):
    setenv(monkeypatch, WORLD_SIZE="2", MASTER_ADDR="n1", MASTER_PORT="29500")
    refused(r"WORLD_SIZE=2 is set but RANK is not.*launch with torchrun, deepspeed or srun.*unset WORLD_SIZE")


def test_local_rank_alone_is_refused(monkeypatch):
    setenv(monkeypatch, LOCAL_RANK="0")
    refused(r"LOCAL_RANK=0 is set but RANK and WORLD_SIZE are not.*unset LOCAL_RANK to run as one process")


@pytest.mark.parametrize("variables,match", [
    (dict(RANK="2", WORLD_SIZE="2"), r"RANK=2 is not below WORLD_SIZE=2 \(ranks are 0..WORLD_SIZE-1\)"),
    (dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="5"), r"LOCAL_RANK=5 is not below WORLD_SIZE=2"),
    (dict(RANK="one", WORLD_SIZE="2"), r"RANK='one' is not an integer >= 0; fix or unset it"),
    (dict(RANK="-1", WORLD_SIZE="2"), r"RANK='-1' is not an integer >= 0"),
    (dict(RANK="0", WORLD_SIZE="0"), r"WORLD_SIZE='0' is not an integer >= 1"),
    (dict(RANK="0", WORLD_SIZE="2.5"), r"WORLD_SIZE='2.5' is not an integer >= 1"),
    (dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK=""), r"LOCAL_RANK='' is not an integer >= 0"),
    (dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="n1", MASTER_PORT="http"), r"MASTER_PORT='http' is not an integer"),
    (dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="n1", MASTER_PORT="70000"), r"MASTER_PORT=70000 is not a TCP port"),
    (dict(RANK="1", WORLD_SIZE="2", MASTER_PORT="29500"), r"RANK/WORLD_SIZE are set but MASTER_ADDR is not"),
])
def test_inconsistent_torchrun_environment_is_refused(monkeypatch, variables, match):
    setenv(monkeypatch, **variables)
    refused(match)


SRUN_STEP = dict(SLURM_PROCID="1", SLURM_STEP_ID="0", SLURM_LOCALID="1", SLURM_JOB_ID="123456",
                 SLURM_JOB_NODELIST="node1", MASTER_ADDR="node1")


def test_srun_step(monkeypatch):
    setenv(monkeypatch, **SRUN_STEP, SLURM_NTASKS="4")
    assert launcher_env() == {
        "RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node1",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }


def test_srun_single_task_and_batch_shell_are_one_process(monkeypatch):
    setenv(monkeypatch, SLURM_PROCID="0", SLURM_STEP_ID="0", SLURM_NTASKS="1")
    assert launcher_env()["WORLD_SIZE"] == "1"
    # A batch script's shell: SLURM_PROCID=0 and the job's SLURM_NTASKS, but no step: one process.
    monkeypatch.delenv("SLURM_STEP_ID")
    setenv(monkeypatch, SLURM_NTASKS="8", SLURM_JOB_NODELIST="node[1-2]")
    env = launcher_env()
    assert (env["RANK"], env["WORLD_SIZE"]) == ("0", "1")


@pytest.mark.parametrize("variables,match", [
    (dict(), r"inside an srun step \(SLURM_PROCID, SLURM_STEP_ID set\) but SLURM_NTASKS is not; start the step with srun"),
    (dict(SLURM_NTASKS="four"), r"SLURM_NTASKS='four' is not an integer >= 1"),
    (dict(SLURM_NTASKS="0"), r"SLURM_NTASKS='0' is not an integer >= 1"),
    (dict(SLURM_NTASKS="4", SLURM_PROCID="x"), r"SLURM_PROCID='x' is not an integer >= 0"),
    (dict(SLURM_NTASKS="4", SLURM_PROCID="4"), r"SLURM_PROCID=4 is not below SLURM_NTASKS=4"),
    (dict(SLURM_NTASKS="4", SLURM_LOCALID="?"), r"SLURM_LOCALID='\?' is not an integer >= 0"),
])
def test_inconsistent_srun_step_is_refused(monkeypatch, variables, match):
    setenv(monkeypatch, **{**SRUN_STEP, **variables})
    refused(match)


@pytest.mark.processes
def test_a_lone_process_binds_no_port(tmp_path):
    """Two single-process runs started at once on one machine must not race for a rendezvous port (free_port()
    is free only until somebody binds it): a lone process uses an in-process store, so even a port another run's
    rendezvous server holds does not matter."""
    import subprocess
    import sys
    from datetime import timedelta

    import torch.distributed as dist

    # Another run's rendezvous server, holding its port the way torch holds it.
    held = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True, timeout=timedelta(seconds=30))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    env["DS_ACCELERATOR"] = "cpu"
    code = ("import pretrain.train.distributed as d\n"
            f"d.free_port = lambda: {held.port}  # the race lost: the port picked was bound by the other run\n"
            "from pretrain.train.distributed import init_distributed, shutdown\n"
            "topo = init_distributed(1, 1)\nprint('world', topo.world_size)\nshutdown()\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
    del held
    assert out.returncode == 0 and "world 1" in out.stdout, out.stderr[-2000:]

"""Process-group and topology set-up: one place that reads the launcher's environment.

Supported launchers: none (a single process), `torchrun` / `deepspeed` / `pretrain train --nproc-per-node`
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and SLURM's `srun` (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID, SLURM_JOB_NODELIST). megatron-core's `parallel_state` and DeepSpeed's pipeline topology are
built from the same sizes and their (tp, pp, dp) coordinates are checked to agree on every rank.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import warnings
from dataclasses import dataclass

import torch

from pretrain.errors import UserError


def use_cpu_accelerator_without_gpu() -> None:
    """DeepSpeed picks its accelerator at import; on a machine without CUDA it must be told to use the CPU.
    Also silences megatron-core's import-time warnings about Transformer Engine / Apex, which we don't use."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # A CUDA build of torch on a machine without a GPU (a login node, CI) finds the CUDA toolkit and warns at
        # DeepSpeed's import that there is no CUDA runtime: expected there, and not the user's to fix.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    # Advice aimed at CUDA clusters / deprecations inside megatron-core and DeepSpeed, not actionable by users.
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated.*")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*is deprecated.*")


use_cpu_accelerator_without_gpu()  # before DeepSpeed's import below picks its accelerator

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology  # noqa: E402

from pretrain.compat import load_megatron_core, megatron_parallel_state, skip_shm_comm_op  # noqa: E402

# megatron-core's process groups, without the rest of megatron-core (loaded by init_distributed under TP > 1 only)
parallel_state = megatron_parallel_state()


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    hosts: tuple[str, ...] = ()  # every rank's hostname, by rank (multi-rank runs)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def launcher_env() -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from whichever launcher started us.

    A partial or inconsistent launcher environment (RANK without WORLD_SIZE, a rank outside the world, a
    non-integer) is a one-line UserError rather than a rank silently training alone as a single process.
    MASTER_ADDR/MASTER_PORT alone are normal (batch scripts export them for the launcher), and so is a SLURM
    batch or salloc shell (SLURM_PROCID without SLURM_STEP_ID): both run as one process.
    """
    env = os.environ
    torch_vars = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in env]
    if torch_vars:
        missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
        if missing:
            given = ", ".join(f"{k}={env[k]}" for k in torch_vars)
            raise UserError(
                f"{given} {'is' if len(torch_vars) == 1 else 'are'} set but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not (a partial launcher environment); launch with torchrun, "
                f"deepspeed or srun, which set them all, or unset {', '.join(torch_vars)} to run as one process"
            )
        world = _int_var("WORLD_SIZE", 1)
        rank = _int_var("RANK", 0)
        local_rank = _int_var("LOCAL_RANK", 0) if "LOCAL_RANK" in env else 0
        for name, value in (("RANK", rank), ("LOCAL_RANK", local_rank)):
            if value >= world:
                raise UserError(
                    f"{name}={value} is not below WORLD_SIZE={world} (ranks are 0..WORLD_SIZE-1); fix the launcher "
                    "environment, or launch with torchrun, deepspeed or srun"
                )
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing and world > 1:
            raise UserError(
                f"RANK/WORLD_SIZE are set but {', '.join(missing)} is not; launch with torchrun, deepspeed or srun"
            )
        return {
            "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
            "MASTER_ADDR": env.get("MASTER_ADDR") or "127.0.0.1",
            "MASTER_PORT": str(_port()) if env.get("MASTER_PORT") else str(free_port()),
        }
    # Only inside an srun step: a batch script or salloc shell also has SLURM_PROCID=0 and the job's SLURM_NTASKS.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        if "SLURM_NTASKS" not in env:
            raise UserError(
                "inside an srun step (SLURM_PROCID, SLURM_STEP_ID set) but SLURM_NTASKS is not; start the step with "
                "srun --ntasks=N (or sbatch --ntasks), or set RANK/WORLD_SIZE yourself"
            )
        world = _int_var("SLURM_NTASKS", 1)
        rank = _int_var("SLURM_PROCID", 0)
        if rank >= world:
            raise UserError(
                f"SLURM_PROCID={rank} is not below SLURM_NTASKS={world}; start the step with srun (its variables agree)"
            )
        if world > 1:
            local_rank = _int_var("SLURM_LOCALID", 0) if "SLURM_LOCALID" in env else 0
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise UserError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not; start the job with sbatch/srun")
            job_id = _int_var("SLURM_JOB_ID", 0) if env.get("SLURM_JOB_ID") else 0
            return {
                "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
                "MASTER_ADDR": env.get("MASTER_ADDR") or first_slurm_host(nodelist),
                # One port per job, so two jobs sharing a node don't collide.
                "MASTER_PORT": str(_port()) if env.get("MASTER_PORT") else str(20000 + job_id % 20000),
            }
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


def _int_var(name: str, minimum: int) -> int:
    """The integer in environment variable `name`, >= minimum, or a one-line UserError."""
    raw = os.environ[name]
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise UserError(
            f"{name}={raw!r} is not an integer >= {minimum}; fix or unset it in the launcher environment "
            "(torchrun, deepspeed and srun set it correctly)"
        )
    return value


def _port() -> int:
    port = _int_var("MASTER_PORT", 1)
    if port > 65535:
        raise UserError(f"MASTER_PORT={port} is not a TCP port (1-65535); export a free port or unset MASTER_PORT")
    return port


def first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        raise UserError(f"cannot expand SLURM nodelist {nodelist!r} with scontrol; set MASTER_ADDR explicitly") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tp: int, pp: int) -> Topology:
    """Start torch.distributed (gloo on CPU, nccl on GPU) and megatron's parallel_state for (tp, pp)."""
    use_cpu_accelerator_without_gpu()
    env = launcher_env()
    os.environ.update(env)
    rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if world % (tp * pp):
        raise UserError(
            f"world size {world} is not divisible by parallel.tp * parallel.pp = {tp * pp}; "
            f"launch a multiple of {tp * pp} processes or change parallel.tp/pp"
        )
    if torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()  # srun --gpus-per-task may leave one visible GPU per task
        torch.cuda.set_device(index)
        device, backend = torch.device("cuda", index), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if world == 1:
            # A lone process needs no rendezvous: an in-process store, so runs started at the same moment on one
            # machine cannot race for a TCP port (free_port() is only free until somebody else binds it).
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        skip_shm_comm_op()  # no silent C++ build at start-up (pretrain/compat.py says why)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    if tp > 1:
        load_megatron_core()  # its tensor-parallel layers (models/parallel.py), before the model is built
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    topo = Topology(
        rank=rank, world_size=world, local_rank=local_rank, tp=tp, pp=pp, dp=world // (tp * pp),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
    )
    check_topology_agrees(topo)
    if world > 1:
        hosts = [None] * world
        dist.all_gather_object(hosts, socket.gethostname())
        topo = dataclasses.replace(topo, hosts=tuple(hosts))
    return topo


def placement(topo: Topology) -> list[str]:
    """Where the ranks run, one line per node, and a warning where a tensor-parallel group spans nodes (its
    all-reduces run every layer: across nodes they are an order of magnitude slower than NVLink). Pipeline
    stages and data-parallel replicas spanning nodes are what a multi-node layout is for. SLURM places
    consecutive ranks on one node, and tp is the fastest coordinate: tp groups stay inside a node when the
    tasks per node are a multiple of parallel.tp."""
    if not topo.hosts:
        return []
    dstopo = deepspeed_topology(topo)
    by_host: dict[str, list[str]] = {}
    for rank, host in enumerate(topo.hosts):
        c = dstopo.get_coord(rank)
        by_host.setdefault(host, []).append(f"{rank} (tp {c.model} pp {c.pipe} dp {c.data})")
    lines = [f"placement: {host}: ranks {', '.join(ranks)}" for host, ranks in by_host.items()]
    split = sorted({tuple(g) for g in dstopo.get_axis_comm_lists("model")
                    if len({topo.hosts[r] for r in g}) > 1})
    if split:
        lines.append(f"warning: tensor-parallel group(s) {', '.join(map(str, split))} span nodes; make the tasks per "
                     f"node a multiple of parallel.tp={topo.tp}")
    return lines


def deepspeed_topology(topo: Topology):
    return PipeModelDataParallelTopology(num_pp=topo.pp, num_mp=topo.tp, num_dp=topo.dp)


def check_topology_agrees(topo: Topology) -> None:
    """megatron's parallel_state and DeepSpeed's topology must give this rank the same coordinates."""
    coord = deepspeed_topology(topo).get_coord(topo.rank)
    if (coord.model, coord.pipe, coord.data) != (topo.tp_rank, topo.pp_rank, topo.dp_rank):
        raise RuntimeError(
            f"rank {topo.rank}: megatron (tp, pp, dp) = {(topo.tp_rank, topo.pp_rank, topo.dp_rank)} but "
            f"DeepSpeed = {(coord.model, coord.pipe, coord.data)}"
        )


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

"""Run a function on N local ranks of a real torch.distributed job, from inside a pytest test.

    from helpers.distributed import run_distributed_test

    def _check(n):                      # module level, so spawned ranks can unpickle it
        rank = torch.distributed.get_rank()
        ...                             # asserts here fail the calling test, traceback included
        return {"rank": rank, "out": out.detach()}

    def test_something():
        results = run_distributed_test(_check, world_size=2, args=(3,))   # [rank 0's return, rank 1's return]

Every rank runs in a fresh process (torch.multiprocessing, "spawn" by default) with MASTER_ADDR=127.0.0.1, a
free MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and DS_ACCELERATOR=cpu set, and the default
process group initialized (gloo unless told otherwise) before `fn(*args, **kwargs)` is called. Afterwards
megatron-core's `parallel_state` (if the rank imported it) is reset and the process group destroyed.

Return values come back through `torch.save` files, so they may hold tensors of any size (detach them
first); they are returned in rank order. If any rank raises, the other ranks are stopped and the test
fails with a `DistributedTestError` whose message holds the failing rank's full traceback (and the last
line of every other rank that also failed). A job that runs past `timeout` is killed and fails with a
`TimeoutError` that includes the Python stacks of the ranks that were still running.

Spawning costs an interpreter start plus the imports of the test module in every rank (a few seconds with
megatron-core), so group several checks into one call where reasonable.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import multiprocessing.connection
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import pytest

import torch

__all__ = ["DistributedTestError", "find_free_port", "run_distributed_test"]


class DistributedTestError(RuntimeError):
    """A rank of `run_distributed_test` raised (or died); `rank` is the first one that failed."""

    def __init__(self, message: str, rank: int | None, tracebacks: dict[int, str]):
        super().__init__(message)
        self.rank, self.tracebacks = rank, tracebacks


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed_test(
    fn: Callable[..., Any],
    world_size: int = 2,
    backend: str = "gloo",
    start_method: str = "spawn",
    args: tuple = (),
    kwargs: dict | None = None,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    num_threads: int | None = None,
    grace_period: float = 3.0,
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` ranks and return the ranks' return values in rank order.

    fn: a module-level (picklable) function; it runs after `torch.distributed.init_process_group(backend)`.
    timeout: seconds for the whole job (also the process group's collective timeout).
    env: extra environment variables for every rank (set before the ranks import anything).
    num_threads: torch intra-op threads per rank; default: the CPU cores shared out over the ranks.
    grace_period: seconds the other ranks get to exit (and report their own errors) after one fails.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    try:
        pickle.dumps((fn, args, kwargs))
    except Exception as e:
        raise TypeError(
            f"run_distributed_test: fn, args and kwargs must be picklable (fn a module-level function): {e}"
        ) from e
    if num_threads is None:
        num_threads = max(1, (os.cpu_count() or 1) // world_size)
    ctx = torch.multiprocessing.get_context(start_method)
    common_env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(find_free_port()),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "DS_ACCELERATOR": "cpu" if backend == "gloo" else os.environ.get("DS_ACCELERATOR", ""),
        "OMP_NUM_THREADS": str(num_threads),
        **({"GLOO_SOCKET_IFNAME": "lo"} if os.path.exists("/sys/class/net/lo") else {}),
        **(env or {}),
    }
    if not common_env["DS_ACCELERATOR"]:
        del common_env["DS_ACCELERATOR"]

    with tempfile.TemporaryDirectory(prefix="distributed-test-") as tmp:
        procs = []
        try:
            # The ranks inherit the environment when they start, before they unpickle `fn` (which imports
            # its module, and with it perhaps DeepSpeed or megatron): set it here, restore it right after.
            with _environ(common_env):
                for rank in range(world_size):
                    p = ctx.Process(
                        target=_rank_main,
                        args=(fn, rank, world_size, backend, tuple(args), dict(kwargs or {}), tmp, timeout, num_threads),
                        name=f"rank{rank}",
                    )
                    p.start()
                    procs.append(p)
            _wait(procs, tmp, timeout, grace_period, fn)
            return [_load(os.path.join(tmp, f"result-{rank}.pt")) for rank in range(world_size)]
        finally:
            _kill(procs)


# ----------------------------------------------------------------------------------------------------------
# Parent side


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _wait(procs, tmp: str, timeout: float, grace_period: float, fn) -> None:
    deadline = time.monotonic() + timeout
    pending = {p.sentinel: rank for rank, p in enumerate(procs)}
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _raise_timeout(procs, tmp, timeout, fn)
        for sentinel in multiprocessing.connection.wait(list(pending), timeout=remaining):
            rank = pending.pop(sentinel)
            procs[rank].join()
            if procs[rank].exitcode != 0:
                # Let the others notice (a collective with a dead peer errors out) and report, then stop them.
                end = time.monotonic() + grace_period
                for p in procs:
                    p.join(max(0.0, end - time.monotonic()))
                _kill(procs)
                _raise_rank_error(procs, tmp, fn, detected=rank)


def _raise_rank_error(procs, tmp: str, fn, detected: int) -> None:
    """`detected`: the rank seen exiting first with an error (the cause, if it left no traceback)."""
    errors: dict[int, tuple[float, str]] = {}
    for rank in range(len(procs)):
        path = os.path.join(tmp, f"error-{rank}.pkl")
        if os.path.exists(path):
            with open(path, "rb") as f:
                errors[rank] = pickle.load(f)
    what = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
    if detected in errors:
        first = min(errors, key=lambda r: errors[r][0])
        msg = f"rank {first} of {len(procs)} failed in {what}:\n\n{errors[first][1].rstrip()}"
    else:
        first = detected
        msg = (
            f"rank {first} of {len(procs)} died in {what} without a Python traceback: {_exit_reason(procs[first])} "
            "(a crash, or a failure to start or to unpickle fn: see the test's captured stderr)"
        )
    others = []
    for rank, p in enumerate(procs):
        if rank == first or p.exitcode == 0:
            continue
        if rank in errors:
            last = errors[rank][1].strip().splitlines()[-1]
            others.append(f"  rank {rank}: {last}")
        else:
            others.append(f"  rank {rank}: {_exit_reason(p)}")
    if others:
        msg += "\n\nother ranks:\n" + "\n".join(others)
    raise DistributedTestError(msg, first, {r: tb for r, (_, tb) in errors.items()})


def _raise_timeout(procs, tmp: str, timeout: float, fn) -> None:
    alive = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for rank in alive:  # ask each hung rank for its Python stacks (faulthandler, see _rank_main)
        with contextlib.suppress(ProcessLookupError):
            os.kill(procs[rank].pid, signal.SIGUSR1)
    time.sleep(1.0)
    stacks = []
    for rank in alive:
        path = os.path.join(tmp, f"stack-{rank}.txt")
        text = open(path).read().strip() if os.path.exists(path) else ""
        stacks.append(f"--- rank {rank} ---\n{text or '(no stack dumped)'}")
    _kill(procs)
    what = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
    raise TimeoutError(
        f"{what} did not finish within {timeout:g} s on ranks {alive} (of {len(procs)}); their stacks:\n"
        + "\n".join(stacks)
    )


def _exit_reason(p) -> str:
    code = p.exitcode
    if code is None:
        return "still running (killed)"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by signal {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def _kill(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()


def _load(path: str):
    return torch.load(path, map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------------------------------------
# Rank side


def _rank_main(fn, rank, world_size, backend, args, kwargs, tmp, timeout, num_threads) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    stack_file = open(os.path.join(tmp, f"stack-{rank}.txt"), "w")
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    torch.set_num_threads(num_threads)
    status = 0
    try:
        import torch.distributed as dist

        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout)
        )
        result = fn(*args, **kwargs)
        torch.save(result, os.path.join(tmp, f"result-{rank}.pt"))
    except BaseException:  # noqa: BLE001 - everything goes to the parent
        status = 1
        with open(os.path.join(tmp, f"error-{rank}.pkl"), "wb") as f:
            pickle.dump((time.time(), traceback.format_exc()), f)
    finally:
        if status == 0:
            _teardown()
        sys.stdout.flush()
        sys.stderr.flush()
    if status:
        # Skip interpreter shutdown: a peer may be stuck in a collective with us, and the parent kills it.
        os._exit(status)


def _teardown() -> None:
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None:
        with contextlib.suppress(Exception):
            parallel_state.destroy_model_parallel()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_rank():
    """A single-process topology in this process (gloo on an in-process store); the launcher variables it exports
    are taken back afterwards. Import it into a test module to use it there."""
    from pretrain.train.distributed import init_distributed, shutdown

    saved = dict(os.environ)
    topo = init_distributed(1, 1)
    yield topo
    shutdown()
    os.environ.clear()
    os.environ.update(saved)

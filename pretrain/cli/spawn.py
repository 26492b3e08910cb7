"""`--nproc-per-node N`: the command re-run as N local ranks under torchrun."""

from __future__ import annotations

import socket

from pretrain.errors import UserError


def spawn_local_ranks(nproc: int, argv: list[str]) -> int:
    """Run `python -m pretrain ARGV` as `nproc` ranks on this machine; returns the first failing rank's exit code.

    The ranks' own exit code is passed on (2 bad input, 3 unstable, 75 preempted): the requeue logic and scripts
    read it; each rank has already printed its own one-line error."""
    if nproc < 1:
        raise UserError("--nproc-per-node must be >= 1")
    # torch.distributed.run pulls in torch and the elastic agent (seconds): only a spawning command pays for them; the
    # spawning process loads neither DeepSpeed nor megatron-core (the ranks do)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--nproc-per-node", str(nproc), "--master-port", str(_free_port()), "-m", "pretrain", *argv])
    except ChildFailedError as e:
        _rank, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def _free_port() -> int:
    """A port on 127.0.0.1 free a moment ago (as pretrain.train.distributed.free_port, which loads DeepSpeed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

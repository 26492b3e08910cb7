"""`--nproc-per-node N`: the command re-run as N local ranks under torchrun."""

from __future__ import annotations

from pretrain.errors import UserError


def spawn_local_ranks(nproc: int, argv: list[str]) -> int:
    """Run `python -m pretrain ARGV` as `nproc` ranks on this machine; returns the first failing rank's exit code.

    The ranks' own exit code is passed on (2 bad input, 3 unstable, 75 preempted): the requeue logic and scripts
    read it; each rank has already printed its own one-line error."""
    if nproc < 1:
        raise UserError("--nproc-per-node must be >= 1")
    # torch.distributed.run pulls in the elastic agent and pretrain.train DeepSpeed (seconds): only a spawning
    # command pays for them
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun
    from pretrain.train.distributed import free_port

    try:
        torchrun(["--nproc-per-node", str(nproc), "--master-port", str(free_port()), "-m", "pretrain", *argv])
    except ChildFailedError as e:
        _rank, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0

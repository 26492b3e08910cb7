"""`pretrain train CONFIG [OVERRIDES] [--nproc-per-node N]`: train a model from a YAML experiment file."""

from __future__ import annotations

from pretrain.cli.spawn import spawn_local_ranks
from pretrain.notice import when_slow


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML experiment file",
                       epilog="Every config key with its default and meaning: `pretrain config --docs` "
                              "(docs/configuration.md); the resolved config of a run: `pretrain config CONFIG "
                              "[OVERRIDES]`. Overrides may also be written as flags: --train.lr=1e-3.")
    p.add_argument("config", help="experiment YAML, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.norm_scheme=lns train.lr=3e-4")
    p.add_argument("--nproc-per-node", type=int, default=None, help="spawn N local ranks (via torchrun)")
    p.set_defaults(func=run)


def run(args) -> int:
    # The config is checked before torch loads and the run folder before DeepSpeed and megatron-core do, so that
    # their one-line errors come at once.
    from pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    from pretrain.state.resume import prepare_run  # reads checkpoints (torch)

    start = prepare_run(cfg)  # config, resume target and init_from source: one-line errors before any rank starts
    if args.nproc_per_node:  # torchrun's agent forwards signals to the ranks; each rank catches its own
        return spawn_local_ranks(args.nproc_per_node, ["train", args.config, *args.overrides])
    with when_slow("loading DeepSpeed and megatron-core"):
        # DeepSpeed and megatron-core load here, in the process that trains (pretrain.train picks DeepSpeed's
        # accelerator before they import), not in the one that spawns the ranks.
        from pretrain.features import hooks_for
        from pretrain.train.loop import train
        from pretrain.train.signals import StopOnSignal

    stop = StopOnSignal()  # before set-up: a preemption signal during set-up must not kill the process
    return train(start, hooks_for(start.cfg, stop))

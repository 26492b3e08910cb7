"""`pretrain remove-norms --checkpoint PATH --data DATA --out RUN_DIR`: fine-tune a trained pre_ln, lns or reordered
model (q/k norms included) while its norms are switched, one site at a time, to fixed scales, then fold them into
the weights (pretrain/removal/); with --method taper, TaperNorm's gate takes every norm to its fixed scaling at once
(pretrain/removal/taper.py).

The removal run and, with --control, the same fine-tune with the norms kept run one after the other in one process
group; rank 0 then writes RUN_DIR/removal.json. Running the same command again continues where it stopped.
"""

from __future__ import annotations

import os

from pretrain.cli.spawn import spawn_local_ranks


def register(sub) -> None:
    p = sub.add_parser("remove-norms", help="fine-tune a pre_ln/lns/reordered model into an ln_free one (norm removal)")
    p.add_argument("--checkpoint", required=True,
                   help="the trained pre_ln, lns or reordered model (q/k norms too): a step folder, checkpoints/ or run folder (any TP/PP "
                        "layout), or a Hugging Face Llama directory")
    p.add_argument("--data", required=True, help="a prepared data folder or bundled:tinyshakespeare")
    p.add_argument("--out", required=True, help="the run folder (run the same command again to continue it)")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (default 300)")
    p.add_argument("--schedule", default="mlp,attn,qk,final",
                   help="order of the site groups, comma-separated (default mlp,attn,qk,final; qk, the q/k norms, may "
                        "be left out of a model without them); when each site switches is set by the overrides "
                        "removal.start (the step of the first switch, default 20) and removal.gap (steps between two "
                        "sites' switches, default 2)")
    p.add_argument("--method", default="fixed", choices=("fixed", "taper"),
                   help="fixed (default): switch the sites one by one to fixed scales; taper: TaperNorm (arXiv "
                        "2602.10408), one gate takes every norm of a pre_ln or lns model without q/k norms to its "
                        "calibrated fixed scaling over removal.taper_steps steps (default 100) after removal.start")
    p.add_argument("--control", action="store_true",
                   help="also run the same fine-tune with the norms kept (RUN_DIR/control): ce_control")
    p.add_argument("--nproc-per-node", type=int, default=None, help="spawn N local ranks (via torchrun)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 removal.gap=3 parallel.tp=2")
    p.set_defaults(func=run)




def run(args) -> int:
    # the configs and the run folders' checks load torch: here, not for `pretrain --help`
    from pretrain.removal.configs import removal_configs
    from pretrain.state.resume import prepare_run

    order = [g.strip() for g in args.schedule.split(",") if g.strip()]
    removal, control = removal_configs(args.checkpoint, args.data, args.out, args.steps, order, args.control,
                                       args.overrides, args.method)
    # one-line errors (source, resume, config) before any rank starts
    starts = [prepare_run(removal)] + ([prepare_run(control)] if control is not None else [])
    if args.nproc_per_node:  # torchrun's agent forwards signals to the ranks; each rank catches its own
        return spawn_local_ranks(args.nproc_per_node, ["remove-norms", *_argv_without_nproc(args)])
    # DeepSpeed and megatron-core load here, in the process that trains, not in the one that spawns the ranks
    from pretrain.train.signals import StopOnSignal

    stop = StopOnSignal()  # before set-up: a preemption signal during set-up must not kill the process
    return run_removal(starts, stop)


def _argv_without_nproc(args) -> list[str]:
    argv = ["--checkpoint", args.checkpoint, "--data", args.data, "--out", args.out, "--steps", str(args.steps),
            "--schedule", args.schedule, "--method", args.method]
    return argv + (["--control"] if args.control else []) + list(args.overrides)


def run_removal(starts: list, stop) -> int:
    """The removal run, then the control, in one process group; rank 0 writes removal.json when both are done."""
    # DeepSpeed and megatron-core load here, for the command that trains
    from pretrain.features import hooks_for
    from pretrain.removal.report import report_line, write_report
    from pretrain.train.distributed import init_distributed, shutdown
    from pretrain.train.loop import run

    removal = starts[0].cfg
    control = starts[1].cfg if len(starts) > 1 else None
    topo = init_distributed(removal.parallel.tp, removal.parallel.pp)
    try:
        for start in starts:
            code = run(start, topo, hooks_for(start.cfg, stop))
            done = code == 0 and _finished(start.cfg)
            if not done:
                break
    finally:
        shutdown()
    if topo.rank == 0 and code == 0:
        if done:
            print(report_line(write_report(removal, control)), flush=True)
        else:
            print(f"remove-norms: stopped before the end (train.stop_at_step); run the same command without it to "
                  f"continue {removal.run.dir}", flush=True)
    return code


def _finished(cfg) -> bool:
    from pretrain.state import checkpoint  # torch: loaded by the training that ran before this check

    folder = checkpoint.resolve_resume("auto", os.path.join(cfg.run.dir, "checkpoints"))
    return folder is not None and checkpoint.read_state(folder)["step"] >= cfg.train.steps

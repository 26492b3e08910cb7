"""`pretrain` and its subcommands (also `python -m pretrain`).

Every subcommand turns a `UserError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from pretrain.errors import EXIT_USER_ERROR, UserError


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not hasattr(args, "func"):
            parser.print_help()
            return EXIT_USER_ERROR
        from pretrain.compat import check_versions

        check_versions()  # an untested package version: one line here, not a traceback from some import
        return args.func(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description="LLM pretraining for normalization research")
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a YAML experiment file")
    p.add_argument("config", help="experiment YAML, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.norm_scheme=lns train.lr=3e-4")
    p.add_argument("--nproc-per-node", type=int, default=None, help="spawn N local ranks (via torchrun)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("config", help="print the resolved config as YAML (or the key reference)")
    p.add_argument("config", nargs="?", help="experiment YAML (default: all defaults)")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--docs", action="store_true", help="print every config key with its default and meaning")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("params", help="parameter counts of the model presets")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("export-hf", help="write a checkpoint as a transformers LlamaForCausalLM directory")
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step_XXXXXXXX folder (or checkpoints/ for latest)")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.set_defaults(func=cmd_export_hf)

    from pretrain.data.cli import register as register_data

    register_data(sub)
    from pretrain import bench, eval_checkpoint
    from pretrain.analysis import cli as analysis_cli

    bench.register(sub)
    from pretrain import generate as generate_cli

    generate_cli.register(sub)
    eval_checkpoint.register(sub)
    analysis_cli.register(sub)
    from pretrain import remove_norms

    remove_norms.register(sub)
    return parser


def cmd_train(args) -> int:
    from pretrain.config import load_config
    from pretrain.distributed import use_cpu_accelerator_without_gpu

    cfg = load_config(args.config, args.overrides)
    use_cpu_accelerator_without_gpu()
    from pretrain.train import preflight, train

    preflight(cfg)  # config, resume target and init_from source: one-line errors before any rank starts
    if args.nproc_per_node:
        if args.nproc_per_node < 1:
            raise UserError("--nproc-per-node must be >= 1")
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import main as torchrun

        try:
            torchrun(["--nproc-per-node", str(args.nproc_per_node), "--master-port", str(_free_port()), "-m",
                      "pretrain", "train", args.config, *args.overrides])
        except ChildFailedError as e:
            # Pass the ranks' own exit code on (2 bad input, 3 unstable, 75 preempted): the requeue logic
            # and scripts read it; each rank has already printed its own one-line error.
            _rank, failure = e.get_first_failure()
            return failure.exitcode if failure.exitcode > 0 else 1
        return 0
    return train(cfg)


def _free_port() -> int:
    from pretrain.distributed import free_port

    return free_port()


def cmd_config(args) -> int:
    from pretrain.config import config_reference, dump_yaml, load_config

    if args.docs:
        print(config_reference())
    else:
        print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_params(args) -> int:
    import torch

    from models import PRESETS, Llama, ModelConfig

    print(f"{'preset':<11}{'params':>16}{'non-embedding':>16}  shape")
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        with torch.device("meta"):
            model = Llama(cfg)
        print(f"{name:<11}{model.num_params():>16,}{model.num_params(exclude_embeddings=True):>16,}  "
              f"d{cfg.d_model} L{cfg.n_layers} h{cfg.n_heads} kv{cfg.n_kv_heads} ffn{cfg.ffn_hidden} V{cfg.vocab_size}")
    return 0


def cmd_export_hf(args) -> int:
    from models.hf import save_hf
    from pretrain.checkpoint import load_model_state

    folder = _checkpoint_folder(args.checkpoint)
    if os.path.exists(args.out):
        raise UserError(f"{args.out} already exists; choose a new --out directory")
    cfg, state = load_model_state(folder)
    try:
        save_hf(cfg.model, state, args.out)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"wrote {args.out} (transformers LlamaForCausalLM, {cfg.model.norm_scheme}) from {folder}")
    return 0


def _checkpoint_folder(path: str) -> str:
    from pretrain.checkpoint import find_checkpoint

    return find_checkpoint(path)


if __name__ == "__main__":
    raise SystemExit(main())

"""`pretrain analyze-depth --checkpoint PATH --data DATA --out DIR`: per-layer analyses of a checkpoint or a Hugging
Face Llama directory (the analyses: pretrain/analysis/depth.py).

The model comes from `pretrain.state.sources.open_source`; --seq-len and --micro-batch-size default to the run's
data.seq_len and train.micro_batch_size (an HF directory has no run: the config defaults, seq_len clipped to its
positions). The output folder is written next to --out under a temporary name and renamed, so an existing --out is
refused and an interrupted analysis leaves no --out behind. `pretrain attribute` shares these rules.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import torch

from pretrain.analysis.depth import depth_analysis
from pretrain.analysis.figures import depth_figure
from pretrain.config import ExperimentConfig
from pretrain.data.bundled import resolve_data_path
from pretrain.data.folders import read_meta
from pretrain.data.loader import TokenDataset, check_vocab, validation_batches
from pretrain.errors import UserError
from pretrain.state.sources import ModelSource, open_source


def register(sub) -> None:
    p = sub.add_parser("analyze-depth", help="per-layer angular distance and skip-one-block loss of a checkpoint")
    add_analysis_args(p, checkpoint_help="a checkpoints/step_XXXXXXXX folder, a checkpoints/ folder or a run folder "
                                         "(its latest), or a Hugging Face directory (see README, Hugging Face interop)",
                      out_help="output directory (must not exist): depth.json and depth.png")
    p.add_argument("--keep-first", type=int, default=None, metavar="N",
                   help="positions at the start of each sequence that a skipped block still processes (the BOS "
                        "attention sink); default 1 when every analyzed sequence starts with the data's BOS token, "
                        "else 0")
    p.set_defaults(func=run)


def add_analysis_args(p, checkpoint_help: str, out_help: str) -> None:
    p.add_argument("--checkpoint", required=True, help=checkpoint_help)
    p.add_argument("--data", required=True, help="a prepared data folder or bundled:tinyshakespeare")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--batches", type=int, default=4, help="validation micro-batches to evaluate (default 4)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="default: the run's train.micro_batch_size")
    p.add_argument("--seq-len", type=int, default=None, help="default: the run's data.seq_len")
    p.add_argument("--split", default="val", help="data split to evaluate (default val)")


def check_out(out_arg: str) -> str:
    """The absolute --out, which must not exist and whose parent must."""
    out = os.path.abspath(out_arg)
    if os.path.exists(out):
        raise UserError(f"{out_arg} already exists; choose a new --out directory")
    if not os.path.isdir(os.path.dirname(out)):
        raise UserError(f"--out {out_arg}: folder {os.path.dirname(out)} does not exist")
    return out


def analysis_batches(args, source: ModelSource) -> tuple[dict, list]:
    """(the settings JSON outputs record: data, split, micro_batch_size, seq_len; the validation micro-batches)."""
    if args.batches < 1:
        raise UserError(f"--batches must be >= 1, got {args.batches}")
    model = source.model_config
    run = source.run_config or ExperimentConfig()  # an HF directory: the config defaults
    seq_len = args.seq_len or (run.data.seq_len if source.run_config else min(run.data.seq_len, model.max_seq_len))
    if not 1 <= seq_len <= model.max_seq_len:
        raise UserError(f"--seq-len {seq_len} must be between 1 and the model's max_seq_len {model.max_seq_len}")
    micro = args.micro_batch_size or run.train.micro_batch_size
    if micro < 1:
        raise UserError(f"--micro-batch-size must be >= 1, got {micro}")
    path, batches = load_batches(args.data, run.data.cache_dir, model.vocab_size, seq_len, micro, args.batches,
                                 args.split)
    return {"data": path, "split": args.split, "micro_batch_size": micro, "seq_len": seq_len}, batches


def load_batches(data: str, cache_dir: str | None, vocab_size: int, seq_len: int, micro_batch_size: int,
                 num_batches: int, split: str) -> tuple[str, list]:
    """(the data folder, the first `num_batches` validation micro-batches of `split`) of --data."""
    path = resolve_data_path(data, cache_dir)
    dataset = TokenDataset(path, seq_len, split)
    check_vocab(dataset, vocab_size)
    return path, list(validation_batches(dataset, num_batches * micro_batch_size * seq_len, micro_batch_size))


def default_keep_first(batches: list, bos_id: int | None) -> int:
    """1 when every sequence of `batches` starts with the BOS token `bos_id` (Csordas et al. never skip it: it is
    the attention sink), else 0 (packed pretraining sequences start mid-document, where no position is special)."""
    if bos_id is None or bos_id < 0 or not batches:
        return 0
    return int(all(bool((tokens[:, 0] == bos_id).all()) for tokens, _ in batches))


def data_bos_id(data_path: str) -> int | None:
    """The BOS id of the tokenizer a prepared folder was made with (None when it records none)."""
    return (read_meta(data_path).get("tokenizer") or {}).get("bos_id")


def publish(out: str, out_arg: str, name: str, result: dict, figure) -> None:
    """NAME.json (`result`) and NAME.png (`figure(result)`) into a temporary folder next to `out`, then renamed to
    `out`."""
    import matplotlib  # the headless backend, chosen before the figure draws; matplotlib only for these commands

    matplotlib.use("Agg")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp", dir=os.path.dirname(out))
    try:
        with open(os.path.join(tmp, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        figure(result).savefig(os.path.join(tmp, f"{name}.png"), dpi=120)
        try:
            os.rename(tmp, out)
        except OSError:
            raise UserError(f"{out_arg} appeared while analyzing; choose a new --out directory") from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def describe(source: ModelSource) -> str:
    """The model in a result line: `lns step 40`, or `pre_ln (Hugging Face directory)`."""
    scheme = source.model_config.norm_scheme
    return f"{scheme} (Hugging Face directory)" if source.is_hf else f"{scheme} step {source.step}"


def run(args) -> int:
    out = check_out(args.out)
    source = open_source(args.checkpoint, "--checkpoint")
    settings, batches = analysis_batches(args, source)
    keep_first = args.keep_first
    if keep_first is None:
        keep_first = default_keep_first(batches, data_bos_id(settings["data"]))
    elif not 0 <= keep_first < settings["seq_len"]:
        raise UserError(f"--keep-first {keep_first} must be between 0 and --seq-len - 1 = {settings['seq_len'] - 1}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = source.build(device)
    result = {**source.description, "norm_scheme": source.model_config.norm_scheme, **settings}
    started = time.perf_counter()
    result.update(depth_analysis(model, batches, device, keep_first=keep_first))
    result["seconds"] = time.perf_counter() - started
    publish(out, args.out, "depth", result, depth_figure)
    worst = max(range(result["layers"]), key=lambda l: result["skip_loss_increase"][l])
    print(
        f"wrote {args.out}/depth.json and depth.png: {describe(source)}, val loss "
        f"{result['val_loss']:.4f} on {result['tokens']:,} tokens; skipping block {worst + 1} hurts most "
        f"(+{result['skip_loss_increase'][worst]:.4f})"
    )
    return 0

"""`pretrain analyze-depth --checkpoint PATH --data DATA --out DIR`: per-layer analyses of a checkpoint or a Hugging
Face Llama directory (the analyses: pretrain/analysis/depth.py).

The model comes from `pretrain.state.sources.open_source`; --seq-len and --micro-batch-size default to the run's
data.seq_len and train.micro_batch_size (an HF directory has no run: the config defaults, seq_len clipped to its
positions; pretrain/analysis/batches.py). The output folder is written next to --out under a temporary name and
renamed, so an existing --out is refused and an interrupted analysis leaves no --out behind
(pretrain/analysis/outputs.py). `pretrain attribute` shares these rules.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from pretrain.cli.arguments import add_analysis_args
from pretrain.errors import UserError

if TYPE_CHECKING:
    from pretrain.state.sources import ModelSource  # annotations only: the command imports it when it runs


def register(sub) -> None:
    p = sub.add_parser("analyze-depth", help="per-layer angular distance and skip-one-block loss of a checkpoint")
    add_analysis_args(p, checkpoint_help="a checkpoints/step_XXXXXXXX folder, a checkpoints/ folder or a run folder "
                                         "(its latest), or a Hugging Face directory (see docs/interop.md)",
                      out_help="output directory (must not exist): depth.json and depth.png")
    p.add_argument("--keep-first", type=int, default=None, metavar="N",
                   help="positions at the start of each sequence that a skipped block still processes (the BOS "
                        "attention sink); default 1 when every analyzed sequence starts with the data's BOS token, "
                        "else 0")
    p.set_defaults(func=run)


def default_keep_first(batches: list, bos_id: int | None) -> int:
    """1 when every sequence of `batches` starts with the BOS token `bos_id` (Csordas et al. never skip it: it is
    the attention sink), else 0 (packed pretraining sequences start mid-document, where no position is special)."""
    if bos_id is None or bos_id < 0 or not batches:
        return 0
    return int(all(bool((tokens[:, 0] == bos_id).all()) for tokens, _ in batches))


def data_bos_id(data_path: str) -> int | None:
    """The BOS id of the tokenizer a prepared folder was made with (None when it records none)."""
    from pretrain.data.folders import read_meta  # numpy and the data package: only when the command runs

    return (read_meta(data_path).get("tokenizer") or {}).get("bos_id")


def data_bits_per_byte(data_path: str, batches: list, loss_sum: float) -> float | None:
    """Bits per byte of the loss sum `loss_sum` over `batches` of the prepared folder `data_path`, by its tokenizer
    (pretrain/data/text_bytes.py); None when the folder holds none."""
    from pretrain.data.folders import read_meta  # numpy and the data package: only when the command runs
    from pretrain.data.text_bytes import bits_per_byte, token_bytes  # sentencepiece: only when the command runs

    tok = read_meta(data_path).get("tokenizer") or {}
    table = token_bytes(os.path.join(data_path, tok["file"]) if tok.get("file") and tok.get("sha256") else None)
    if table is None:
        return None
    return bits_per_byte(loss_sum, sum(table.count(tokens, labels) for tokens, labels in batches))


def describe(source: ModelSource) -> str:
    """The model in a result line: `lns step 40`, or `pre_ln (Hugging Face directory)`."""
    scheme = source.model_config.norm_scheme
    return f"{scheme} (Hugging Face directory)" if source.is_hf else f"{scheme} step {source.step}"


def run(args) -> int:
    # the command's libraries (torch and up) load when it runs, so that `pretrain --help` starts without them
    import torch
    from pretrain.analysis.batches import analysis_batches
    from pretrain.analysis.depth import depth_analysis
    from pretrain.analysis.figures import depth_figure
    from pretrain.analysis.outputs import new_output_folder, publish
    from pretrain.state.sources import open_source

    out = new_output_folder(args.out)
    source = open_source(args.checkpoint, "--checkpoint")
    settings, batches = analysis_batches(source, args.data, args.batches, args.micro_batch_size, args.seq_len,
                                         args.split)
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
    result["val_bpb"] = data_bits_per_byte(settings["data"], batches, result["val_loss"] * result["tokens"])
    result["seconds"] = time.perf_counter() - started
    publish(out, args.out, "depth", result, depth_figure)
    worst = max(range(result["layers"]), key=lambda l: result["skip_loss_increase"][l])
    bpb = f" ({result['val_bpb']:.4f} bits per byte)" if result["val_bpb"] is not None else ""
    print(
        f"wrote {args.out}/depth.json and depth.png: {describe(source)}, val loss "
        f"{result['val_loss']:.4f}{bpb} on {result['tokens']:,} tokens; skipping block {worst + 1} hurts most "
        f"(+{result['skip_loss_increase'][worst]:.4f})"
    )
    return 0

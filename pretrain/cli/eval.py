"""`pretrain eval --checkpoint PATH|HF_DIR --data DIR [--tokens N] [--json]`: loss, perplexity and bits per byte on
the fixed validation set.

The token set is the one in-loop validation uses (pretrain/train/evaluate.py): the first min(tokens // seq_len,
samples in the split) samples of the val split of --data in fixed, unshuffled order
(`pretrain.data.loader.validation_batches`), independent of micro-batch size and TP/PP layout. The loss is the
sum of the per-token losses over all label tokens, accumulated in float64, divided by their number; ppl is
exp(loss); bpb is that sum / (ln 2 * the UTF-8 bytes of the text those tokens cover), the bytes counted by the data
folder's tokenizer (pretrain/data/text_bytes.py; null for data saved without one), so that models with different
tokenizers compare on the same text (an HF model is scored on --data's tokens, hence by --data's tokenizer). On one process, in fp32, this is the in-loop `val_loss` of the same weights, to float rounding
(a bf16 run's in-loop value differs by bf16 rounding; this one is always fp32).

Models (both through `pretrain.state.sources.open_source`):
    training checkpoint   a step folder, checkpoints/ or a run folder (its latest), any TP/PP layout: read into
                          one full model (`ModelSource.build`), no torch.distributed
    HF directory          config.json + weights, evaluated with transformers' AutoModelForCausalLM
                          (`ModelSource.hf_causal_lm`), so the export of a checkpoint scores what the checkpoint
                          scores, and any causal LM transformers knows can be scored, not only a Llama

Defaults come from the checkpoint's config (eval.tokens, data.seq_len, train.micro_batch_size); an HF directory
has none, so it gets the config defaults (seq_len clipped to max_position_embeddings): give --seq-len and
--tokens to compare it with a run.
"""

from __future__ import annotations

import json
import sys

from pretrain.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint or HF model on the fixed "
                                    "validation set")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder, checkpoints/ folder or step folder (any TP/PP layout), or a Hugging Face "
                        "model directory (config.json + weights)")
    p.add_argument("--data", required=True, help="a prepared data folder or bundled:tinyshakespeare")
    p.add_argument("--tokens", type=int, default=None,
                   help="validation token budget (default: the checkpoint's eval.tokens; clipped to the split)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the checkpoint's data.seq_len)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="samples per forward; changes memory, not the result (default: the checkpoint's)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (loss, ppl, bpb, tokens, bytes, ...) instead of a line")
    p.set_defaults(func=run)


def run(args) -> int:
    for flag, value in (("--tokens", args.tokens), ("--seq-len", args.seq_len),
                        ("--micro-batch-size", args.micro_batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    # the command's libraries (torch and up) load when it runs, so that `pretrain --help` starts without them
    import torch
    from pretrain.analysis.perplexity import checkpoint_loss_sum, hf_loss_sum, mean_loss
    from pretrain.config import ExperimentConfig
    from pretrain.data.loader import check_seq_len, check_vocab, validation_batches
    from pretrain.data.resolve import open_dataset
    from pretrain.state.sources import open_source

    source = open_source(args.checkpoint, "--checkpoint")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if source.is_hf:  # no run config: the config defaults (seq_len clipped to the model's positions)
        defaults = ExperimentConfig()
        loss_sum, vocab, max_len = hf_loss_sum(source, device)
        seq_len = args.seq_len or min(defaults.data.seq_len, max_len or defaults.data.seq_len)
        tokens = args.tokens or defaults.eval.tokens
        micro = args.micro_batch_size or 8
        cache_dir = None
    else:
        cfg = source.run_config
        loss_sum, vocab, max_len = checkpoint_loss_sum(source, device)
        seq_len = args.seq_len or cfg.data.seq_len
        tokens = args.tokens or cfg.eval.tokens
        micro = args.micro_batch_size or cfg.train.micro_batch_size
        cache_dir = cfg.data.cache_dir
    if max_len is not None and seq_len > max_len:
        raise UserError(f"--seq-len {seq_len} is longer than the model's {max_len} positions; lower --seq-len")
    dataset = open_dataset(args.data, seq_len, "val", cache_dir=cache_dir)
    check_vocab(dataset, vocab)
    check_seq_len(dataset, seq_len)
    batches = validation_batches(dataset, tokens, micro, what="--tokens")
    val = mean_loss(loss_sum, batches, device, batches.token_bytes)
    count = val.tokens
    result = {"loss": val.loss, "ppl": val.ppl, "bpb": val.bpb, "tokens": count, "bytes": val.bytes,
              "samples": count // seq_len, "seq_len": seq_len,
              "data": dataset.path if hasattr(dataset, "path") else args.data, **source.description}
    if args.json:
        json.dump(result, sys.stdout)
        print()
    else:
        step = f" step {result['step']}" if result.get("step") is not None else ""
        bpb = "-" if val.bpb is None else f"{val.bpb:.4f}"
        print(f"loss {val.loss:.6f} | ppl {val.ppl:.4f} | bpb {bpb} | {count:,} tokens ({result['samples']} samples "
              f"of {seq_len}) | {args.checkpoint}{step}")
    return 0

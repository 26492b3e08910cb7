"""`pretrain data prepare`, `pretrain data prepare-sft` and `pretrain data info` (`pretrain tokenizer train`:
pretrain/cli/tokenizer.py).

`register(subparsers)` adds the `data` command group to the main parser; each subcommand sets `func(args) -> int`
(exit code).
Problems the user can fix raise UserError, which `pretrain/cli/__init__.py` prints as one line.

Every `pretrain` start imports this module, and with it the data modules it uses, all at the top: they need numpy
and sentencepiece, not torch (only the loaders import it, and no command here loads batches) nor datasets
(imported when a source is read).
"""

from __future__ import annotations

import argparse
import json

from pretrain.data.backends import BACKENDS, DEFAULT_BACKEND
from pretrain.data.folders import read_meta
from pretrain.data.prepare import prepare_dataset
from pretrain.data.resolve import resolve_data_path, resolve_tokenizer
from pretrain.data.sft_prepare import prepare_sft


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command group."""
    data = subparsers.add_parser("data", help="Prepare and inspect token datasets.")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    p = data_sub.add_parser(
        "prepare", help="Tokenize a dataset into a memory-mapped folder.",
        description="Tokenize SPEC (local files or folder, bundled:NAME, or a hub dataset) into DIR: "
        "train.bin, val.bin, tokenizer.model, meta.json.",
    )
    p.add_argument("--source", required=True, metavar="SPEC",
                   help="A .txt/.jsonl/.json/.parquet/.csv file or folder, bundled:tinyshakespeare, or a hub dataset name.")
    p.add_argument("--tokenizer", required=True, metavar="MODEL", help="A sentencepiece .model file or a folder holding one.")
    p.add_argument("--out", required=True, metavar="DIR", help="Output folder; written atomically.")
    p.add_argument("--text-field", default="text", help="Field holding the text (default: text; .txt files give 'text').")
    p.add_argument("--num-proc", type=int, default=None, metavar="N",
                   help="Tokenizer processes or threads (default: one per core, at most 16).")
    p.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                   help="Fraction of documents held out for validation (default: 0.05).")
    p.add_argument("--sample-by", choices=("line", "paragraph", "document"), default="paragraph",
                   help="For .txt files, what one document is (default: paragraph).")
    p.add_argument("--streaming", action="store_true", help="Stream the source instead of caching it whole (large hub datasets).")
    p.add_argument("--split", default="train", help="Split of a hub dataset (default: train).")
    p.add_argument("--subset", default=None, help="Configuration (subset) name of a hub dataset.")
    p.add_argument("--max-docs", type=int, default=None, metavar="N", help="Stop after the first N documents.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the train/val assignment (default: 0).")
    p.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                   help="Tokenizing library: sentencepiece (default: the reference's ids, each distinct word "
                   "encoded once and looked up after that; the fastest here) or tokenizers (Hugging Face's, in "
                   "Rust); both write the same token ids, and a tokenizer either shortcut cannot reproduce falls "
                   "back to sentencepiece's plain encode with a one-line note.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing prepared folder in --out.")
    p.set_defaults(func=cmd_data_prepare)

    p = data_sub.add_parser(
        "prepare-sft", help="Tokenize instruction data (prompts masked out of the loss) for supervised fine-tuning.",
        description="Read instruction records (Alpaca instruction/input/output, prompt/response, or chat messages) "
        "from SPEC and write DIR: tokens, a per-token loss mask and example offsets per split, tokenizer.model, "
        "meta.json. BOS opens every example; each response is followed by EOS, which is trained.",
    )
    p.add_argument("--source", required=True, metavar="SPEC",
                   help="A .json/.jsonl/.parquet file or folder, bundled:tiny-instruct, or a hub dataset name.")
    p.add_argument("--tokenizer", required=True, metavar="MODEL",
                   help="A sentencepiece .model file or a folder holding one, bundled:tinyshakespeare, or a run folder "
                   "(the tokenizer of its data).")
    p.add_argument("--out", required=True, metavar="DIR", help="Output folder; written atomically.")
    p.add_argument("--format", default="auto", choices=("auto", "alpaca", "prompt-response", "messages"),
                   help="Record format (default: auto, from the fields).")
    p.add_argument("--template", default="default", metavar="NAME",
                   help="Prompt template: default, alpaca, llama3 or none (default: default; see docs/sft.md).")
    p.add_argument("--train-on-prompt", action="store_true", help="Keep the prompt tokens in the loss too.")
    p.add_argument("--seq-len", type=int, default=None, metavar="N",
                   help="The data.seq_len you will train with: an example needing more positions (tokens - 1) is an "
                   "error unless --overlong says otherwise.")
    p.add_argument("--overlong", default="error", choices=("error", "truncate", "drop"),
                   help="What to do with an example longer than --seq-len: error (default), truncate its end, drop it; "
                   "truncated and dropped examples are counted in meta.json.")
    p.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                   help="Fraction of examples held out for validation (default: 0.05).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the train/val assignment (default: 0).")
    p.add_argument("--split", default="train", help="Split of a hub dataset (default: train).")
    p.add_argument("--subset", default=None, help="Configuration (subset) name of a hub dataset.")
    p.add_argument("--max-examples", type=int, default=None, metavar="N", help="Stop after the first N records.")
    p.add_argument("--num-proc", type=int, default=None, metavar="N", help="Tokenizer threads (default: one per core).")
    p.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                   help="Tokenizing library: sentencepiece (default: the reference's ids, each distinct word "
                   "encoded once and looked up after that; the fastest here) or tokenizers (Hugging Face's, in "
                   "Rust); both write the same token ids, and a tokenizer either shortcut cannot reproduce falls "
                   "back to sentencepiece's plain encode with a one-line note.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing prepared folder in --out.")
    p.set_defaults(func=cmd_data_prepare_sft)

    p = data_sub.add_parser("info", help="Print the metadata of a prepared folder.")
    p.add_argument("path", metavar="DIR", help="A prepared folder, or bundled:NAME (built if needed).")
    p.set_defaults(func=cmd_data_info)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    out = prepare_dataset(
        args.source, args.tokenizer, args.out, text_field=args.text_field, val_fraction=args.val_fraction,
        num_proc=args.num_proc, seed=args.seed, sample_by=args.sample_by, streaming=args.streaming,
        split=args.split, subset=args.subset, max_documents=args.max_docs, overwrite=args.overwrite,
        backend=args.backend,
    )
    print(f"prepared: {out} ({summary(read_meta(out))})")
    return 0


def cmd_data_prepare_sft(args: argparse.Namespace) -> int:
    # prepare_sft takes the tokenizer resolved: bundled:NAME is built on first use, a run folder gives its data's
    out = prepare_sft(
        args.source, resolve_tokenizer(args.tokenizer), args.out, fmt=args.format, template=args.template,
        train_on_prompt=args.train_on_prompt, seq_len=args.seq_len, overlong=args.overlong,
        val_fraction=args.val_fraction, seed=args.seed, split=args.split, subset=args.subset,
        max_examples=args.max_examples, num_proc=args.num_proc, overwrite=args.overwrite, backend=args.backend,
    )
    print(f"prepared: {out} ({summary(read_meta(out))})")
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    path = resolve_data_path(args.path)
    print(f"{path}: {summary(read_meta(path))}")
    print(json.dumps(read_meta(path), indent=2))
    return 0


def summary(meta: dict) -> str:
    """One line: token and document counts per split, dtype, vocab (SFT folders: examples, trained tokens and
    the truncated / dropped counts)."""
    s = meta["splits"]
    if meta.get("kind") == "sft":
        e = meta["examples"]
        return (
            f"SFT {meta['format']}/{meta['template']}: train {s['train']['num_examples']:,} examples / "
            f"{s['train']['num_tokens']:,} tokens ({s['train']['num_trained_tokens']:,} trained), val "
            f"{s['val']['num_examples']:,} examples / {s['val']['num_tokens']:,} tokens "
            f"({s['val']['num_trained_tokens']:,} trained), {e['truncated']:,} truncated, {e['dropped']:,} dropped, "
            f"{meta['dtype']}, vocab {meta['vocab_size']}"
        )
    return (
        f"train {s['train']['num_tokens']:,} tokens / {s['train']['num_documents']:,} docs, "
        f"val {s['val']['num_tokens']:,} tokens / {s['val']['num_documents']:,} docs, "
        f"{meta['dtype']}, vocab {meta['vocab_size']}"
    )

"""`pretrain tokenizer train`: train a byte-fallback sentencepiece tokenizer (pretrain/data/tokenizer.py).

`register(subparsers)` adds the `tokenizer` command group to the main parser; its subcommand sets
`func(args) -> int` (exit code). Problems the user can fix raise UserError, which `pretrain/cli/__init__.py` prints
as one line. Every `pretrain` start imports this module: the tokenizer module needs sentencepiece, not torch.
"""

from __future__ import annotations

import argparse

from pretrain.data.tokenizer import Tokenizer, train_tokenizer


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `tokenizer` command group."""
    tok = subparsers.add_parser("tokenizer", help="Train a sentencepiece tokenizer.")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    p = tok_sub.add_parser(
        "train", help="Train a byte-fallback BPE/unigram model on text files.",
        description="Train a byte-fallback sentencepiece model (pad=0 unk=1 bos=2 eos=3) into DIR/tokenizer.model.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="Text files (a sentence per line), .jsonl/.json/.parquet files, or folders of them.")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help="Vocabulary size, the 4 specials and 256 byte pieces included.")
    p.add_argument("--out", required=True, metavar="DIR", help="Output folder (tokenizer.model, tokenizer_meta.json).")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="Algorithm (default: bpe).")
    p.add_argument("--text-field", default="text", help="Text field of .jsonl/.json/.parquet inputs (default: text).")
    p.add_argument("--max-sentences", type=int, default=5_000_000, help="Train on at most this many lines (default: 5M).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the line sampling (default: 0).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing tokenizer in --out.")
    p.set_defaults(func=cmd_tokenizer_train)


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    path = train_tokenizer(
        args.input, args.vocab_size, args.out, args.model_type, text_field=args.text_field,
        max_sentences=args.max_sentences, seed=args.seed, overwrite=args.overwrite,
    )
    tok = Tokenizer.load(path)
    ids = f"pad={tok.pad_id} unk={tok.unk_id} bos={tok.bos_id} eos={tok.eos_id}"
    print(f"tokenizer: {path} (vocab {tok.vocab_size}, {ids}, sha256 {tok.sha256[:12]})")
    return 0

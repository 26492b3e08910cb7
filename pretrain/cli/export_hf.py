"""`pretrain export-hf --checkpoint PATH --out DIR`: a checkpoint as a stock transformers directory (models/hf) with its
tokenizer, special token ids, generation config and (for an SFT run) chat template.

Tokenizer: `--tokenizer`, else the checkpoint's training data's (`open_source(...).tokenizer()`); it is written as
Hugging Face files by pretrain/data/hf_tokenizer.py. Chat template: `--chat-template NAME`, else the SFT template
the run's data folders were prepared with (their meta.json), none for a pretraining run or an HF directory.
Everything goes into one temporary folder renamed to `--out` at the end (pretrain/files.py `atomic_folder`), so a
failure leaves no half-written `--out`.
"""

from __future__ import annotations

import os

from pretrain.data.sft_format import TEMPLATES, get_template
from pretrain.errors import UserError
from pretrain.files import atomic_folder


def register(sub) -> None:
    p = sub.add_parser("export-hf", help="write a checkpoint as a transformers directory with its tokenizer")
    p.add_argument("--checkpoint", required=True,
                   help="a step folder, checkpoints/ folder or run folder (their latest; any TP/PP layout), or a "
                        "Hugging Face directory")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="tokenizer to write with the model (default: the checkpoint's training data's, or the HF "
                        "directory's tokenizer.model)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat-template", default=None, metavar="NAME",
                      help=f"SFT template to write as the chat template ({', '.join(TEMPLATES)}; default: the one the "
                           "run's SFT data was prepared with, if any)")
    chat.add_argument("--no-chat-template", action="store_true", help="write no chat template")
    p.set_defaults(func=run)


def run_template(source, name: str | None, none: bool = False):
    """The SFT Template (pretrain/data/sft_format.py) to export as the chat template, or None."""
    if none:
        return None
    if name:
        return get_template(name, "--chat-template")
    name = source.sft_template_name()
    return get_template(name, "the run's SFT template") if name else None


def run(args) -> int:
    # the command's libraries (torch and up) load when it runs, so that `pretrain --help` starts without them
    from models.hf import check_exportable, save_hf
    from pretrain.state.sources import open_source

    if os.path.exists(args.out):
        raise UserError(f"{args.out} already exists; choose a new --out directory")
    if args.chat_template:
        get_template(args.chat_template, "--chat-template")  # a misspelt name before any model is read
    source = open_source(args.checkpoint, "--checkpoint")
    model_cfg = source.model_config
    try:
        target = check_exportable(model_cfg)  # a refusal first, before finding (or preparing) the tokenizer
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        tok = source.tokenizer(args.tokenizer)
    except UserError as e:
        raise UserError(f"export-hf writes the model's tokenizer: {e}") from None
    if tok.vocab_size > model_cfg.vocab_size:
        raise UserError(f"the tokenizer {tok.path} has {tok.vocab_size} ids but the model only {model_cfg.vocab_size}; "
                        "pass the model's --tokenizer")
    template = run_template(source, args.chat_template, args.no_chat_template)
    # transformers and tokenizers load only here, not for `pretrain --help` (see pretrain/cli/__init__.py)
    from transformers import GenerationConfig
    from pretrain.data.hf_tokenizer import backend_tokenizer, write_hf_tokenizer

    backend_tokenizer(tok)  # an unsupported tokenizer is refused before the weights are converted
    ids = {f"{name}_token_id": (i if i >= 0 else None)
           for name, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id))}

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    try:
        with atomic_folder(args.out) as tmp:
            save_hf(model_cfg, source.weights(), tmp, **ids)
            write_hf_tokenizer(tok, tmp, model_cfg.max_seq_len, template)
            # greedy, as `pretrain generate` by default
            GenerationConfig(**ids, do_sample=False).save_pretrained(tmp)
    except ValueError as e:
        raise UserError(str(e)) from None
    except FileExistsError:
        raise UserError(f"{args.out} appeared while exporting; choose a new --out directory") from None
    chat = f", chat template {template.name}" if template else ""
    print(f"wrote {args.out} (transformers {target.architecture}, {model_cfg.norm_scheme}; tokenizer {tok.path}{chat}) "
          f"from {source.folder}")
    return 0

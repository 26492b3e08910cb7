"""`pretrain generate`: sample completions of prompts from a checkpoint (`pretrain eval-sft` shares its model and
prompt rules).

Models: a training checkpoint (step folder, checkpoints/ or run folder, any TP/PP layout, read into one full model)
or a Hugging Face Llama, Qwen3 or OLMo 2 directory, through `pretrain.state.sources.open_source`; one process, CPU or GPU
(`--device`). The tokenizer is the one of the checkpoint's training data (its data.paths[0]), the
`tokenizer.model` of an HF directory, or `--tokenizer`.

Prompts are rendered and tokenized by `pretrain.data.sft` exactly as `pretrain data prepare-sft` renders them
(BOS, the template's prompt text); `--raw` sends the text as it is after BOS. Generation: models/generate.py
(KV cache, greedy by default, stops at EOS).
"""

from __future__ import annotations

import json
import tempfile

import torch

from models.generate import Sampling, generate
from pretrain.data.sft import TEMPLATES, Conversation, Turn, get_template, iter_records, prompt_ids
from pretrain.errors import UserError
from pretrain.state.sources import open_source


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample completions of prompts from a checkpoint or HF directory (KV cache)")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder, checkpoints/ folder or step folder (any TP/PP layout), or a Hugging Face "
                        "directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one prompt, rendered as prepare-sft renders an instruction without input")
    what.add_argument("--prompts", metavar="FILE.jsonl",
                      help="records in any prepare-sft format (the response is not needed); one completion per line")
    _common(p, template_help="prompt template (default: default, as `data prepare-sft`)")
    p.add_argument("--raw", action="store_true", help="send the text as it is (after BOS), without a template")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="at most N new tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.set_defaults(func=run)


def _common(p, template_help: str) -> None:
    p.add_argument("--template", default="default", metavar="NAME", help=template_help)
    p.add_argument("--format", default="auto", choices=("auto", "alpaca", "prompt-response", "messages"),
                   help="record format of a file (default: auto, from the fields)")
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="tokenizer (default: the checkpoint's training data's, or the HF directory's tokenizer.model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when there is one)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="prompts per forward (default 16)")


def load_model(path: str, tokenizer: str | None = None, device: str = "auto"):
    """(fp32 `Llama` in eval mode on `device`, Tokenizer) of a training checkpoint or an HF directory (Llama, Qwen3, OLMo 2)."""
    source = open_source(path, "--checkpoint")
    tok = source.tokenizer(tokenizer)
    vocab = source.model_config.vocab_size
    if tok.vocab_size > vocab:
        raise UserError(f"the tokenizer {tok.path} has {tok.vocab_size} ids but the model only {vocab}; "
                        "pass the model's --tokenizer")
    if tok.bos_id < 0 or tok.eos_id < 0:
        raise UserError(f"{tok.path}: the tokenizer needs BOS and EOS pieces")
    return source.build(_device(device)), tok


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device here; use --device cpu")
    return device


def _check_counts(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")


def _conversations(source: str, fmt: str, need_response: bool, limit: int | None = None):
    """[(record, Conversation)] of a records file, read with a throwaway datasets cache."""
    with tempfile.TemporaryDirectory(prefix="pretrain-records-") as cache:
        out = []
        for _, _, convs, records in iter_records(source, fmt, cache_dir=cache, need_response=need_response,
                                                 limit=limit, with_records=True):
            out += list(zip(records, convs))
    if not out:
        raise UserError(f"{source}: no records")
    return out


def _prompts(tok, template, convs) -> list[list[int]]:
    return [prompt_ids(tok, template, conv) for conv in convs]


def _batched(items: list, size: int):
    for i in range(0, len(items), size):
        yield i, items[i:i + size]


def run(args) -> int:
    _check_counts(args, "max-new-tokens", "batch-size")
    try:
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    except ValueError as e:
        raise UserError(f"generate: {e}") from None
    template = TEMPLATES["none"] if args.raw else get_template(args.template)
    model, tok = load_model(args.checkpoint, args.tokenizer, args.device)
    if args.prompt is not None:
        convs = [Conversation([Turn(args.prompt)])]
    else:
        convs = [conv for _, conv in _conversations(args.prompts, args.format, need_response=False)]
    prompts = _prompts(tok, template, convs)
    _check_lengths(prompts, model.cfg.max_seq_len, args.prompt is None)
    for start, chunk in _batched(prompts, args.batch_size):
        for ids in generate(model, chunk, tok.eos_id, sampling, first_index=start):
            text = tok.decode(ids)
            # one line per prompt for a file: newlines and backslashes escaped as in JSON
            print(text if args.prompt is not None else json.dumps(text, ensure_ascii=False)[1:-1], flush=True)
    return 0


def _check_lengths(prompts: list[list[int]], limit: int, from_file: bool) -> None:
    for i, p in enumerate(prompts, start=1):
        if len(p) >= limit:
            where = f"record {i}: " if from_file else ""
            raise UserError(f"{where}the prompt has {len(p)} tokens, no room left in the model's max_seq_len={limit}")

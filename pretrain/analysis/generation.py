"""Prompts and completions, shared by `pretrain generate` and `pretrain eval-sft`: the model and tokenizer a
`ModelSource` gives for generation (checked against each other), instruction records read as conversations, their
prompts tokenized exactly as `pretrain data prepare-sft` renders them, batches of prompts, and the teacher-forced
loss of the responses (`eval-sft`). Generation itself
(KV cache, sampling): models/generate.py.
"""

from __future__ import annotations

import tempfile
from typing import Iterator

import torch

from models import Llama
from pretrain.data.batches import IGNORE_INDEX
from pretrain.data.sft_format import Conversation, Template, iter_records, prompt_ids
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError
from pretrain.state.sources import ModelSource


def resolve_device(name: str) -> torch.device:
    """The device `--device NAME` names: cpu, cuda, cuda:N, or auto (cuda when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device here; use --device cpu")
    return device


def load_generation_model(source: ModelSource, tokenizer: str | None = None,
                          device: str = "auto") -> tuple[Llama, Tokenizer]:
    """(fp32 `Llama` in eval mode on `device`, Tokenizer) of a training checkpoint or an HF directory (Llama, Qwen3,
    OLMo 2); the tokenizer is `tokenizer` or the source's own (`ModelSource.tokenizer`)."""
    tok = source.tokenizer(tokenizer)
    vocab = source.model_config.vocab_size
    if tok.vocab_size > vocab:
        raise UserError(f"the tokenizer {tok.path} has {tok.vocab_size} ids but the model only {vocab}; "
                        "pass the model's --tokenizer")
    if tok.bos_id < 0 or tok.eos_id < 0:
        raise UserError(f"{tok.path}: the tokenizer needs BOS and EOS pieces")
    return source.build(resolve_device(device)), tok


def read_conversations(source: str, fmt: str, need_response: bool,
                       limit: int | None = None) -> list[tuple[dict, Conversation]]:
    """[(record, Conversation)] of a records file in any prepare-sft format, read with a throwaway datasets cache."""
    with tempfile.TemporaryDirectory(prefix="pretrain-records-") as cache:
        out = []
        for _, _, convs, records in iter_records(source, fmt, cache_dir=cache, need_response=need_response,
                                                 limit=limit, with_records=True):
            out += list(zip(records, convs))
    if not out:
        raise UserError(f"{source}: no records")
    return out


def render_prompts(tok: Tokenizer, template: Template, convs: list[Conversation]) -> list[list[int]]:
    """Each conversation's prompt before its last response, as token ids (BOS first), as prepare-sft renders it."""
    return [prompt_ids(tok, template, conv) for conv in convs]


def check_prompt_lengths(prompts: list[list[int]], limit: int, from_file: bool) -> None:
    """Every prompt leaves room for at least one new token in the model's `limit` positions."""
    for i, p in enumerate(prompts, start=1):
        if len(p) >= limit:
            where = f"record {i}: " if from_file else ""
            raise UserError(f"{where}the prompt has {len(p)} tokens, no room left in the model's max_seq_len={limit}")


def batched(items: list, size: int) -> Iterator[tuple[int, list]]:
    """(index of the first item, the next `size` items) through `items`."""
    for i in range(0, len(items), size):
        yield i, items[i:i + size]


@torch.no_grad()
def response_loss(model, examples: list[tuple], batch_size: int) -> tuple[list[float], list[int]]:
    """Per example (loss sum, trained tokens) of (tokens, mask) examples, teacher-forced, right-padded batches."""
    sums, counts = [], []
    device = model.rope_cos.device
    for _, chunk in batched(examples, batch_size):
        T = max(len(ids) for ids, _ in chunk) - 1
        tokens = torch.zeros(len(chunk), T, dtype=torch.long)
        labels = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.long)
        for r, (ids, mask) in enumerate(chunk):
            n = len(ids) - 1
            tokens[r, :n] = torch.from_numpy(ids[:-1])
            labels[r, :n] = torch.from_numpy(ids[1:]).masked_fill(~torch.from_numpy(mask[1:]), IGNORE_INDEX)
        logits = model(tokens.to(device)).float()
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.to(device), reduction="none",
                                                      ignore_index=IGNORE_INDEX)
        sums += per_token.double().sum(dim=1).tolist()
        counts += (labels != IGNORE_INDEX).sum(dim=1).tolist()
    return sums, counts

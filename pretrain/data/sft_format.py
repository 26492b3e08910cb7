"""SFT records and how they become tokens: conversations, templates, record formats and the encoding.

Records (JSON, JSONL or parquet, local, `bundled:NAME` or a hub dataset, read through `datasets`), one of three
formats:
    alpaca           `instruction`, optional `input`, `output`
    prompt-response  `prompt`, `response`
    messages         `messages`: [{role, content}], an optional `system` message first, then `user` and
                     `assistant` turns alternating, ending with an assistant turn (every one is trained)
`auto` picks the format from the fields. A template (TEMPLATES) renders each user turn into the text that
precedes its response. An example is BOS, then per turn the rendered prompt (no loss unless
`train_on_prompt`) and the response followed by EOS (trained: the model learns to stop). Prompt and response
texts are tokenized separately, each as its own sentencepiece call, so `prompt_ids` (generation) gives exactly
the prompt tokens training saw.

Used by `prepare_sft` (sft_prepare.py), by `pretrain generate` and `eval-sft` (the same rendering for prompts),
and by hf_tokenizer.py (a template as a chat template); it knows nothing of folders or loaders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from pretrain.data.sources import load_source, records_spec, resolve_source
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError

FORMATS = ("auto", "alpaca", "prompt-response", "messages")
BATCH = 1000  # records converted (and tokenized by prepare_sft) at a time


# ---------------------------------------------------------------------------------------------- conversations


@dataclass
class Turn:
    user: str
    input: str | None = None  # Alpaca's optional input
    response: str | None = None  # None: the turn a generation answers


@dataclass
class Conversation:
    turns: list[Turn]
    system: str | None = None


# ---------------------------------------------------------------------------------------------- templates


class Template:
    """How a conversation becomes text: `head` once before the first prompt, `prompt` before each response."""

    name = ""
    help = ""

    def head(self, system: str | None, first: Turn) -> str:
        return f"{system}\n\n" if system else ""

    def prompt(self, turn: Turn) -> str:
        text = f"### Instruction:\n{turn.user}\n\n"
        if turn.input:
            text += f"### Input:\n{turn.input}\n\n"
        return text + "### Response:\n"


class DefaultTemplate(Template):
    name = "default"
    help = ("'### Instruction:\\n{instruction}\\n\\n' ['### Input:\\n{input}\\n\\n'] '### Response:\\n' before each "
            "response; a system message and a blank line first")


class AlpacaTemplate(Template):
    name = "alpaca"
    help = "default with the Alpaca preamble ('Below is an instruction that describes a task...') in place of a system message"
    PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request.\n\n")
    PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                      "context. Write a response that appropriately completes the request.\n\n")

    def head(self, system, first):
        if system:
            return f"{system}\n\n"
        return self.PREAMBLE_INPUT if first.input else self.PREAMBLE


class Llama3Template(Template):
    name = "llama3"
    help = ("Llama-3 chat layout: '<|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\\n\\n' before each response, which ends with the "
            "tokenizer's EOS")

    def head(self, system, first):
        return f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system else ""

    def prompt(self, turn):
        content = f"{turn.user}\n\n{turn.input}" if turn.input else turn.user
        return (f"<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")


class NoTemplate(Template):
    name = "none"
    help = "the prompt text as it is (an input on a new line), the response right after it"

    def head(self, system, first):
        return f"{system}\n" if system else ""

    def prompt(self, turn):
        return f"{turn.user}\n{turn.input}" if turn.input else turn.user


TEMPLATES: dict[str, Template] = {t.name: t for t in (DefaultTemplate(), AlpacaTemplate(), Llama3Template(), NoTemplate())}


def get_template(name: str, flag: str = "--template") -> Template:
    """The template `name`; an unknown one is an error naming `flag`, the option that gave it."""
    if name not in TEMPLATES:
        raise UserError(f"{flag} {name!r}: no such template; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def segments(conv: Conversation, template: Template) -> list[tuple[str, bool]]:
    """(text, is_response) pieces in order; stops after the prompt of a turn without a response."""
    out = []
    for i, turn in enumerate(conv.turns):
        prompt = template.prompt(turn)
        out.append(((template.head(conv.system, turn) if i == 0 else "") + prompt, False))
        if turn.response is None:
            break
        out.append((turn.response, True))
    return out


def check_tokenizer(tok: Tokenizer) -> None:
    """A one-line UserError unless the tokenizer has the BOS and EOS pieces every example needs."""
    if tok.bos_id < 0 or tok.eos_id < 0:
        raise UserError(f"{tok.path}: the tokenizer needs BOS and EOS pieces (BOS opens and EOS closes every example)")


def encode_conversations(tok: Tokenizer, template: Template, convs: Sequence[Conversation], train_on_prompt: bool = False,
                         num_threads: int = 1, encoder=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens int64, trained-target mask bool) per conversation: BOS, prompts, responses each followed by EOS.
    The texts are encoded by `encoder` (backends.encoder: the same ids whichever backend), else by `tok` itself.

    A conversation whose last turn has no response ends with that turn's prompt (a generation prompt)."""
    check_tokenizer(tok)
    parts = [segments(c, template) for c in convs]
    texts = [text for segs in parts for text, _ in segs]
    if encoder is not None:
        ids = iter(encoder.encode(texts))
    else:
        ids = iter(tok.encode_batch(texts, num_threads=num_threads) if texts else [])
    out = []
    for segs in parts:
        tokens, mask = [tok.bos_id], [False]
        for _, is_response in segs:
            piece = next(ids)
            tokens += piece
            mask += [is_response or train_on_prompt] * len(piece)
            if is_response:
                tokens.append(tok.eos_id)
                mask.append(True)
        out.append((np.array(tokens, np.int64), np.array(mask, bool)))
    return out


def prompt_ids(tok: Tokenizer, template: Template, conv: Conversation) -> list[int]:
    """The tokens a generation starts from: the conversation up to and including the prompt of its last turn
    (whose response, if any, is left out), exactly as prepare-sft renders and tokenizes it."""
    last = conv.turns[-1]
    conv = Conversation([*conv.turns[:-1], Turn(last.user, last.input, None)], conv.system)
    return encode_conversations(tok, template, [conv])[0][0].tolist()


# ---------------------------------------------------------------------------------------------- records


FIELDS = {"alpaca": ("instruction", "output"), "prompt-response": ("prompt", "response"), "messages": ("messages",)}


def detect_format(columns: Sequence[str], label: str) -> str:
    """The record format the fields `columns` hold."""
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "instruction" in cols:
        return "alpaca"
    if "prompt" in cols:
        return "prompt-response"
    raise UserError(
        f"{label}: cannot tell the record format from the fields {', '.join(map(repr, columns)) or '(none)'}; "
        "records need instruction/output (alpaca), prompt/response or messages, or pass --format"
    )


def to_conversation(record: dict, fmt: str, where: str, need_response: bool = True) -> Conversation:
    """One record as a Conversation; a one-line UserError naming the record for anything missing or empty."""

    def text(name: str, optional: bool = False) -> str | None:
        value = record.get(name)
        if value is None:
            if optional:
                return None
            present = ", ".join(repr(k) for k, v in record.items() if v is not None)
            raise UserError(f"{where}: missing field {name!r} (fields: {present or 'none'}); fix the record or pass "
                            "the right --format")
        if not isinstance(value, str):
            raise UserError(f"{where}: field {name!r} holds {type(value).__name__}, not text")
        return value

    def response(value: str | None, name: str) -> str | None:
        if value is not None and not value.strip():
            raise UserError(f"{where}: empty response ({name}); fill it in or remove the record")
        return value

    if fmt == "alpaca":
        out = response(text("output", optional=not need_response), "field 'output'")
        return Conversation([Turn(text("instruction"), text("input", optional=True) or None, out)])
    if fmt == "prompt-response":
        out = response(text("response", optional=not need_response), "field 'response'")
        return Conversation([Turn(text("prompt"), None, out)])
    if fmt == "messages":
        return _messages(record.get("messages"), where, need_response)
    raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")


def _messages(messages, where: str, need_response: bool) -> Conversation:
    if messages is None:
        raise UserError(f"{where}: missing field 'messages'; fix the record or pass the right --format")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    system, turns = None, []
    expect = "user"
    for j, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {j} needs a text 'role' and a text 'content'")
        role, content = m["role"], m["content"]
        if role == "system" and j == 1:
            system = content
        elif role not in ("user", "assistant", "system"):
            raise UserError(f"{where}: message {j} has role {role!r}; use system, user or assistant")
        elif role != expect:
            raise UserError(f"{where}: message {j} is {role!r} where {expect!r} was due; after an optional first "
                            "system message, user and assistant messages alternate")
        elif role == "user":
            turns.append(Turn(content))
            expect = "assistant"
        else:
            if not content.strip():
                raise UserError(f"{where}: empty response (message {j}); fill it in or remove the record")
            turns[-1].response = content
            expect = "user"
    if not turns:
        raise UserError(f"{where}: no user message")
    if need_response and turns[-1].response is None:
        raise UserError(f"{where}: the last message must be the assistant's (its response is what trains)")
    return Conversation(turns, system)


def iter_records(source: str, fmt: str = "auto", split: str = "train", subset: str | None = None,
                 cache_dir: str | None = None, need_response: bool = True, limit: int | None = None,
                 with_records: bool = False) -> Iterator[tuple]:
    """(index of the first record, resolved format, Conversations[, the records as dicts]) per batch of BATCH
    records of `source`.

    `cache_dir`: where `datasets` caches local files (hub downloads keep the user's cache)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    src = resolve_source(records_spec(source), split=split, subset=subset)
    if src.local and src.builder not in ("json", "parquet"):
        raise UserError(f"{src.label}: SFT records are read from JSON, JSONL or parquet files, not {src.builder}")
    if src.local and all(f.stat().st_size == 0 for f in src.files):
        raise UserError(f"{src.label}: empty dataset (the files hold no bytes)")
    ds = load_source(src, cache_dir=cache_dir if src.local else None)
    if fmt == "auto":
        fmt = detect_format(ds.column_names, src.label)
    missing = [f for f in FIELDS[fmt] if f not in ds.column_names and (need_response or f in ("instruction", "prompt", "messages"))]
    if missing and len(ds):
        raise UserError(f"{src.label}: missing field {missing[0]!r} (fields: {', '.join(map(repr, ds.column_names))}); "
                        "fix the records or pass the right --format")
    n = len(ds) if limit is None else min(len(ds), limit)
    for start in range(0, n, BATCH):
        rows = ds[start:min(n, start + BATCH)]
        keys = list(rows)
        count = len(rows[keys[0]]) if keys else 0
        records = [{k: rows[k][i] for k in keys} for i in range(count)]
        convs = [to_conversation(r, fmt, f"{src.label} record {start + i + 1}", need_response)
                 for i, r in enumerate(records)]
        yield (start, fmt, convs, records) if with_records else (start, fmt, convs)


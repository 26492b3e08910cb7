"""Supervised fine-tuning data: instruction records -> tokens with a per-token loss mask; packed, resumable loading.

Records (JSON, JSONL or parquet, local or a hub dataset, read through `datasets`), one of three formats:
    alpaca           `instruction`, optional `input`, `output`
    prompt-response  `prompt`, `response`
    messages         `messages`: [{role, content}], an optional `system` message first, then `user` and
                     `assistant` turns alternating, ending with an assistant turn (every one is trained)
`auto` picks the format from the fields. A template (TEMPLATES) renders each user turn into the text that
precedes its response. An example is BOS, then per turn the rendered prompt (no loss unless
`train_on_prompt`) and the response followed by EOS (trained: the model learns to stop). Prompt and response
texts are tokenized separately, each as its own sentencepiece call, so `prompt_ids` (generation) gives exactly
the prompt tokens training saw.

Folder format (the conventions of `data prepare`: staging folder renamed into place, meta.json written last,
FORMAT_VERSION 1, meta["kind"] == "sft"):
    train.bin, val.bin             every example's tokens back to back, uint16 (vocab <= 65536) or uint32
    train.mask.bin, val.mask.bin   one uint8 per token: 1 = the token is a trained next-token target
    train.idx, val.idx             int64 start offsets of the examples, number of examples + 1 entries
    tokenizer.model, meta.json     meta.json adds format, template, train_on_prompt, seq_len, overlong and the
                                   examples read / kept / truncated / dropped, per split the examples, trained
                                   tokens and the longest example in positions (tokens - 1)
An example of n tokens takes n - 1 model positions (inputs tokens[:-1], targets tokens[1:]). With `seq_len`
an example that needs more positions is an error, or truncated (its end cut; dropped if no trained token is
left) or dropped, as `overlong` says, and counted.

Training (`SFTSamples`, `SFTLoader`): a sample is one row of `data.seq_len` positions. With packing, each epoch
shuffles the examples (seeded by (train.seed, epoch)) and fills rows greedily in that order; positions restart
at 0 for every example, and `doc_ids` give each example of a row its own id, so attention never crosses an
example boundary (`models.llama.document_mask`). Without packing a row is one example, right-padded to the
longest of its micro-batch (to data.seq_len under pipeline parallelism); causal attention is then exact without
a mask. Sample positions are global and dealt out over micro-steps and data-parallel ranks like pretraining
samples, so a resume continues at the exact next row. Padding has label -100, never EOS. The loss is
token-weighted over the global batch (pretrain/train/loop.py). Validation: the val split's examples packed the same
way in file order; its first min(eval.tokens // seq_len, rows) rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from pretrain.config import load_config
from pretrain.data.batches import IGNORE_INDEX
from pretrain.data.bundled import cache_root, damaged_cache_message, quiet_datasets, resolve_data_path
from pretrain.data.folders import (
    FORMAT_VERSION, META_FILE, MODEL_FILE, SFT_KIND, OutputExists, is_prepared, is_run_folder, read_meta, staging_dir,
    token_dtype, write_meta,
)
from pretrain.data.loader import DataLoader, ValidationBatches
from pretrain.data.prepare import assign_val
from pretrain.data.sources import BUNDLED_PREFIX, CORPORA_DIR, load_source, resolve_source
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError
from pretrain.runs import find_checkpoint

KIND = SFT_KIND
SFT_VERSION = 1
FORMATS = ("auto", "alpaca", "prompt-response", "messages")
OVERLONG = ("error", "truncate", "drop")
FILES = {"train.bin", "val.bin", "train.mask.bin", "val.mask.bin", "train.idx", "val.idx", META_FILE, MODEL_FILE,
         ".hf_cache"}
SPLITS = ("train", "val")
BATCH = 1000


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


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise UserError(f"--template {name!r}: no such template; choose one of {', '.join(TEMPLATES)}")
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


def _check_tokenizer(tok: Tokenizer) -> None:
    if tok.bos_id < 0 or tok.eos_id < 0:
        raise UserError(f"{tok.path}: the tokenizer needs BOS and EOS pieces (BOS opens and EOS closes every example)")


def encode_conversations(tok: Tokenizer, template: Template, convs: Sequence[Conversation], train_on_prompt: bool = False,
                         num_threads: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens int64, trained-target mask bool) per conversation: BOS, prompts, responses each followed by EOS.

    A conversation whose last turn has no response ends with that turn's prompt (a generation prompt)."""
    _check_tokenizer(tok)
    parts = [segments(c, template) for c in convs]
    texts = [text for segs in parts for text, _ in segs]
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


def source_spec(spec: str) -> str:
    """A bundled instruction set's JSONL file for `bundled:NAME`, else `spec` unchanged."""
    name = _bundled_name(spec)
    return str(CORPORA_DIR / BUNDLED[name].file) if name else spec


def iter_records(source: str, fmt: str = "auto", split: str = "train", subset: str | None = None,
                 cache_dir: str | None = None, need_response: bool = True, limit: int | None = None,
                 with_records: bool = False) -> Iterator[tuple]:
    """(index of the first record, resolved format, Conversations[, the records as dicts]) per batch of BATCH
    records of `source`.

    `cache_dir`: where `datasets` caches local files (hub downloads keep the user's cache)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    src = resolve_source(source_spec(source), split=split, subset=subset)
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


# ---------------------------------------------------------------------------------------------- prepare-sft


def prepare_sft(
    source: str,
    tokenizer: str | Tokenizer,
    out_dir: str,
    fmt: str = "auto",
    template: str = "default",
    *,
    train_on_prompt: bool = False,
    seq_len: int | None = None,
    overlong: str = "error",
    val_fraction: float = 0.05,
    seed: int = 0,
    split: str = "train",
    subset: str | None = None,
    max_examples: int | None = None,
    num_proc: int | None = None,
    overwrite: bool = False,
    cache_dir: str | None = None,
) -> str:
    """Tokenize instruction records into an SFT folder at `out_dir` (see the module docstring); return its path.

    Each kept example goes to val with probability `val_fraction`, decided by a hash of (seed, record index), as
    `data prepare` does for documents. Nothing is written unless every record is valid."""
    tmpl = get_template(template)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if overlong not in OVERLONG:
        raise UserError(f"--overlong {overlong!r} is not one of {', '.join(OVERLONG)}")
    if seq_len is not None and seq_len < 2:
        raise UserError(f"--seq-len {seq_len} must be >= 2")
    if overlong != "error" and seq_len is None:
        raise UserError(f"--overlong {overlong} needs --seq-len (the data.seq_len you will train with)")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if max_examples is not None and max_examples < 1:
        raise UserError(f"--max-examples {max_examples} must be >= 1")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else resolve_tokenizer(tokenizer, cache_dir)
    _check_tokenizer(tok)
    dtype = token_dtype(tok.vocab_size)
    threads = num_proc or min(os.cpu_count() or 1, 16)
    out = Path(out_dir).expanduser().absolute()
    with staging_dir(out, overwrite, is_sft_folder, what="a prepared SFT dataset", known=FILES, kind=KIND) as tmp:
        cache = tmp / ".hf_cache"
        cache.mkdir()
        examples: list[tuple[np.ndarray, np.ndarray]] = []
        kept_flags: list[bool] = []
        counts = {"read": 0, "kept": 0, "truncated": 0, "dropped": 0}
        resolved = fmt
        label = resolve_source(source_spec(source), split=split, subset=subset).label
        for start, resolved, convs in iter_records(source, fmt, split, subset, str(cache), limit=max_examples):
            for i, (ids, mask) in enumerate(encode_conversations(tok, tmpl, convs, train_on_prompt, threads)):
                counts["read"] += 1
                if seq_len is not None and len(ids) - 1 > seq_len:
                    if overlong == "error":
                        raise UserError(
                            f"{label} record {start + i + 1}: {len(ids)} tokens need {len(ids) - 1} positions, more "
                            f"than --seq-len {seq_len}; pass --overlong truncate or --overlong drop, or a larger --seq-len"
                        )
                    if overlong == "truncate" and mask[1:seq_len + 1].any():
                        ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
                        counts["truncated"] += 1
                    else:  # dropped, or truncation would leave nothing to train
                        counts["dropped"] += 1
                        kept_flags.append(False)
                        continue
                examples.append((ids, mask))
                kept_flags.append(True)
        counts["kept"] = len(examples)
        if not examples:
            why = f" ({counts['dropped']} dropped as longer than --seq-len {seq_len})" if counts["dropped"] else ""
            raise UserError(f"{label}: no examples to write{why}")
        is_val = assign_val(np.array(kept_flags, bool), val_fraction, seed)[np.array(kept_flags, bool)]
        if val_fraction > 0 and not is_val.any():
            raise UserError(f"{label}: the validation split came out empty ({len(examples)} example"
                            f"{'s' if len(examples) != 1 else ''}, --val-fraction {val_fraction:g}); give more "
                            "examples, a larger --val-fraction, or pass --val-fraction 0")
        split_info = {}
        for name, chosen in (("train", ~is_val), ("val", is_val)):
            picked = [examples[j] for j in np.flatnonzero(chosen)]
            lengths = np.array([len(ids) for ids, _ in picked], np.int64)
            tokens = np.concatenate([ids for ids, _ in picked]) if picked else np.zeros(0, np.int64)
            masks = np.concatenate([m for _, m in picked]) if picked else np.zeros(0, bool)
            tokens.astype(dtype).tofile(tmp / f"{name}.bin")
            masks.astype(np.uint8).tofile(tmp / f"{name}.mask.bin")
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tofile(tmp / f"{name}.idx")
            split_info[name] = {
                "num_examples": len(picked), "num_trained_tokens": int(masks.sum()),
                "max_example_positions": int(lengths.max() - 1) if len(lengths) else 0,
                "mask_file": f"{name}.mask.bin", "index_file": f"{name}.idx", "num_tokens": int(tokens.size),
            }
        (tmp / MODEL_FILE).write_bytes(tok.model_bytes)
        shutil.rmtree(cache, ignore_errors=True)
        options = dict(format=resolved, template=template, train_on_prompt=train_on_prompt, seq_len=seq_len,
                       overlong=overlong, max_examples=max_examples)
        if not resolve_source(source_spec(source), split=split, subset=subset).local:
            options.update(split=split, subset=subset)
        meta = write_meta(tmp, tok.info(), dtype, {s: split_info[s]["num_tokens"] for s in SPLITS},
                          {s: split_info[s]["num_examples"] for s in SPLITS}, label, options, val_fraction, seed)
        for s in SPLITS:
            meta["splits"][s].update(split_info[s])
        meta.update(kind=KIND, sft_version=SFT_VERSION, format=resolved, template=template,
                    train_on_prompt=train_on_prompt, examples=counts)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return str(out)


# ---------------------------------------------------------------------------------------------- SFT folders


def is_sft_folder(path) -> bool:
    """Whether `path` is a complete prepared SFT folder."""
    path = Path(path)
    if not is_prepared(path):
        return False
    try:
        read_sft_meta(path)
        return True
    except UserError:
        return False


def folder_kind(path: str) -> str:
    """"sft" or "pretrain" for a complete prepared folder (one-line error for anything else)."""
    return KIND if read_meta(path).get("kind") == KIND else "pretrain"


def read_sft_meta(path) -> dict:
    """The meta.json of a complete SFT folder; a one-line UserError for anything else."""
    meta = read_meta(path)
    if meta.get("kind") != KIND:
        raise UserError(f"data {path}: a pretraining folder, not an SFT one; prepare instruction data with "
                        "`pretrain data prepare-sft`")
    if meta.get("sft_version") != SFT_VERSION:
        raise UserError(f"data {path}: SFT format version {meta.get('sft_version')} but this version reads "
                        f"{SFT_VERSION}; re-run `pretrain data prepare-sft`")
    for s in SPLITS:
        info = meta["splits"][s]
        for name, size in ((info["mask_file"], info["num_tokens"]), (info["index_file"], 8 * (info["num_examples"] + 1))):
            f = Path(path) / name
            if not f.is_file() or f.stat().st_size != size:
                raise UserError(f"data {path}: {name} is missing or does not match meta.json; a prepare-sft publishes "
                                "only whole folders, so this one was cut short while being copied or was changed "
                                "since: copy it again, or re-create it with `pretrain data prepare-sft ... --out "
                                f"{path} --overwrite`")
    return meta


class SFTDataset:
    """One split of one or more SFT folders (examples pooled in folder order): example i -> (tokens, mask)."""

    def __init__(self, paths: str | Sequence[str], split: str = "train"):
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        self.paths = [str(Path(p).expanduser().absolute()) for p in paths]
        self.split = split
        self.metas = [read_sft_meta(p) for p in self.paths]
        shas = {m["tokenizer"].get("sha256") for m in self.metas}
        if len(shas) > 1:
            raise UserError(f"data: the SFT folders {', '.join(self.paths)} use different tokenizers; prepare them "
                            "with one")
        self._parts = None
        counts = [m["splits"][split]["num_examples"] for m in self.metas]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.lengths = np.concatenate([np.diff(self._index(j)) for j in range(len(self.paths))]).astype(np.int64) \
            if self.paths else np.zeros(0, np.int64)

    def _index(self, j: int) -> np.ndarray:
        return np.fromfile(Path(self.paths[j]) / self.metas[j]["splits"][self.split]["index_file"], dtype=np.int64)

    @property
    def parts(self):
        if self._parts is None:  # memory-mapped on first use (workers re-open instead of pickling the maps)
            self._parts = []
            for j, (p, m) in enumerate(zip(self.paths, self.metas)):
                info = m["splits"][self.split]
                n = info["num_tokens"]
                tokens = np.memmap(Path(p) / info["file"], dtype=np.dtype(m["dtype"]), mode="r") if n else np.zeros(0, np.uint16)
                mask = np.memmap(Path(p) / info["mask_file"], dtype=np.uint8, mode="r") if n else np.zeros(0, np.uint8)
                self._parts.append((tokens, mask, self._index(j)))
        return self._parts

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_parts": None}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (int64) and trained-target mask (bool) of example i."""
        j = int(np.searchsorted(self.starts, i, side="right") - 1)
        tokens, mask, index = self.parts[j]
        a, b = index[i - self.starts[j]], index[i - self.starts[j] + 1]
        return np.asarray(tokens[a:b], np.int64), np.asarray(mask[a:b]).astype(bool)

    @property
    def vocab_size(self) -> int:
        return max(int(m["vocab_size"]) for m in self.metas)

    @property
    def tokenizer_sha256(self) -> str | None:
        return self.metas[0]["tokenizer"].get("sha256")

    @property
    def trained_tokens(self) -> int:
        return sum(int(m["splits"][self.split]["num_trained_tokens"]) for m in self.metas)

    def fingerprint(self) -> dict:
        return {"sft": [{"sha256": m["tokenizer"].get("sha256"), "split": self.split,
                         "tokens": m["splits"][self.split]["num_tokens"],
                         "examples": m["splits"][self.split]["num_examples"]} for m in self.metas]}


class SFTBatch(NamedTuple):
    """A micro-batch of SFT rows: inputs and labels [B, T]; positions and doc_ids [B, T] for packed rows, None
    for padded ones (one example per row from position 0, plain causal attention)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None

    def model_kwargs(self, device=None) -> dict:
        """The keyword arguments of `Llama.forward` besides tokens and labels."""
        if self.positions is None:
            return {}
        return {"positions": self.positions.to(device), "doc_ids": self.doc_ids.to(device)}

    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def pipeline(self, scale: float | None = None) -> tuple:
        """The (inputs, labels) pair DeepSpeed's pipeline engine takes: inputs a tensor or (tokens, positions,
        doc_ids); labels a tensor or, with `scale`, (labels, scale) for the token-weighted loss."""
        inputs = self.tokens if self.positions is None else (self.tokens, self.positions, self.doc_ids)
        labels = self.labels if scale is None else (self.labels, torch.tensor(scale, dtype=torch.float32))
        return inputs, labels


def pack_bounds(positions: np.ndarray, seq_len: int, packing: bool) -> np.ndarray:
    """Row boundaries over a sequence of examples needing `positions` each: greedy packing in order (a row is
    closed when the next example does not fit), or one example per row. Returns [0, ..., len(positions)]."""
    if not packing:
        return np.arange(len(positions) + 1, dtype=np.int64)
    bounds, used = [0], 0
    for i, n in enumerate(positions.tolist()):
        if used + n > seq_len:
            bounds.append(i)
            used = 0
        used += n
    bounds.append(len(positions))
    return np.array(bounds if len(positions) else [0], np.int64)


class SFTSamples:
    """Rows (samples) of `seq_len` positions built from an SFTDataset, by global position (see module docstring).

    `fixed_length`: unpacked rows are padded to seq_len (pipeline parallelism needs equal shapes) instead of the
    longest example of their micro-batch."""

    def __init__(self, dataset: SFTDataset, seq_len: int, packing: bool = True, fixed_length: bool = False):
        self.dataset, self.seq_len, self.packing, self.fixed_length = dataset, seq_len, packing, fixed_length
        if len(dataset) == 0:
            hint = ("prepare it with --val-fraction > 0 (and more than one example), or set eval.interval=0"
                    if dataset.split == "val" else "prepare more examples")
            raise UserError(f"data {', '.join(dataset.paths)}: the {dataset.split} split holds no examples; {hint}")
        self.positions = dataset.lengths - 1
        longest = int(self.positions.max())
        if longest > seq_len:
            raise UserError(
                f"data {', '.join(dataset.paths)}: its longest {dataset.split} example needs {longest} positions (tokens "
                f"- 1) but data.seq_len={seq_len}; raise data.seq_len to {longest}, or re-prepare with `pretrain data "
                f"prepare-sft ... --seq-len {seq_len} --overlong truncate` (or drop)"
            )
        self._order = np.arange(len(dataset), dtype=np.int64)
        self._fixed = pack_bounds(self.positions, seq_len, packing)  # unshuffled order (validation)
        self._epochs: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._counts: dict[tuple, list[int]] = {}

    def __len__(self) -> int:
        """Rows of one pass in file order (the validation set's size)."""
        return len(self._fixed) - 1

    def _epoch(self, seed: tuple, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        key = (*seed, epoch)
        if key not in self._epochs:
            if len(self._epochs) >= 2:
                self._epochs.pop(next(iter(self._epochs)))
            rng = np.random.default_rng(np.random.SeedSequence([*seed, epoch]))
            order = rng.permutation(len(self.dataset)).astype(np.int64)
            self._epochs[key] = order, pack_bounds(self.positions[order], self.seq_len, self.packing)
        return self._epochs[key]

    def _epoch_start(self, seed: tuple, position: int) -> tuple[int, int]:
        """(epoch, its first global position) of global `position` of the shuffled order."""
        counts = self._counts.setdefault(tuple(seed), [])
        start, epoch = 0, 0
        while True:
            if epoch == len(counts):
                counts.append(len(self._epoch(seed, epoch)[1]) - 1)
            if position < start + counts[epoch]:
                return epoch, start
            start += counts[epoch]
            epoch += 1

    def groups(self, positions: np.ndarray, seed: Sequence[int], shuffle: bool = True) -> list[np.ndarray]:
        """The example indices of the rows at global `positions`."""
        out = []
        for p in np.asarray(positions, np.int64).tolist():
            if shuffle:
                epoch, start = self._epoch_start(tuple(seed), p)
                order, bounds = self._epoch(tuple(seed), epoch)
                k = p - start
            else:
                order, bounds, k = self._order, self._fixed, p % len(self)
            out.append(order[bounds[k]:bounds[k + 1]])
        return out

    def rows(self, groups: list[np.ndarray], pad_rows: int = 0) -> SFTBatch:
        """The micro-batch holding `groups` (one row each), plus `pad_rows` fully ignored rows."""
        need = [int(self.positions[g].sum()) for g in groups]
        T = self.seq_len if self.packing or self.fixed_length else max(need, default=1)
        B = len(groups) + pad_rows
        tokens = np.zeros((B, T), np.int64)
        labels = np.full((B, T), IGNORE_INDEX, np.int64)
        positions = np.tile(np.arange(T, dtype=np.int64), (B, 1))
        doc_ids = np.zeros((B, T), np.int64)
        for r, group in enumerate(groups):
            t = 0
            for d, e in enumerate(group.tolist()):
                ids, mask = self.dataset.example(e)
                n = len(ids) - 1
                tokens[r, t:t + n] = ids[:-1]
                labels[r, t:t + n] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
                positions[r, t:t + n] = np.arange(n)
                doc_ids[r, t:t + n] = d
                t += n
            positions[r, t:] = np.arange(T - t)  # the padding block: an example of its own, no labels
            doc_ids[r, t:] = len(group)
        as_t = torch.from_numpy
        if not self.packing:
            return SFTBatch(as_t(tokens), as_t(labels))
        return SFTBatch(as_t(tokens), as_t(labels), as_t(positions), as_t(doc_ids))

    def batch(self, positions: np.ndarray, seed: Sequence[int], shuffle: bool = True) -> SFTBatch:
        return self.rows(self.groups(positions, seed, shuffle))

    def fingerprint(self) -> dict:
        return {**self.dataset.fingerprint(), "seq_len": self.seq_len, "packing": self.packing}

    def __repr__(self) -> str:
        return (f"SFTSamples({self.dataset.paths}, split={self.dataset.split!r}, seq_len={self.seq_len}, "
                f"packing={self.packing}, {len(self.dataset)} examples, {len(self)} rows in file order)")


class SFTLoader(DataLoader):
    """Endless SFT micro-batches (`SFTBatch`) for one data-parallel rank, resumable from `consumed_samples` (rows);
    pretrain/train/loop.py gives their loss token-weighted over the global batch."""

    token_weighted = True

    def __next__(self) -> SFTBatch:
        batch = self.dataset.batch(self.positions(), (self.seed,), self.shuffle)
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return batch


class SFTValidationBatches(ValidationBatches):
    """ValidationBatches of SFT rows (`SFTSamples` in file order): the same dealing out over ranks and padding."""

    @property
    def num_tokens(self) -> int:
        """Trained label tokens of the whole set (all ranks): the denominator of the validation loss."""
        samples = self.dataset
        groups = samples.groups(np.arange(self.num_samples), (0,), shuffle=False)
        return sum(int(samples.dataset.example(e)[1][1:].sum()) for g in groups for e in g.tolist())

    def __getitem__(self, k: int) -> SFTBatch:
        if not 0 <= k < len(self):
            raise IndexError(f"validation micro-batch {k} out of range [0, {len(self)})")
        positions = self.positions(k)
        pad = self.micro_batch_size - len(positions) if self.pad else 0
        return self.dataset.rows(self.dataset.groups(positions, (0,), shuffle=False), pad_rows=pad)


# ---------------------------------------------------------------------------------------------- bundled sets


@dataclass(frozen=True)
class BundledSFT:
    """A shipped instruction set and how it becomes an SFT folder; every field goes into the cache key."""

    file: str
    tokenizer: str = "bundled:tinyshakespeare"
    template: str = "default"
    val_fraction: float = 0.1
    seed: int = 0


# scripts/make_tiny_instruct.py writes both files; the test file is the held-out split.
BUNDLED: dict[str, BundledSFT] = {
    "tiny-instruct": BundledSFT("tiny_instruct_train.jsonl"),
    "tiny-instruct-test": BundledSFT("tiny_instruct_test.jsonl"),
}


def _bundled_name(spec) -> str | None:
    if isinstance(spec, str) and spec.startswith(BUNDLED_PREFIX) and spec[len(BUNDLED_PREFIX):] in BUNDLED:
        return spec[len(BUNDLED_PREFIX):]
    return None


def resolve_path(spec: str, cache_dir: str | None = None) -> str:
    """A prepared folder for a data path: `bundled:tiny-instruct` (and -test) is prepared on first use into the
    bundled cache with the bundled tiny-Shakespeare tokenizer; anything else goes to
    `pretrain.data.bundled.resolve_data_path`."""
    name = _bundled_name(spec)
    if name is None:
        return resolve_data_path(spec, cache_dir)
    recipe = BUNDLED[name]
    tok = resolve_tokenizer(recipe.tokenizer, cache_dir)
    text = CORPORA_DIR / recipe.file
    key = hashlib.sha256(json.dumps(
        {"recipe": asdict(recipe), "records_sha256": hashlib.sha256(text.read_bytes()).hexdigest(),
         "tokenizer_sha256": tok.sha256, "format_version": FORMAT_VERSION, "sft_version": SFT_VERSION},
        sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root(cache_dir) / f"{name}-{key}"
    if is_sft_folder(folder):
        return str(folder)
    if folder.exists():
        raise UserError(damaged_cache_message(folder))
    with quiet_datasets():
        try:
            prepare_sft(spec, tok, str(folder), template=recipe.template, val_fraction=recipe.val_fraction,
                        seed=recipe.seed)
        except OutputExists:
            pass  # another rank published first
    read_sft_meta(folder)
    return str(folder)


def resolve_tokenizer(spec: str, cache_dir: str | None = None) -> Tokenizer:
    """A tokenizer from a .model file or a folder holding one (a prepared data folder, an HF directory),
    `bundled:NAME` (the bundled data's tokenizer), or a run / checkpoint folder (its training data's)."""
    if isinstance(spec, str) and spec.startswith(BUNDLED_PREFIX):
        return Tokenizer.load(resolve_path(spec, cache_dir))
    p = Path(spec).expanduser()
    if is_run_folder(p) and not any(p.glob("*.model")):
        return checkpoint_tokenizer(str(p))
    return Tokenizer.load(spec)


def checkpoint_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of the data a training checkpoint (step, checkpoints/ or run folder) was trained on."""
    folder = find_checkpoint(path)
    config = os.path.join(folder, "config.yaml")
    if not os.path.isfile(config):
        raise UserError(f"{path}: no config.yaml; give a checkpoint, run folder or tokenizer (--tokenizer)")
    cfg = load_config(config, stored=True)
    try:
        return Tokenizer.load(resolve_path(cfg.data.paths[0], cfg.data.cache_dir))
    except UserError as e:
        raise UserError(f"{path}: cannot find the tokenizer of its data {cfg.data.paths[0]} ({e}); pass --tokenizer") from None

"""Multiple-choice tasks, read as lm-eval-harness reads them, for `pretrain eval-choices`.

A task is an lm-eval task YAML of the local kind (benchmarks/tasks/*): `dataset_path: json`,
`dataset_kwargs: {data_files: {SPLIT: FILE}}`, `test_split` (or `validation_split`), `output_type:
multiple_choice`, `doc_to_text`, `doc_to_choice`, `doc_to_target`, optional `description` and `target_delimiter`
(default " "). As in lm-eval, a `doc_to_*` value that names a field of the record is that field; any other string is
a jinja template rendered with the record (a choice list renders as a Python list literal, a target as an index or
a choice's text); `doc_to_choice` may also be a YAML list. FILE is relative to the current directory, as for
lm-eval (datasets resolves it so): run both from the repository root for benchmarks/tasks. A `.jsonl` file is a task
too: records `{"context": ..., "choices": [...], "label": i}`. Zero-shot only: a YAML `num_fewshot` > 0 is refused.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import jinja2

from pretrain.config.loading import read_yaml
from pretrain.errors import UserError

SUPPORTED = {"task", "tag", "dataset_path", "dataset_kwargs", "test_split", "validation_split", "output_type",
             "doc_to_text", "doc_to_choice", "doc_to_target", "description", "target_delimiter", "num_fewshot",
             "metric_list", "metadata"}


@dataclass
class Item:
    """One question: `context` (description + text) and the choices, each scored as `delimiter + choice`."""

    context: str
    choices: list[str]
    gold: int


@dataclass
class Question:
    """One question as it is scored: a (context, continuation) pair per choice (lm-eval's requests), the texts
    acc_norm divides the log-likelihoods by (lm-eval's `doc_to_choice`), and the gold choice. A question with one
    context and a continuation per choice is the usual kind; Winogrande's partial scoring has a context per choice
    and one shared continuation."""

    pairs: list[tuple[str, str]]
    norm_texts: list[str]
    gold: int


@dataclass
class ChoiceTask:
    name: str
    items: list[Item]
    delimiter: str = " "

    def questions(self) -> list[Question]:
        return [Question([(item.context, self.delimiter + c) for c in item.choices], list(item.choices), item.gold)
                for item in self.items]


def load_task(path: str) -> ChoiceTask:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--task {path}: no such file; give an lm-eval task .yaml or a .jsonl of context/choices/label")
    if p.suffix == ".jsonl":
        records = _read_jsonl(p)
        spec = {"doc_to_text": "context", "doc_to_choice": "choices", "doc_to_target": "label"}
        return ChoiceTask(p.stem, [_item(spec, r, f"{p} record {i}") for i, r in enumerate(records, 1)])
    if p.suffix not in (".yaml", ".yml"):
        raise UserError(f"--task {path}: not a .yaml, .yml or .jsonl file")
    try:
        spec = read_yaml(p.read_text(), f"--task {path}")
    except UserError as e:
        if "tag" not in str(e):
            raise
        # e.g. lm-eval's `!function` tag: Python code this reader does not run
        raise UserError(f"{e}; this reader takes field names or jinja for doc_to_*") from None
    if not isinstance(spec, dict):
        raise UserError(f"--task {path}: not a YAML mapping")
    unknown = sorted(set(spec) - SUPPORTED)
    if unknown:
        raise UserError(f"--task {path}: keys {', '.join(unknown)} are not supported here; supported: "
                        f"{', '.join(sorted(SUPPORTED))}")
    if spec.get("output_type") != "multiple_choice" or spec.get("dataset_path") != "json":
        raise UserError(f"--task {path}: needs output_type: multiple_choice and dataset_path: json (a local file)")
    if spec.get("num_fewshot", 0):
        raise UserError(f"--task {path}: num_fewshot {spec['num_fewshot']}: only zero-shot tasks are scored; set 0")
    split = spec.get("test_split") or spec.get("validation_split")
    files = (spec.get("dataset_kwargs") or {}).get("data_files") or {}
    file = files.get(split) if isinstance(files, dict) else None
    if not isinstance(file, str):
        raise UserError(f"--task {path}: dataset_kwargs.data_files needs one file for test_split {split!r}")
    data = Path(file).expanduser()
    if not data.is_file():
        raise UserError(f"--task {path}: its data file {file} is not there from {Path.cwd()}; run from the folder it "
                        "is relative to (the repository root for benchmarks/tasks), as lm-eval needs too")
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target"):
        if key not in spec:
            raise UserError(f"--task {path}: no {key}")
    items = [_item(spec, r, f"{file} record {i}") for i, r in enumerate(_read_jsonl(data), 1)]
    return ChoiceTask(str(spec.get("task") or p.stem), items, str(spec.get("target_delimiter", " ")))


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path} line {line}: not UTF-8 (byte {data[e.start]:#04x}); save the file as UTF-8") from None
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {i}: not JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path} line {i}: a JSON {type(record).__name__}, not an object; each line is one "
                                "record such as {\"context\": ..., \"choices\": [...], \"label\": 0}")
            records.append(record)
    if not records:
        raise UserError(f"{path}: no records")
    return records


def _value(rule, record: dict, where: str):
    """lm-eval's rule: a field name is the field; another string is a jinja template; a list is itself."""
    if isinstance(rule, list):
        return rule
    if isinstance(rule, int):
        return rule
    if not isinstance(rule, str):
        raise UserError(f"{where}: a doc_to_* value must be a field name, a jinja template or a list")
    if rule in record:
        return record[rule]
    try:
        return jinja2.Template(rule, undefined=jinja2.StrictUndefined, keep_trailing_newline=True).render(**record)
    except jinja2.TemplateError as e:
        raise UserError(f"{where}: {rule!r}: {e}") from None


def _item(spec: dict, record: dict, where: str) -> Item:
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target"):
        rule = spec[key]
        if isinstance(rule, str) and rule.isidentifier() and rule not in record:
            # lm-eval would render a missing field's name as a template, i.e. as the literal word: name the field
            raise UserError(f"{where}: no field {rule!r} ({key}); the record has {', '.join(map(repr, record)) or 'none'}")
    text = _value(spec["doc_to_text"], record, where)
    choices = _value(spec["doc_to_choice"], record, where)
    if isinstance(choices, str):  # a jinja list renders as its Python literal (lm-eval reads it back the same way)
        try:
            choices = ast.literal_eval(choices)
        except (ValueError, SyntaxError):
            raise UserError(f"{where}: doc_to_choice gave {choices[:60]!r}, not a list") from None
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        # acc_norm divides by a choice's length: an empty one has none
        raise UserError(f"{where}: the choices must be a list of two or more non-empty strings")
    target = _value(spec["doc_to_target"], record, where)
    if isinstance(target, str):
        target = int(target) if target.strip().isdigit() else (choices.index(target) if target in choices else None)
    if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < len(choices):
        raise UserError(f"{where}: the target must be a choice's index or text")
    if not isinstance(text, str) or not text:
        raise UserError(f"{where}: an empty context; every question needs text before its choices")
    return Item(str(spec.get("description") or "") + text, choices, target)

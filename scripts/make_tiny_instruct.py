"""Generate the bundled instruction set `tiny-instruct` (pretrain/data/corpora/tiny_instruct_{train,test}.jsonl).

    python scripts/make_tiny_instruct.py            # rewrites both files (deterministic)
    python scripts/make_tiny_instruct.py --check    # exit 1 if the shipped files differ from what it generates

Six templated tasks whose answers a program can check, over 16 words that the bundled tiny-Shakespeare
tokenizer encodes as one piece each, so a 2M-parameter model continued from the quick-start run learns them in
a few CPU minutes: reverse three words, repeat three words (given as the Alpaca `input` field), name the first
or the last word of a list of 3-5, count the words of a list of 1-9, pick the larger of two two-digit numbers. Records are
Alpaca style (`instruction`, optional `input`, `output`) plus a `task` field. The test file is held out: none
of its instructions (with their input) appears in the train file.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "pretrain" / "data" / "corpora"
TRAIN_PER_TASK, TEST_PER_TASK = 500, 40
SEED = 20261122

# 16 words the bundled tokenizer encodes as one piece each (checked by tests/pretrain/data/test_sft_data.py). Few words make
# copying quick to learn: with 54 such words the same budget reached about a third of the exact match.
WORDS = "king queen lord lady love night day death life heart blood crown sword gold fire earth".split()


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def reverse(rng):
    ws = _words(rng, 3, 3)
    return {"instruction": f"Reverse the words: {' '.join(ws)}", "output": " ".join(reversed(ws))}


def repeat(rng):
    ws = _words(rng, 3, 3)
    return {"instruction": "Repeat the words.", "input": " ".join(ws), "output": " ".join(ws)}


def first(rng):
    ws = _words(rng, 3, 5)
    return {"instruction": f"What is the first word: {' '.join(ws)}", "output": ws[0]}


def last(rng):
    ws = _words(rng, 3, 5)
    return {"instruction": f"What is the last word: {' '.join(ws)}", "output": ws[-1]}


def count(rng):
    ws = _words(rng, 1, 9)
    return {"instruction": f"Count the words: {' '.join(ws)}", "output": str(len(ws))}


def larger(rng):
    a, b = rng.sample(range(10, 100), 2)
    return {"instruction": f"Which is larger: {a} or {b}", "output": str(max(a, b))}


TASKS = {"reverse": reverse, "repeat": repeat, "first": first, "last": last, "count": count, "larger": larger}


def generate() -> tuple[list[dict], list[dict]]:
    """(train, test) records: per task TRAIN_PER_TASK + TEST_PER_TASK distinct prompts, test ones never in train."""
    rng = random.Random(SEED)
    train, test = [], []
    for name, make in TASKS.items():
        seen: set[tuple] = set()
        records = []
        while len(records) < TRAIN_PER_TASK + TEST_PER_TASK:
            r = make(rng)
            key = (r["instruction"], r.get("input"))
            if key not in seen:
                seen.add(key)
                records.append({**r, "task": name})
        test += records[:TEST_PER_TASK]
        train += records[TEST_PER_TASK:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    args = parser.parse_args(argv)
    train, test = generate()
    files = {OUT / "tiny_instruct_train.jsonl": render(train), OUT / "tiny_instruct_test.jsonl": render(test)}
    if args.check:
        stale = [str(f) for f, text in files.items() if not f.is_file() or f.read_text(encoding="utf-8") != text]
        if stale:
            print(f"out of date: {', '.join(stale)}; run python scripts/make_tiny_instruct.py", file=sys.stderr)
            return 1
        return 0
    for f, text in files.items():
        f.write_text(text, encoding="utf-8")
        print(f"wrote {f} ({text.count(chr(10))} records)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""prepare-sft (formats, templates, loss mask, counts, bad input) and the SFT loaders (packing, resume, validation)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.data import leftovers, run_cli, snapshot, tiny_tokenizer_dir

from pretrain.data.folders import read_meta
from pretrain.data.loader import IGNORE_INDEX
from pretrain.data.prepare import save_arrays
from pretrain.data.resolve import resolve_tokenizer
from pretrain.data.sft_format import Conversation, Turn, get_template, prompt_ids
from pretrain.data.sft_loader import SFTDataset, SFTLoader, SFTSamples, SFTValidationBatches
from pretrain.data.sft_prepare import read_sft_meta
from pretrain.data.sources import BUNDLED_RECORDS, CORPORA_DIR
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError

REPO = Path(__file__).resolve().parents[3]
RECORDS = [
    {"instruction": "Name the king", "input": None, "output": "the king"},
    {"instruction": "Repeat the words.", "input": "sword crown", "output": "sword crown"},
    {"instruction": "Say nothing but yes", "output": "yes"},
]
CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who rules?"}, {"role": "assistant", "content": "the queen"},
    {"role": "user", "content": "And at night?"}, {"role": "assistant", "content": "the moon"},
]}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(tiny_tokenizer_dir())


def write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def examples(folder: str, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    ds = SFTDataset(folder, split)
    return [ds.example(i) for i in range(len(ds))]


def trained_text(tok, ids, mask) -> list[str]:
    """The decoded runs of trained tokens, EOS shown as <eos>."""
    runs, cur = [], []
    for t, m in zip(ids.tolist(), mask.tolist()):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    return [tok.decode([t for t in r if t != tok.eos_id]) + ("<eos>" if r[-1] == tok.eos_id else "") for r in runs]


def test_alpaca_masks_the_prompt_and_trains_response_and_eos(tmp_path, tok):
    out = run_prepare(tmp_path, write(tmp_path / "a.jsonl", RECORDS * 4), "--val-fraction", "0")
    meta = read_sft_meta(out)
    assert meta["kind"] == "sft" and meta["format"] == "alpaca" and meta["template"] == "default"
    assert meta["examples"] == {"read": 12, "kept": 12, "truncated": 0, "dropped": 0}
    got = examples(out, "train")
    assert len(got) == 12 == meta["splits"]["train"]["num_examples"]
    assert sum(int(m.sum()) for _, m in got) == meta["splits"]["train"]["num_trained_tokens"]
    for (ids, mask), record in zip(got, RECORDS * 4):
        assert ids[0] == tok.bos_id and not mask[0]  # BOS opens every example, is never a target
        assert ids[-1] == tok.eos_id and mask[-1]  # EOS closes the response and is trained
        assert trained_text(tok, ids, mask) == [record["output"] + "<eos>"]
        prompt = tok.decode(ids[~mask][1:].tolist())
        assert prompt == get_template("default").prompt(Turn(record["instruction"], record.get("input")))
        # generation renders a prompt exactly as training saw it
        conv = Conversation([Turn(record["instruction"], record.get("input"))])
        assert prompt_ids(tok, get_template("default"), conv) == ids[:int(np.argmax(mask))].tolist()
    assert "### Input:\nsword crown\n\n" in tok.decode(got[1][0].tolist())


def test_messages_train_every_assistant_turn_and_train_on_prompt(tmp_path, tok):
    src = write(tmp_path / "chat.jsonl", [CHAT] * 3)
    out = run_prepare(tmp_path, src, "--val-fraction", "0", "--template", "llama3")
    (ids, mask), = examples(out, "train")[:1]
    assert trained_text(tok, ids, mask) == ["the queen<eos>", "the moon<eos>"]
    text = tok.decode(ids.tolist())
    assert text.startswith("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    out2 = run_prepare(tmp_path, src, "--val-fraction", "0", "--train-on-prompt", name="all")
    (ids2, mask2), = examples(out2, "train")[:1]
    assert not mask2[0] and mask2[1:].all()  # everything but BOS
    pr = write(tmp_path / "pr.jsonl", [{"prompt": "Hail", "response": "hail to thee"}] * 2)
    (ids3, mask3), = examples(run_prepare(tmp_path, pr, "--val-fraction", "0", "--template", "none", name="pr"),
                              "train")[:1]
    assert trained_text(tok, ids3, mask3) == ["hail to thee<eos>"] and tok.decode(ids3[~mask3][1:].tolist()) == "Hail"


def test_val_split_and_overlong_truncate_or_drop_are_counted(tmp_path, tok):
    long = {"instruction": "Tell me " + "a long story " * 30, "output": "once upon a time " * 10}
    records = (RECORDS * 10) + [long, {"instruction": "Go", "output": "the sword " * 40}]
    src = write(tmp_path / "mixed.jsonl", records)
    lengths = [len(ids) for ids, _ in examples(run_prepare(tmp_path, src, "--val-fraction", "0", name="full"), "train")]
    seq = sorted(lengths)[-3]  # the two longest records do not fit
    trunc = run_prepare(tmp_path, src, "--seq-len", str(seq - 1), "--overlong", "truncate", "--val-fraction", "0.2",
                        name="trunc")
    meta = read_sft_meta(trunc)
    # the prompt of `long` alone fills the window (nothing left to train: dropped); the other is cut
    assert meta["examples"] == {"read": 32, "kept": 31, "truncated": 1, "dropped": 1}
    s = meta["splits"]
    assert s["train"]["num_examples"] + s["val"]["num_examples"] == 31 and s["val"]["num_examples"] >= 1
    assert max(s["train"]["max_example_positions"], s["val"]["max_example_positions"]) <= seq - 1
    drop = read_sft_meta(run_prepare(tmp_path, src, "--seq-len", str(seq - 1), "--overlong", "drop", name="drop"))
    assert drop["examples"] == {"read": 32, "kept": 30, "truncated": 0, "dropped": 2}


def run_prepare(tmp_path: Path, src: str, *extra: str, name: str = "out") -> str:
    out = tmp_path / name
    assert run_cli(["data", "prepare-sft", "--source", src, "--tokenizer", tiny_tokenizer_dir(), "--out", str(out),
                    *extra]) == 0
    return str(out)


BAD = {
    "missing field": ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], [],
                      r"record 2: missing field 'output'"),
    "empty response": ([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "  "}], [],
                       r"record 2: empty response \(field 'response'\); fill it in or remove the record"),
    "empty assistant turn": ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}],
                             [], r"record 1: empty response \(message 2\)"),
    "unknown template": (RECORDS, ["--template", "chatml"],
                         r"--template 'chatml': no such template; choose one of default, alpaca, llama3, none"),
    "longer than seq_len": (RECORDS, ["--seq-len", "8"],
                            r"record 1: \d+ tokens need \d+ positions, more than --seq-len 8; pass --overlong truncate"),
    "unknown format fields": ([{"question": "a", "answer": "b"}], [], r"cannot tell the record format from the fields"),
}


# Records as raw JSON Lines text, where a line is not JSON at all.
MALFORMED = {"malformed line": ('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"\n', [],
                                r"in.jsonl line 2: not valid JSON \(Expecting ',' delimiter, column 32\); fix or delete")}


@pytest.mark.parametrize("case", [*BAD, *MALFORMED])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    if case in MALFORMED:
        text, extra, message = MALFORMED[case]
        (tmp_path / "in.jsonl").write_text(text)
        src = str(tmp_path / "in.jsonl")
    else:
        records, extra, message = BAD[case]
        src = write(tmp_path / "in.jsonl", records)
    out = tmp_path / "sub" / "out"
    code = run_cli(["data", "prepare-sft", "--source", src, "--tokenizer", tiny_tokenizer_dir(), "--out", str(out),
                    *extra])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "examples/s]" not in ln]  # datasets bars
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists() and not (tmp_path / "sub").exists() and leftovers(tmp_path) == []


def test_other_folders_as_output_or_data_are_named_and_left_alone(tmp_path, capsys):
    src = write(tmp_path / "in.jsonl", RECORDS * 4)
    pre = Path(save_arrays(str(tmp_path / "pre"), {"train": np.arange(50), "val": np.arange(10)}, 64))
    tok = Path(shutil.copytree(tiny_tokenizer_dir(), tmp_path / "tok"))
    before = snapshot(pre), snapshot(tok)
    cases = [(pre, [], f"{pre} is a prepared dataset; pass --overwrite to replace it with a prepared SFT dataset, or "
                       "choose another output folder"),
             (tok, [], f"{tok} is a tokenizer folder (tokenizer.model, tokenizer_meta.json), not a prepared SFT "
                       "dataset; choose another output folder"),
             (tok, ["--overwrite"], "is a tokenizer folder")]
    for out, extra, message in cases:
        code = run_cli(["data", "prepare-sft", "--source", src, "--tokenizer", tiny_tokenizer_dir(), "--out", str(out),
                        *extra])
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "examples/s]" not in ln]
        assert code == 2 and len(lines) == 1 and message in lines[0] and "delete" not in lines[0], lines
    with pytest.raises(UserError, match="a tokenizer folder .*, not a prepared dataset"):
        SFTDataset(str(tok))
    assert (snapshot(pre), snapshot(tok)) == before and leftovers(tmp_path) == []


def test_damaged_sft_folder_is_not_called_interrupted(folder, tmp_path):
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    (copy / "val.idx").write_bytes(b"")
    with pytest.raises(UserError, match=r"val.idx is missing or does not match meta.json; .*copy it again, or re-create "
                                        r"it with `pretrain data prepare-sft \.\.\. --out .* --overwrite`") as e:
        read_sft_meta(copy)
    assert "delete" not in str(e.value)


@pytest.mark.processes
def test_bundled_instruction_set_is_current_held_out_and_single_pieces(data_cache):
    script = REPO / "scripts" / "make_tiny_instruct.py"
    assert subprocess.run([sys.executable, str(script), "--check"], capture_output=True).returncode == 0
    read = lambda f: [json.loads(line) for line in open(CORPORA_DIR / f)]  # noqa: E731
    train, test = read(BUNDLED_RECORDS["tiny-instruct"]), read(BUNDLED_RECORDS["tiny-instruct-test"])
    key = lambda r: (r["instruction"], r.get("input"))  # noqa: E731
    assert len(train) == 3000 and len(test) == 240 and not {key(r) for r in train} & {key(r) for r in test}
    sys.path.insert(0, str(script.parent))
    from make_tiny_instruct import WORDS

    tok = resolve_tokenizer("bundled:tinyshakespeare", data_cache)
    assert all(len(tok.encode(w)) == 1 for w in WORDS)


# ---------------------------------------------------------------------------------------------- loaders


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "king queen sword crown night day love hate".split()
    records = [{"instruction": " ".join(rng.choice(words, rng.integers(1, 8))),
                "output": " ".join(rng.choice(words, rng.integers(1, 6)))} for _ in range(120)]
    tmp = tmp_path_factory.mktemp("sft")
    return run_prepare(tmp, write(tmp / "r.jsonl", records), "--val-fraction", "0.2")


def test_packed_rows_restart_positions_and_hold_every_example_once_per_epoch(folder):
    samples = SFTSamples(SFTDataset(folder, "train"), seq_len=192, packing=True)
    ds = samples.dataset
    n_rows = len(samples._epoch((5,), 0)[1]) - 1
    batch = samples.batch(np.arange(n_rows), (5,))
    seen = []
    for r in range(n_rows):
        docs, pos, lab, x = (batch.doc_ids[r].numpy(), batch.positions[r].numpy(), batch.labels[r].numpy(),
                             batch.tokens[r].numpy())
        for d in np.unique(docs):
            sel = np.flatnonzero(docs == d)
            assert (np.diff(sel) == 1).all() and (pos[sel] == np.arange(len(sel))).all()  # contiguous, from 0
            if (lab[sel] != IGNORE_INDEX).any():  # a real example (padding has no labels)
                seen.append((tuple(x[sel]), tuple(lab[sel])))
    expected = []
    for i in range(len(ds)):
        ids, mask = ds.example(i)
        expected.append((tuple(ids[:-1]), tuple(np.where(mask[1:], ids[1:], IGNORE_INDEX))))
    assert sorted(seen) == sorted(expected)  # each example exactly once in an epoch, labels = masked next tokens
    assert int((batch.labels != IGNORE_INDEX).sum()) == ds.trained_tokens
    # rows are full: the next example of the order did not fit
    assert (batch.doc_ids.max(dim=1).values >= 1).float().mean() > 0.5


def test_loader_resumes_at_the_exact_row_and_deals_ranks_like_pretraining(folder):
    samples = SFTSamples(SFTDataset(folder, "train"), seq_len=128, packing=True)
    full = SFTLoader(samples, 2, seed=3)
    rows = [next(full).tokens for _ in range(40)]  # crosses epochs
    resumed = SFTLoader(SFTSamples(SFTDataset(folder, "train"), 128, True), 2, seed=3)
    resumed.load_state_dict({**full.state_dict(), "consumed_samples": 2 * 17})
    for k in range(17, 40):
        assert np.array_equal(next(resumed).tokens, rows[k])
    ranks = [SFTLoader(samples, 1, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    for k in range(0, 10):
        a, b = next(ranks[0]).tokens, next(ranks[1]).tokens
        assert np.array_equal(np.concatenate([a, b]), rows[k])
    other = SFTLoader(SFTSamples(SFTDataset(folder, "train"), 128, False), 2, seed=3)
    with pytest.raises(UserError, match="other data"):
        other.load_state_dict(full.state_dict())


def test_padded_rows_and_validation_set_same_for_every_layout(folder):
    samples = SFTSamples(SFTDataset(folder, "train"), seq_len=128, packing=False)
    b = samples.batch(np.arange(4), (0,), shuffle=False)
    assert b.positions is None and b.doc_ids is None
    lengths = [len(samples.dataset.example(i)[0]) - 1 for i in range(4)]
    assert b.tokens.shape == (4, max(lengths))  # padded to the longest of the micro-batch
    for r, n in enumerate(lengths):
        assert (b.labels[r, n:] == IGNORE_INDEX).all() and b.labels[r, n - 1] != IGNORE_INDEX  # EOS label trained
    val = SFTSamples(SFTDataset(folder, "val"), seq_len=128, packing=True, fixed_length=True)
    total = len(val)

    def rows(micro, dp, pad):
        out = []
        for r in range(dp):
            v = SFTValidationBatches(val, total, micro, r, dp, pad=pad)
            for batch in v:
                keep = (batch.labels != IGNORE_INDEX).any(dim=1)
                assert pad or keep.all()
                out += [tuple(t) for t in batch.tokens[keep].tolist()]
        return sorted(out)

    ref = rows(1, 1, False)
    assert len(ref) == total
    for micro, dp, pad in ((3, 1, False), (2, 2, True), (4, 3, True)):
        assert rows(micro, dp, pad) == ref
    assert SFTValidationBatches(val, total, 2).num_tokens == val.dataset.trained_tokens


def test_seq_len_shorter_than_an_example_is_refused(folder):
    longest = int(max(read_meta(folder)["splits"][s]["max_example_positions"] for s in ("train",)))
    with pytest.raises(UserError, match=rf"needs {longest} positions .* but data.seq_len={longest - 1}; raise"):
        SFTSamples(SFTDataset(folder, "train"), seq_len=longest - 1)

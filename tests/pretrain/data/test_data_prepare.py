"""prepare_dataset: sources, folder format, val split, parallelism, atomicity, bad input, CLI, bundled corpus."""

import gzip
import json
import multiprocessing
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers.data import (
    big_vocab_model, bundled_dir, leftovers, make_docs, run_cli, run_module, snapshot, split_docs, tiny_tokenizer_dir,
    write_jsonl, write_txt,
)

from pretrain.data import prepare as prep
from pretrain.data import sources
from pretrain.data.folders import OutputExists, read_meta, staging_dir
from pretrain.data.loader import TokenDataset
from pretrain.data.prepare import prepare_dataset
from pretrain.data.resolve import RECIPES, corpus_path, open_dataset, resolve_data_path
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError

pytestmark = pytest.mark.compat

DOCS = make_docs(240, seed=1)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(tiny_tokenizer_dir())


def tokens(folder, split):
    meta = read_meta(folder)
    return np.fromfile(f"{folder}/{split}.bin", dtype=meta["dtype"])


def expected_stream(tok, docs):
    return [t for d in docs for t in tok.encode(d) + [tok.eos_id]]


def test_txt_paragraphs_counts_eos_and_split(tmp_path, tok):
    src = write_txt(tmp_path / "corpus.txt", DOCS)
    out = prepare_dataset(str(src), tiny_tokenizer_dir(), str(tmp_path / "out"), val_fraction=0.1, num_proc=1)
    meta = read_meta(out)
    train, val = tokens(out, "train"), tokens(out, "val")
    assert meta["dtype"] == "uint16" and train.dtype == np.uint16
    assert meta["format_version"] == 1 and meta["complete"] and meta["eos_appended"]
    assert meta["tokenizer"]["sha256"] == tok.sha256 and meta["vocab_size"] == 320 and meta["tokenizer"]["eos_id"] == 3
    assert meta["source"] == str(src) and meta["source_options"]["sample_by"] == "paragraph"
    s = meta["splits"]
    assert s["train"]["num_tokens"] == len(train) and s["val"]["num_tokens"] == len(val)
    assert s["train"]["num_documents"] + s["val"]["num_documents"] == meta["num_documents"] == len(DOCS)
    assert meta["num_tokens"] == len(train) + len(val) == len(expected_stream(tok, DOCS))
    # One EOS per document, each document exactly once, in source order within each split.
    train_docs, val_docs = split_docs(train, 3), split_docs(val, 3)
    assert (len(train_docs), len(val_docs)) == (s["train"]["num_documents"], s["val"]["num_documents"])
    decoded = [tok.decode(d[:-1]) for d in train_docs], [tok.decode(d[:-1]) for d in val_docs]
    assert sorted(decoded[0] + decoded[1]) == sorted(DOCS)
    assert decoded[0] == [d for d in DOCS if d in set(decoded[0])]
    assert 10 <= len(val_docs) <= 45  # ~24 expected of 240
    assert decoded[0][0] == DOCS[0]  # the first document always trains
    # The tokenizer travels with the data.
    assert Tokenizer.load(f"{out}/tokenizer.model").sha256 == tok.sha256
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "tokenizer.model", "train.bin", "val.bin"]
    assert leftovers(tmp_path) == []


def test_split_depends_on_seed_and_fraction(tmp_path):
    src = write_txt(tmp_path / "c.txt", DOCS)
    counts = {}
    for name, frac, seed in (("a", 0.1, 0), ("b", 0.1, 0), ("c", 0.1, 1), ("d", 0.0, 0)):
        out = prepare_dataset(str(src), tiny_tokenizer_dir(), str(tmp_path / name), val_fraction=frac, seed=seed)
        counts[name] = (tokens(out, "train").tobytes(), read_meta(out)["splits"]["val"]["num_documents"])
    assert counts["a"] == counts["b"] and counts["a"][0] != counts["c"][0]
    assert counts["d"][1] == 0


@pytest.mark.parametrize("sample_by,n_docs", [("line", None), ("document", 2)])
def test_sample_by(tmp_path, tok, sample_by, n_docs):
    write_txt(tmp_path / "src" / "a.txt", DOCS[:10])
    write_txt(tmp_path / "src" / "b.txt", DOCS[10:20])
    out = prepare_dataset(str(tmp_path / "src"), tiny_tokenizer_dir(), str(tmp_path / "o"), val_fraction=0, sample_by=sample_by)
    meta = read_meta(out)
    lines = [line for d in DOCS[:20] for line in d.split("\n")]
    assert meta["num_documents"] == (n_docs or len(lines))
    if sample_by == "line":
        assert tokens(out, "train").tolist() == expected_stream(tok, lines)


def wikitext(docs):
    """WikiText-style text: ' = Heading = ' lines and paragraphs, each followed by a line holding one space."""
    parts = []
    for i, d in enumerate(docs):
        if i % 6 == 0:
            parts.append(f" = Section {i // 6} = " if i % 12 else f" = = Part {i} = = ")
        parts.append(" " + d)
    return parts, "".join(f"{p}\n \n" for p in parts)


def test_whitespace_only_lines_separate_paragraphs(tmp_path, tok):
    parts, text = wikitext(DOCS[:60])
    (tmp_path / "wiki.txt").write_text(" \n" + text, encoding="utf-8")
    outs = [prepare_dataset(str(tmp_path / "wiki.txt"), tiny_tokenizer_dir(), str(tmp_path / name), val_fraction=0.1,
                            **kw) for name, kw in (("o", {}), ("st", dict(streaming=True)))]
    meta = read_meta(outs[0])
    assert meta["num_documents"] == len(parts) == 70
    assert 1 <= meta["splits"]["val"]["num_documents"] < 30
    # Each heading and paragraph is one document, its own text (leading spaces, inner newlines) kept as it is.
    train_docs, val_docs = split_docs(tokens(outs[0], "train"), 3), split_docs(tokens(outs[0], "val"), 3)
    assert sorted(train_docs + val_docs) == sorted(tok.encode(p) + [3] for p in parts)
    assert tokens(outs[0], "train").tolist()[:len(tok.encode(parts[0])) + 1] == tok.encode(parts[0]) + [3]
    assert read_meta(outs[1])["splits"] == meta["splits"]
    assert tokens(outs[1], "val").tobytes() == tokens(outs[0], "val").tobytes()


def test_split_paragraphs_mixes_blank_and_whitespace_lines():
    text = "\n\na\n b \n\t\n\nc\n   \r\n\x0c\nd e\nf\n \n"
    assert prep.split_paragraphs(text) == ["a\n b ", "c", "d e\nf"]
    assert prep.split_paragraphs(" \n\t\n") == []
    assert prep.split_paragraphs("one line, no newline") == ["one line, no newline"]


def test_empty_validation_split_is_refused_and_writes_nothing(tmp_path, capsys):
    # One paragraph (lines but no separator between them): no document can go to validation.
    src = tmp_path / "one.txt"
    src.write_text("\n".join(" " + d.replace("\n", " ") for d in DOCS[:50]) + "\n", encoding="utf-8")
    out = tmp_path / "new" / "deeper" / "out"
    for streaming in (False, True):
        with pytest.raises(UserError, match=r"one.txt: the validation split came out empty \(1 document, "
                           r"--val-fraction 0.1\); give more documents, cut the text into more documents with "
                           r"--sample-by line, .*or pass --val-fraction 0") as e:
            prepare_dataset(str(src), tiny_tokenizer_dir(), str(out), val_fraction=0.1, streaming=streaming)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []
    (tmp_path / "kept").mkdir()  # a parent that existed before stays
    with pytest.raises(UserError, match="with --sample-by paragraph or line"):
        prepare_dataset(str(src), tiny_tokenizer_dir(), str(tmp_path / "kept" / "out"), val_fraction=0.1,
                        sample_by="document")
    assert list((tmp_path / "kept").iterdir()) == []
    # Not a text file: --sample-by does not apply.
    with pytest.raises(UserError, match=r"\(1 document, --val-fraction 0.2\); give more documents, or pass --val-fraction 0"):
        prepare_dataset(str(write_jsonl(tmp_path / "one.jsonl", DOCS[:1])), tiny_tokenizer_dir(), str(out), val_fraction=0.2)
    argv = ["data", "prepare", "--source", str(src), "--tokenizer", tiny_tokenizer_dir(), "--out", str(out),
            "--val-fraction", "0.1"]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err  # after the datasets progress bars: one error line, the last
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and err.endswith(f"\n{errors[0]}\n")
    assert "validation split came out empty" in errors[0]
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []
    # Without a validation split the same file prepares fine.
    assert read_meta(prepare_dataset(str(src), tiny_tokenizer_dir(), str(out), val_fraction=0))["num_documents"] == 1


def test_all_file_types_and_folders_agree(tmp_path, tok):
    docs = DOCS[:60]
    (tmp_path / "s").mkdir()
    write_jsonl(tmp_path / "s" / "d.jsonl", docs)
    (tmp_path / "s" / "d.json").write_text(json.dumps([{"text": d, "n": i} for i, d in enumerate(docs)]))
    pd.DataFrame({"text": docs, "n": range(60)}).to_parquet(tmp_path / "s" / "d.parquet")
    pd.DataFrame({"text": docs}).to_csv(tmp_path / "s" / "d.csv", index=False)
    write_jsonl(tmp_path / "folder" / "part-0.jsonl", docs[:25])
    write_jsonl(tmp_path / "folder" / "part-1.jsonl", docs[25:])
    (tmp_path / "folder" / "README.md").write_text("ignored: not a data file")
    want = expected_stream(tok, docs)
    for src in ("d.jsonl", "d.json", "d.parquet", "d.csv"):
        out = prepare_dataset(str(tmp_path / "s" / src), tiny_tokenizer_dir(), str(tmp_path / f"o-{src}"), val_fraction=0)
        assert tokens(out, "train").tolist() == want, src
    out = prepare_dataset(str(tmp_path / "folder"), tiny_tokenizer_dir(), str(tmp_path / "o-folder"), val_fraction=0)
    assert tokens(out, "train").tolist() == want
    assert read_meta(out)["num_documents"] == 60


def test_num_proc_and_streaming_match_single_process(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    outs = [
        prepare_dataset(str(src), tiny_tokenizer_dir(), str(tmp_path / name), val_fraction=0.2, **kw)
        for name, kw in (("p1", dict(num_proc=1)), ("p2", dict(num_proc=2)), ("st", dict(streaming=True, num_proc=2)))
    ]
    for split in ("train", "val"):
        a = [tokens(o, split).tobytes() for o in outs]
        assert a[0] == a[1] == a[2] and len(a[0]) > 0
    metas = [read_meta(o) for o in outs]
    assert metas[0]["splits"] == metas[1]["splits"] == metas[2]["splits"]


def test_max_docs(tmp_path, tok):
    src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    for streaming in (False, True):
        out = prepare_dataset(str(src), tiny_tokenizer_dir(), str(tmp_path / f"o{streaming}"), val_fraction=0,
                              max_documents=7, streaming=streaming)
        assert tokens(out, "train").tolist() == expected_stream(tok, DOCS[:7])


# Plain text as the text builder reads it: a BOM, CRLF and lone CR lines, runs of blank lines, WikiText's
# whitespace-only separators, other whitespace lines, a file with no blank line at all, one without a final newline.
RAW_TEXTS = {
    "a.txt": "\ufeffFirst para\r\nline two\r\n\r\n\r\n\r\nsecond\rthird\r\rfourth\n \n\t\nfifth  with  spaces \n\n\n"
             "\x0c\nsixth\u2028still sixth\n\n" + "".join(f"{d}\n\n" for d in DOCS[:30]),
    "b.txt": " \n = Heading = \n \n Body line one\n line two \n \n" * 7,
    "c.txt": "no blank line at all\njust lines\n" * 20,
    "d.txt": "last paragraph without a newline",
}


# Pieces of 5 and 64 characters make many batches, which two processes share (`processes`); the default, one.
@pytest.mark.parametrize("piece", [pytest.param(5, marks=pytest.mark.processes),
                                   pytest.param(64, marks=pytest.mark.processes), None])
def test_plain_text_read_without_datasets_gives_the_same_folder(tmp_path, monkeypatch, piece):
    """Text by paragraph is read directly (sources.text_pieces, cut into pieces of any size at blank lines) and cut
    into paragraphs in the encoder's processes: the same folder as through datasets' text builder, with one and two
    processes and --max-docs across pieces."""
    folder = tmp_path / "src"
    folder.mkdir()
    for name, text in RAW_TEXTS.items():
        (folder / name).write_bytes(text.encode("utf-8"))  # bytes: "\r" kept as written
    monkeypatch.setattr(sources, "TEXT_PIECE", piece or sources.TEXT_PIECE)
    src = sources.resolve_source(str(folder))
    pieces = list(sources.text_pieces(src))
    files = [t.replace("\r\n", "\n").replace("\r", "\n") for t in RAW_TEXTS.values()]
    paragraphs = [q for f in files for q in prep.split_paragraphs(f)]  # none spans two files
    assert [q for p, _ in pieces for q in prep.split_paragraphs(p)] == paragraphs
    assert sum(n for _, n in pieces) == sum(len(t.encode("utf-8")) for t in RAW_TEXTS.values())
    assert all(len(p) >= sources.TEXT_PIECE for p, _ in pieces[:-1])
    assert len(pieces) > len(RAW_TEXTS) if piece else len(pieces) == 1
    kw = dict(val_fraction=0.2, seed=3)
    with monkeypatch.context() as m:
        m.setattr(prep, "reads_text_directly", lambda src: False)
        reference = prepare_dataset(str(folder), tiny_tokenizer_dir(), str(tmp_path / "datasets"), **kw)
        cut = prepare_dataset(str(folder), tiny_tokenizer_dir(), str(tmp_path / "datasets7"), max_documents=37, **kw)
    outs = [prepare_dataset(str(folder), tiny_tokenizer_dir(), str(tmp_path / f"p{n}"), num_proc=n, **kw)
            for n in (1, 2)]
    cuts = [prepare_dataset(str(folder), tiny_tokenizer_dir(), str(tmp_path / f"c{n}"), num_proc=n, max_documents=37,
                            **kw) for n in (1, 2)]
    assert read_meta(reference)["num_documents"] == len(paragraphs) > 50
    assert read_meta(cut)["num_documents"] == 37
    for want_folder, folders in ((reference, outs), (cut, cuts)):
        for out in folders:
            assert read_meta(out)["splits"] == read_meta(want_folder)["splits"]
            for split in ("train", "val"):
                assert tokens(out, split).tobytes() == tokens(want_folder, split).tobytes()


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    model = big_vocab_model(f"{tiny_tokenizer_dir()}/tokenizer.model", tmp_path / "big.model")
    big = Tokenizer.load(model)
    assert big.vocab_size > 65536
    src = write_txt(tmp_path / "c.txt", DOCS[:30])
    out = prepare_dataset(str(src), str(model), str(tmp_path / "o"), val_fraction=0)
    meta = read_meta(out)
    t = tokens(out, "train")
    assert meta["dtype"] == "uint32" and t.dtype == np.uint32 and t.max() > 65535
    assert t.tolist() == expected_stream(big, DOCS[:30])
    assert (tmp_path / "o" / "train.bin").stat().st_size == 4 * len(t)


def test_interrupted_prepare_leaves_nothing_and_partial_folder_is_refused(tmp_path, monkeypatch):
    src = write_txt(tmp_path / "c.txt", DOCS)
    out = tmp_path / "out"

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash while tokenizing")

    with monkeypatch.context() as m:
        m.setattr(prep, "_write_documents", boom)
        with pytest.raises(Exception, match="simulated crash"):
            prepare_dataset(str(src), tiny_tokenizer_dir(), str(out), num_proc=1)
    assert not out.exists() and leftovers(tmp_path) == []

    # A folder cut short (a copy, or files put there by hand): bins without a complete meta.json. A prepare never
    # leaves one (it publishes whole folders), so the advice is to copy again or re-create, never to delete.
    out.mkdir()
    (out / "train.bin").write_bytes(b"\0" * 100)
    for call in (lambda: read_meta(out), lambda: TokenDataset(str(out), 8), lambda: resolve_data_path(str(out))):
        with pytest.raises(UserError, match=r"an incomplete prepared folder \(no meta.json\); .*copy it again, or "
                                            r"re-create it with `pretrain data prepare \.\.\. --out .* --overwrite`") as e:
            call()
        assert "delete" not in str(e.value)
    with pytest.raises(UserError, match=r"holds train.bin but is not a prepared dataset .*; pass --overwrite to "
                                        "replace it, or choose another output folder"):
        prepare_dataset(str(src), tiny_tokenizer_dir(), str(out))
    # Truncated bins next to a meta.json are refused as well.
    good = prepare_dataset(str(src), tiny_tokenizer_dir(), str(tmp_path / "good"))
    with open(f"{good}/train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match=r"incomplete prepared folder \(train.bin is missing or does not hold"):
        read_meta(good)
    prepare_dataset(str(src), tiny_tokenizer_dir(), str(out), overwrite=True)
    assert read_meta(out)["num_documents"] == len(DOCS)


def test_existing_output_refused_unless_overwrite(tmp_path):
    src = write_txt(tmp_path / "c.txt", DOCS[:20])
    out = prepare_dataset(str(src), tiny_tokenizer_dir(), str(tmp_path / "o"))
    with pytest.raises(UserError, match="already holds a prepared dataset; pass --overwrite"):
        prepare_dataset(str(src), tiny_tokenizer_dir(), out)
    src2 = write_txt(tmp_path / "c2.txt", DOCS[:5])
    prepare_dataset(str(src2), tiny_tokenizer_dir(), out, overwrite=True)
    assert read_meta(out)["num_documents"] == 5 and leftovers(tmp_path) == []
    (tmp_path / "empty").mkdir()
    assert read_meta(prepare_dataset(str(src), tiny_tokenizer_dir(), str(tmp_path / "empty")))["num_documents"] == 20


def test_concurrent_writer_loses_gracefully(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(OutputExists):
        with staging_dir(out, False, lambda p: (p / "done").exists(), "a result", known={"done"}) as first:
            (first / "done").write_text("first")
            with staging_dir(out, False, lambda p: (p / "done").exists(), "a result", known={"done"}) as second:
                (second / "done").write_text("second")
    assert (out / "done").read_text() == "second" and leftovers(tmp_path) == []


def _bad(tmp_path, source, match, **kw):
    with pytest.raises(UserError, match=match) as e:
        prepare_dataset(str(source), kw.pop("tokenizer", tiny_tokenizer_dir()), str(tmp_path / "out"), **kw)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_bad_input(tmp_path):
    _bad(tmp_path, tmp_path / "missing.jsonl", "missing.jsonl: no such file or folder")
    (tmp_path / "empty.txt").write_text("")
    _bad(tmp_path, tmp_path / "empty.txt", "empty dataset")
    (tmp_path / "blank.txt").write_text("\n\n   \n\n\t\n\n")
    _bad(tmp_path, tmp_path / "blank.txt", "empty dataset")
    (tmp_path / "latin1.txt").write_bytes(b"good line\n\nna\xefve caf\xe9\n")
    _bad(tmp_path, tmp_path / "latin1.txt", r"latin1.txt: not valid UTF-8 \(byte 0xef at offset 13\)")
    src = write_jsonl(tmp_path / "d.jsonl", DOCS[:5], field="content")
    _bad(tmp_path, src, r"no field 'text'; the fields are 'id', 'content'; pass --text-field")
    _bad(tmp_path, src, r"field 'id' holds .*int64.*not text", text_field="id")
    _bad(tmp_path, src, r"no field 'body'.*'id', 'content'", text_field="body", streaming=True)
    (tmp_path / "data.xml").write_text("<a/>")
    _bad(tmp_path, tmp_path / "data.xml", "unsupported file type")
    write_jsonl(tmp_path / "mixed" / "a.jsonl", DOCS[:3])
    write_txt(tmp_path / "mixed" / "b.txt", DOCS[:3])
    _bad(tmp_path, tmp_path / "mixed", "mixes file types")
    (tmp_path / "nodata").mkdir()
    _bad(tmp_path, tmp_path / "nodata", "no data files")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": oops\n{"text": "x"}\n')
    _bad(tmp_path, tmp_path / "broken.jsonl", r"broken.jsonl line 4: not valid JSON \(Expecting value, column 10\); "
         "fix or delete that line")
    _bad(tmp_path, tmp_path / "broken.jsonl", r"broken.jsonl line 4: not valid JSON", streaming=True)
    with gzip.open(tmp_path / "broken.jsonl.gz", "wt") as f:
        f.write('{"text": "ok"}\n{"text": "no end}\n')
    _bad(tmp_path, tmp_path / "broken.jsonl.gz", r"broken.jsonl.gz line 2: not valid JSON")
    (tmp_path / "array.json").write_text('[\n  {"text": "a"},\n  {"text": "b"\n]\n')  # one document, not lines
    _bad(tmp_path, tmp_path / "array.json", r"array.json line 4: not valid JSON")
    _bad(tmp_path, "no-such-org/no-such-dataset-xyz", "could not load no-such-org/no-such-dataset-xyz .*not a local file")
    _bad(tmp_path, write_txt(tmp_path / "ok.txt", DOCS[:3]), "no such file", tokenizer=str(tmp_path / "none.model"))
    _bad(tmp_path, tmp_path / "ok.txt", "must be in", val_fraction=1.0)


def test_cli_prepare_and_info(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", DOCS[:50], field="body")
    argv = ["data", "prepare", "--source", str(src), "--tokenizer", tiny_tokenizer_dir(), "--out", str(tmp_path / "o"),
            "--text-field", "body", "--num-proc", "2", "--val-fraction", "0.1"]
    assert run_cli(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"prepared: {tmp_path / 'o'} (train ") and "uint16, vocab 320" in out
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--overwrite" in err
    assert run_cli(argv + ["--overwrite"]) == 0
    capsys.readouterr()
    assert run_cli(["data", "info", str(tmp_path / "o")]) == 0
    assert '"num_documents": 50' in capsys.readouterr().out


def test_bundled_corpus():
    assert "Karpathy" in open(corpus_path("bundled:tinyshakespeare").replace("tinyshakespeare.txt", "README.md")).read()
    path = bundled_dir()
    meta = read_meta(path)
    recipe = RECIPES["tinyshakespeare"]
    assert meta["vocab_size"] == recipe.vocab_size <= 2048 and meta["dtype"] == "uint16"
    assert meta["source_options"]["sample_by"] == "paragraph" and meta["num_documents"] > 7000
    assert 0.07 < meta["splits"]["val"]["num_tokens"] / meta["num_tokens"] < 0.13
    t0 = time.perf_counter()
    assert resolve_data_path("bundled:tinyshakespeare", cache_dir=str(Path(path).parent)) == path
    assert time.perf_counter() - t0 < 1.0  # cached: no rebuild
    tok = Tokenizer.load(path)
    assert "ROMEO" in tok.decode(np.fromfile(f"{path}/train.bin", np.uint16)[:200000])
    with pytest.raises(UserError, match="no such bundled corpus; choose one of bundled:tinyshakespeare"):
        resolve_data_path("bundled:hamlet")


def _resolve(cache, q):
    q.put(resolve_data_path("bundled:tinyshakespeare", cache_dir=cache))


@pytest.mark.processes
def test_bundled_concurrent_ranks_agree(tmp_path):
    # Two "ranks" build the bundled data at once into an empty cache; both end with the same complete folder.
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_resolve, args=(str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    paths = [q.get(timeout=5) for _ in procs]
    assert all(p.exitcode == 0 for p in procs) and paths[0] == paths[1]
    assert read_meta(paths[0])["tokenizer"]["sha256"] == read_meta(bundled_dir())["tokenizer"]["sha256"]
    assert np.array_equal(np.fromfile(f"{paths[0]}/train.bin", np.uint16), np.fromfile(f"{bundled_dir()}/train.bin", np.uint16))
    assert leftovers(tmp_path) == []


def _one_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.processes
def test_tokenizer_folder_as_data_is_named_and_left_alone(tmp_path, capsys):
    tok = Path(shutil.copytree(tiny_tokenizer_dir(), tmp_path / "tok"))
    before = snapshot(tok)
    expected = (r"a tokenizer folder \(tokenizer.model, tokenizer_meta.json\), not a prepared dataset; tokenize text "
                rf"with it \(`pretrain data prepare --source TEXT --tokenizer {tok} --out DIR`\) and pass DIR")
    # read_meta is behind data.paths (training), `pretrain eval --data`, `data info`, open_dataset
    for call in (lambda: read_meta(tok), lambda: TokenDataset(str(tok), 8), lambda: resolve_data_path(str(tok)),
                 lambda: resolve_data_path(str(tok)), lambda: open_dataset([str(tok)], 8)):
        with pytest.raises(UserError, match=expected) as e:
            call()
        assert "delete" not in str(e.value) and "interrupted" not in str(e.value)
    rc, out, err = run_module(["data", "info", str(tok)])
    assert rc == 2 and "tokenizer folder" in _one_line(err) and "delete" not in err
    # ... and as the output of a prepare: refused even with --overwrite, the tokenizer untouched
    src = write_txt(tmp_path / "c.txt", DOCS[:20])
    for extra in ([], ["--overwrite"]):
        assert run_cli(["data", "prepare", "--source", str(src), "--tokenizer", str(tok), "--out", str(tok), *extra]) == 2
        err = _one_line(capsys.readouterr().err)
        assert f"{tok} is a tokenizer folder (tokenizer.model, tokenizer_meta.json), not a prepared dataset; " \
               "choose another output folder" in err
    assert snapshot(tok) == before and leftovers(tmp_path) == []


def test_lone_model_file_or_folder_as_data(tmp_path, capsys):
    # A folder holding only a tokenizer.model (a Llama tokenizer, copied by hand) has only names a prepared folder
    # also has; it is still a tokenizer, not a half-written prepare, and --overwrite does not replace it.
    llama = tmp_path / "llama"
    llama.mkdir()
    shutil.copy(Path(tiny_tokenizer_dir()) / "tokenizer.model", llama / "tokenizer.model")
    before = snapshot(llama)
    with pytest.raises(UserError, match=r"a folder holding a tokenizer \(tokenizer.model\), not a prepared dataset"):
        read_meta(llama)
    src = write_txt(tmp_path / "c.txt", DOCS[:20])
    with pytest.raises(UserError, match=r"is a folder holding a tokenizer \(tokenizer.model\), not a prepared dataset; "
                                        "choose another output folder"):
        prepare_dataset(str(src), tiny_tokenizer_dir(), str(llama), overwrite=True)
    with pytest.raises(UserError, match=r"a sentencepiece tokenizer file, not a prepared dataset folder"):
        read_meta(llama / "tokenizer.model")
    assert snapshot(llama) == before and leftovers(tmp_path) == []
    # with a config.json beside it, it is an HF model directory (an export), and is called one
    (llama / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"a Hugging Face model directory \(config.json, tokenizer.model\), not a "
                                        "prepared dataset"):
        read_meta(llama)


def test_run_and_staging_folders_as_data(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  paths: [somewhere]\n")
    with pytest.raises(UserError, match=r"a training run folder, not a prepared dataset; pass the prepared folder it "
                                        r"trained on \(data.paths in its config.yaml\)"):
        read_meta(run)
    # The one folder that can be half-written: a prepare's staging folder, left by a killed prepare.
    staging = tmp_path / ".out.partial-123-abcdef12"
    staging.mkdir()
    (staging / "train.bin").write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match=r"the staging folder of a `pretrain data prepare` that is still running or was "
                                        "killed .*; pass the --out folder, and delete this one if no prepare is running"):
        read_meta(staging)


def test_damaged_bundled_cache_may_be_deleted_and_is_rebuilt(tmp_path):
    path = resolve_data_path("bundled:tinyshakespeare", cache_dir=str(tmp_path))
    with open(f"{path}/val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match=r"a damaged bundled-data cache \(val.bin is missing or does not hold \d+ "
                                        r"tokens\); delete it, and the next use rebuilds it"):
        resolve_data_path("bundled:tinyshakespeare", cache_dir=str(tmp_path))
    shutil.rmtree(path)
    assert resolve_data_path("bundled:tinyshakespeare", cache_dir=str(tmp_path)) == path
    assert read_meta(path)["num_tokens"] == read_meta(bundled_dir())["num_tokens"]

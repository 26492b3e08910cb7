"""Tokenizer training and loading: ids, determinism, existing models, bad input, CLI."""

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from helpers.data import leftovers, make_docs, run_cli, run_module, snapshot, tiny_tokenizer_dir, write_jsonl, write_txt

from pretrain.data.prepare import prepare_dataset, save_arrays
from pretrain.data.tokenizer import META_FILE, MODEL_FILE, Tokenizer, train_tokenizer
from pretrain.errors import UserError

pytestmark = pytest.mark.compat


def test_train_records_ids_and_roundtrips():
    tok_dir = tiny_tokenizer_dir()
    meta = json.loads(open(f"{tok_dir}/{META_FILE}").read())
    tok = Tokenizer.load(tok_dir)
    assert (tok.vocab_size, tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (320, 0, 1, 2, 3)
    assert meta["vocab_size"] == 320 and meta["model_type"] == "bpe" and meta["byte_fallback"] is True
    assert (meta["pad_id"], meta["unk_id"], meta["bos_id"], meta["eos_id"]) == (0, 1, 2, 3)
    assert meta["sha256"] == tok.sha256 == hashlib.sha256(open(f"{tok_dir}/{MODEL_FILE}", "rb").read()).hexdigest()
    # Identity normalization and byte fallback: any text, unseen characters and layout included, survives.
    text = "the king  speaks\n\n\tto the queen: café, 日本, 1234 ✓"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eos_id not in ids and tok.bos_id not in ids
    assert tok.encode(text, bos=True, eos=True) == [tok.bos_id, *ids, tok.eos_id]
    assert tok.encode_batch([text, "the"], eos=True) == [ids + [3], tok.encode("the") + [3]]
    assert max(ids) < 320


def test_train_is_deterministic_and_unigram_works(tmp_path):
    corpus = write_txt(tmp_path / "c.txt", make_docs(300, seed=5))
    a = train_tokenizer([str(corpus)], 300, str(tmp_path / "a"))
    b = train_tokenizer([str(corpus)], 300, str(tmp_path / "b"))
    assert open(a, "rb").read() == open(b, "rb").read()
    u = Tokenizer.load(train_tokenizer([str(corpus)], 310, str(tmp_path / "u"), model_type="unigram"))
    assert u.vocab_size == 310 and u.eos_id == 3
    assert u.decode(u.encode("the rose weeps")) == "the rose weeps"
    assert leftovers(tmp_path) == []


def test_train_from_jsonl_field(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", make_docs(300, seed=6), field="body")
    tok = Tokenizer.load(train_tokenizer([str(src)], 300, str(tmp_path / "t"), text_field="body"))
    assert tok.vocab_size == 300
    with pytest.raises(UserError, match=r"no field 'text'.*'id', 'body'"):
        train_tokenizer([str(src)], 300, str(tmp_path / "t2"))
    assert not (tmp_path / "t2").exists()


def test_load_existing_llama_style_model(tmp_path):
    # Sentencepiece's default ids are Llama's: unk=0 bos=1 eos=2 and no pad; no meta file next to it.
    corpus = write_txt(tmp_path / "c.txt", make_docs(200))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "llama"), vocab_size=300, model_type="bpe",
        byte_fallback=True, minloglevel=2,
    )
    for path in (tmp_path / "llama.model", tmp_path):
        tok = Tokenizer.load(path)
        assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, -1, 300)
        assert tok.path == str(tmp_path / "llama.model")
    assert tok.decode(tok.encode("the king")) == "the king"
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.sha256 == tok.sha256 and clone.encode("the rose") == tok.encode("the rose")


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        Tokenizer.load(tmp_path / "missing.model")
    with pytest.raises(UserError, match="no sentencepiece .model file"):
        Tokenizer.load(tmp_path)
    (tmp_path / "bad.model").write_bytes(b"not a model at all")
    with pytest.raises(UserError, match="not a sentencepiece model"):
        Tokenizer.load(tmp_path / "bad.model")


def test_train_bad_input(tmp_path):
    good = write_txt(tmp_path / "c.txt", make_docs(50))
    with pytest.raises(UserError, match="missing.txt: no such file"):
        train_tokenizer([str(tmp_path / "missing.txt")], 300, str(tmp_path / "o"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt: not valid UTF-8 \(byte 0xe9 at offset 3\)"):
        train_tokenizer([str(good), str(tmp_path / "latin1.txt")], 300, str(tmp_path / "o"))
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(UserError, match="hold no text"):
        train_tokenizer([str(tmp_path / "blank.txt")], 300, str(tmp_path / "o"))
    with pytest.raises(UserError, match="too small"):
        train_tokenizer([str(good)], 100, str(tmp_path / "o"))
    with pytest.raises(UserError, match=r"Vocabulary size too high \(50000\)"):
        train_tokenizer([str(good)], 50000, str(tmp_path / "o"))
    with pytest.raises(UserError, match="not one of bpe, unigram"):
        train_tokenizer([str(good)], 300, str(tmp_path / "o"), model_type="wordpiece")
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_existing_output_refused_unless_overwrite(tmp_path):
    good = write_txt(tmp_path / "c.txt", make_docs(200))
    train_tokenizer([str(good)], 300, str(tmp_path / "o"))
    with pytest.raises(UserError, match="already holds a trained tokenizer; pass --overwrite"):
        train_tokenizer([str(good)], 300, str(tmp_path / "o"))
    path = train_tokenizer([str(good)], 310, str(tmp_path / "o"), overwrite=True)
    assert Tokenizer.load(path).vocab_size == 310 and leftovers(tmp_path) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="non-empty folder that is not a trained tokenizer"):
        train_tokenizer([str(good)], 300, str(tmp_path / "mine"), overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_tokenizer_train(tmp_path, capsys):
    good = write_txt(tmp_path / "c.txt", make_docs(200))
    rc = run_cli(["tokenizer", "train", "--input", str(good), "--vocab-size", "300", "--out", str(tmp_path / "t")])
    out = capsys.readouterr().out
    assert rc == 0 and "vocab 300" in out and "eos=3" in out
    assert Tokenizer.load(tmp_path / "t").vocab_size == 300
    rc = run_cli(["tokenizer", "train", "--input", str(tmp_path / "nope.txt"), "--vocab-size", "300", "--out", str(tmp_path / "u")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "nope.txt" in err


@pytest.mark.processes
def test_data_folder_as_tokenizer(tmp_path, capsys):
    # A prepared folder holds a copy of its tokenizer, so it is a valid --tokenizer; as the output of a tokenizer
    # training it is refused for what it is, even with --overwrite, and left untouched.
    good = write_txt(tmp_path / "c.txt", make_docs(200))
    data = Path(prepare_dataset(str(good), tiny_tokenizer_dir(), str(tmp_path / "data"), val_fraction=0.1))
    before = snapshot(data)
    assert Tokenizer.load(data).sha256 == Tokenizer.load(tiny_tokenizer_dir()).sha256
    capsys.readouterr()  # the prepare's progress bars
    for extra in ([], ["--overwrite"]):
        rc = run_cli(["tokenizer", "train", "--input", str(good), "--vocab-size", "300", "--out", str(data), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
        assert f"{data} is a prepared dataset, not a trained tokenizer; choose another output folder" in err
    rc, out, err = run_module(["tokenizer", "train", "--input", str(good), "--vocab-size", "300", "--out", str(data)])
    assert rc == 2 and err.count("\n") == 1 and "is a prepared dataset, not a trained tokenizer" in err
    assert snapshot(data) == before and leftovers(tmp_path) == []


def test_folders_without_a_model_as_tokenizer(tmp_path):
    arrays = Path(save_arrays(str(tmp_path / "arrays"), {"train": np.arange(50), "val": np.arange(10)}, 64))
    with pytest.raises(UserError, match=r"a prepared dataset without a copy of its tokenizer \(no tokenizer.model\); "
                                        r"pass the tokenizer it was prepared with"):
        Tokenizer.load(arrays)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    with pytest.raises(UserError, match="a training run folder, not a tokenizer; pass a tokenizer"):
        Tokenizer.load(run)

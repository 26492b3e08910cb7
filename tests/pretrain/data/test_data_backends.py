"""`--backend tokenizers|sentencepiece`: the same token ids from both and from sentencepiece's word cache (bundled
corpus, WikiText-style text, a fuzz set), for a BPE and a unigram model; byte-identical prepared folders; a one-line
fallback to plain sentencepiece where `tokenizers` or the cache would part from it; the progress line."""

import filecmp
import json
import random
import re
from pathlib import Path

import numpy as np

import pytest
from helpers.data import run_cli

from pretrain.data import backends, word_cache
from pretrain.data import prepare as prepare_module
from pretrain.data.backends import PROBES, CheckedWordCache, SentencepieceEncoder, TokenizersEncoder, encoder
from pretrain.data.prepare import prepare_dataset, split_paragraphs
from pretrain.data.resolve import corpus_path, resolve_tokenizer
from pretrain.data.sft_prepare import prepare_sft
from pretrain.data.tokenizer import Tokenizer, train_tokenizer
from pretrain.errors import UserError
from pretrain.notice import Progress

CORPUS = Path(corpus_path("bundled:tinyshakespeare")).read_text(encoding="utf-8")
WIKITEXT = (
    " \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : 戦場のヴァルキュリア3 , "
    "lit . Valkyria of the Battlefield 3 ) , commonly referred to as Valkyria Chronicles III outside Japan , is a "
    "tactical role @-@ playing video game developed by Sega and Media.Vision for the PlayStation Portable . \n \n "
    "= = Gameplay = = \n \n The game 's battle system , the BliTZ system , is carried over directly from Valkyira "
    "Chronicles . It sold 1 @,@ 000 @,@ 000 copies in 2 @.@ 5 years . \n \n = = = Music = = = \n \n"
)
# The pieces fuzz texts are made of: spaces, tabs and newlines in runs, at either end or alone; emoji (with joiners
# and variation selectors), scripts outside the training text (byte fallback), digits, the "▁" symbol itself, a
# literal "<s>" / "</s>", control characters, unicode spaces and line separators (str.isspace but not " ").
PARTS = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\r\n", "the", "King", "o'er", ",", ".", "?!", "🙂", "🎉", "👩‍👩‍👧",
         "❤️", "日本語", "Ωμέγα", "ñ", "ﬁ", "\u00a0", "\u200b", "\x00", "\x7f", "12345", "3.14", "\u2581", "<s>", "</s>",
         "<unk>", "ÿ", "\U0001f9ec", "\u0301", "a\u0301", "ǅ", "\ufeff", "\r", "\u3000", "\u2003", "\x0b", "\x0c",
         "\x85", "\u2028", "\n \n", " \u2581", "\u2581\u2581", "\t\t", "0", "007", "\n\n\n"]


def fuzz_texts(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [''.join(rng.choice(PARTS) for _ in range(rng.randint(0, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, Tokenizer]:
    """A BPE and a unigram tokenizer trained on part of the bundled corpus as `pretrain tokenizer train` trains."""
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS[:200_000], encoding="utf-8")
    return {kind: Tokenizer.load(train_tokenizer([str(corpus)], 800, str(root / kind), model_type=kind))
            for kind in ("bpe", "unigram")}


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_same_ids_on_bundled_wikitext_and_fuzz(toks, kind, capsys):
    tok = toks[kind]
    fast, reference = encoder(tok, "tokenizers"), encoder(tok, "sentencepiece", cache=False)
    assert isinstance(fast, TokenizersEncoder) and isinstance(reference, SentencepieceEncoder)
    texts = split_paragraphs(CORPUS) + WIKITEXT.split("\n") + [WIKITEXT] + fuzz_texts() + PROBES
    for eos in (True, False):
        assert fast.encode(texts, eos=eos) == reference.encode(texts, eos=eos)
    assert not fast.fell_back and capsys.readouterr().out == ""  # no fallback, nothing said


def all_texts() -> list[str]:
    """The bundled corpus's paragraphs, WikiText-style lines and a whole article, the fuzz set, the probes."""
    return split_paragraphs(CORPUS) + WIKITEXT.split("\n") + [WIKITEXT] + fuzz_texts(2000, seed=4) + PROBES


@pytest.mark.parametrize("kind", ["bpe", "unigram", "bundled"])
def test_word_cache_gives_sentencepiece_ids(toks, kind, capsys):
    """The ids of each text are its words' ids one after another (word_cache.py), cold and warm cache, with either
    word split (newlines start a word or not)."""
    tok = resolve_tokenizer("bundled:tinyshakespeare") if kind == "bundled" else toks[kind]
    cached, plain = encoder(tok, "sentencepiece"), encoder(tok, "sentencepiece", cache=False)
    assert isinstance(cached, CheckedWordCache) and isinstance(plain, SentencepieceEncoder)
    texts = all_texts()
    for eos in (True, False, True):  # the third pass finds every word in the cache
        assert cached.encode(texts, eos=eos) == plain.encode(texts, eos=eos)
    flat, lengths = cached.encode_flat(texts, eos=True)
    want_flat, want_lengths = plain.encode_flat(texts, eos=True)
    assert flat.dtype == want_flat.dtype == np.uint16
    assert np.array_equal(flat, want_flat) and np.array_equal(lengths, want_lengths)
    assert not cached.fell_back and capsys.readouterr().out == ""
    assert cached.encode([]) == [] and cached.encode([""], eos=True) == [[tok.eos_id]]
    # Newlines as ordinary characters (a model with "\n" in a piece): the same ids.
    spaces_only = word_cache.WordCacheEncoder(tok, backends._proto(tok), 1, lines=False)
    assert spaces_only.encode(texts, eos=True) == plain.encode(texts, eos=True)


@pytest.mark.parametrize("lines", [True, False])
def test_word_cache_keys_cut_the_text_at_word_starts(toks, lines, monkeypatch):
    """The keys' texts put together are the text sentencepiece sees (" " + text, "▁" as " "), each starting a word;
    the bundled corpus's paragraphs are cut by str.split, the regex (runs of spaces) kept for few texts."""
    cached = word_cache.WordCacheEncoder(toks["bpe"], backends._proto(toks["bpe"]), 1, lines=lines)
    starts = re.compile(r"(?<=[^ ]) |\n" if lines else r"(?<=[^ ]) ")  # sentencepiece: "▁" after another character
    for text in all_texts():
        keys = cached.keys(text)
        parts = list(map(cached.text_of, keys))
        assert "".join(parts) == (" " + text.replace("\u2581", " ") if text else "")
        assert all(part and (part[0] in " \n" if lines else part[0] == " ") for part in parts)
        # each key after the first starts a word: a space after something else, or (lines) a newline
        joined = "".join(parts)
        cuts = np.cumsum([len(part) for part in parts])[:-1]
        assert all(starts.match(joined, i) for i in cuts)
    regex = []
    monkeypatch.setattr(cached, "words", lambda text: regex.append(text) or re.findall(word_cache.WORDS, text))
    paragraphs = split_paragraphs(CORPUS)
    for text in paragraphs:
        cached.keys(text)
    assert len(regex) < len(paragraphs) / 100


def test_word_cache_starts_afresh_when_full(toks, monkeypatch):
    monkeypatch.setattr(word_cache, "MAX_WORDS", 64)
    tok = toks["bpe"]
    cached = word_cache.WordCacheEncoder(tok, backends._proto(tok), 1)
    shakespeare, fuzz = split_paragraphs(CORPUS[:20_000]), fuzz_texts(100)
    for texts in (shakespeare, fuzz, shakespeare):
        assert cached.encode(texts, eos=True) == tok.encode_batch(texts, eos=True)
        # the cache held more than 64 words, so it started afresh with the words of these texts alone
        assert set(cached.cache) == {w for t in texts for w in cached.keys(t)}


def test_word_cache_rules_out_models_it_cannot_split(toks, capsys):
    """Extra-whitespace removal and a piece across a word boundary give plain sentencepiece, said in one line."""
    tok = toks["bpe"]
    proto = backends._proto(tok)
    proto.normalizer_spec.remove_extra_whitespaces = True
    squeezing = Tokenizer(proto.SerializeToString(), "squeeze.model")
    enc = encoder(squeezing, "sentencepiece")
    assert isinstance(enc, SentencepieceEncoder)
    texts = ["  two  spaces ", "a  b"]
    assert enc.encode(texts) == squeezing.encode_batch(texts) != tok.encode_batch(texts)
    out = capsys.readouterr().out
    assert out == ("pretrain: --backend sentencepiece: squeeze.model has remove_extra_whitespaces, which changes the "
                   "spaces between words; tokenizing without the word cache (the same ids, slower)\n")
    proto = backends._proto(tok)
    proto.pieces.add(piece="e\u2581t", score=0.0, type=1)
    assert word_cache.unsafe(tok, proto) == "pieces that cross a word boundary (e\u2581t)"
    proto = backends._proto(tok)
    proto.pieces.add(piece="<x>", score=0.0, type=4)
    assert word_cache.unsafe(tok, proto).startswith("user-defined symbols (<x>)")


def test_word_cache_that_parts_from_sentencepiece_falls_back(toks, monkeypatch, capsys):
    bpe, unigram = toks["bpe"], toks["unigram"]
    texts = ["  two  spaces", "🙂 and the King"]
    want = bpe.encode_batch(texts, eos=True)
    wrong = word_cache.WordCacheEncoder(unigram, backends._proto(unigram), 1)  # another model's ids
    with monkeypatch.context() as m:
        m.setattr(word_cache, "WordCacheEncoder", lambda tok, proto, threads: wrong)
        enc = encoder(bpe, "sentencepiece")
    assert isinstance(enc, SentencepieceEncoder) and enc.encode(texts, eos=True) == want
    assert "gives other ids than without it on the probe texts" in capsys.readouterr().out
    enc = encoder(bpe, "sentencepiece")
    enc.cached = wrong
    assert enc.encode(texts, eos=True) == want and enc.fell_back
    assert enc.encode(texts[::-1], eos=True) == want[::-1]
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "gives other ids than without it on the first texts of the input" in out


def _plain_sentencepiece(*args, **kwargs):
    return encoder(*args, **kwargs, cache=False)


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_prepare_writes_the_same_files_with_either_backend(toks, kind, tmp_path, monkeypatch):
    src = tmp_path / "c.txt"
    src.write_text(CORPUS[:60_000] + WIKITEXT + "\n\n".join(fuzz_texts(200, seed=1)), encoding="utf-8")
    outs = [prepare_dataset(str(src), toks[kind], str(tmp_path / b), val_fraction=0.1, backend=b)
            for b in ("tokenizers", "sentencepiece")]
    monkeypatch.setattr(prepare_module, "encoder", _plain_sentencepiece)
    outs.append(prepare_dataset(str(src), toks[kind], str(tmp_path / "plain"), val_fraction=0.1))
    for out in outs[1:]:
        for name in ("train.bin", "val.bin"):
            assert filecmp.cmp(f"{outs[0]}/{name}", f"{out}/{name}", shallow=False), name
        assert _meta(outs[0]) == _meta(out)


@pytest.mark.processes
@pytest.mark.parametrize("sample_by, streaming", [("paragraph", False), ("line", True)])
def test_prepare_spreads_batches_over_processes(toks, tmp_path, monkeypatch, sample_by, streaming):
    """Batches after the first go to forked processes (num_proc 2), each with its own cache: the same files."""
    monkeypatch.setattr(prepare_module, "ENCODE_BATCH", 64)
    src = tmp_path / "c.txt"
    src.write_text(CORPUS[:100_000] + "\n\n".join(fuzz_texts(300, seed=5)), encoding="utf-8")
    options = dict(num_proc=2, sample_by=sample_by, streaming=streaming)
    fast = prepare_dataset(str(src), toks["bpe"], str(tmp_path / "fast"), **options)
    monkeypatch.setattr(prepare_module, "encoder", _plain_sentencepiece)
    plain = prepare_dataset(str(src), toks["bpe"], str(tmp_path / "plain"), **options)
    for name in ("train.bin", "val.bin"):
        assert filecmp.cmp(f"{fast}/{name}", f"{plain}/{name}", shallow=False), name


def _meta(folder) -> dict:
    """meta.json less its creation time (the two runs may straddle a second)."""
    meta = json.loads(Path(folder, "meta.json").read_text())
    meta.pop("created_at")
    return meta


def test_prepare_sft_writes_the_same_files_with_either_backend(toks, tmp_path):
    records = [{"prompt": t, "response": u} for t, u in zip(fuzz_texts(60, seed=2), fuzz_texts(60, seed=3)) if u.strip()]
    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    outs = [prepare_sft(str(src), toks["bpe"], str(tmp_path / b), fmt="prompt-response", val_fraction=0.1, backend=b)
            for b in ("tokenizers", "sentencepiece")]
    for name in ("train.bin", "val.bin", "train.mask.bin", "train.idx"):
        assert filecmp.cmp(f"{outs[0]}/{name}", f"{outs[1]}/{name}", shallow=False), name
    assert _meta(outs[0]) == _meta(outs[1])


def test_fallbacks_to_sentencepiece_are_one_line(toks, monkeypatch, capsys):
    bpe, unigram = toks["bpe"], toks["unigram"]
    texts = ["  two  spaces", "🙂 and the King"]
    want = bpe.encode_batch(texts, eos=True)
    # A model the translation cannot express (user-defined symbols, a char model): said, then sentencepiece.
    with monkeypatch.context() as m:
        m.setattr(backends, "untranslatable", lambda tok: "user-defined symbols (<x>)")
        enc = encoder(bpe, "tokenizers")
    assert isinstance(enc, SentencepieceEncoder) and enc.encode(texts, eos=True) == want
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "has user-defined symbols (<x>), which tokenizers cannot express; tokenizing " \
                                    "with sentencepiece" in out
    # A pipeline that parts from sentencepiece on the probe texts (here: the unigram model's for the BPE model).
    with monkeypatch.context() as m:
        m.setattr(backends, "backend_tokenizer", lambda tok, specials=True: _pipeline(unigram))
        enc = encoder(bpe, "tokenizers")
    assert isinstance(enc, SentencepieceEncoder) and enc.encode(texts, eos=True) == want
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "gives other ids than sentencepiece on the probe texts" in out
    # One that passes the probes but not the first texts of the input: said, and every text goes to sentencepiece.
    enc = encoder(bpe, "tokenizers")
    enc.hf = _pipeline(unigram)
    assert enc.encode(texts, eos=True) == want and enc.fell_back
    assert enc.encode(texts[::-1], eos=True) == want[::-1]
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "gives other ids than sentencepiece on the first texts of the input" in out


def _pipeline(tok: Tokenizer, build=backends.backend_tokenizer):
    return build(tok, specials=False)


def test_bad_backend_is_one_line(toks, tmp_path, capsys):
    with pytest.raises(UserError, match=r"--backend 'rust' is not one of sentencepiece, tokenizers"):
        encoder(toks["bpe"], "rust")
    src = tmp_path / "c.txt"
    src.write_text(CORPUS[:5000], encoding="utf-8")
    with pytest.raises(SystemExit):
        run_cli(["data", "prepare", "--source", str(src), "--tokenizer", toks["bpe"].path, "--out",
                 str(tmp_path / "o"), "--backend", "rust"])
    assert "invalid choice: 'rust'" in capsys.readouterr().err
    assert run_cli(["data", "prepare", "--source", str(src), "--tokenizer", toks["bpe"].path, "--out",
                    str(tmp_path / "o"), "--backend", "sentencepiece"]) == 0


def test_progress_is_quiet_when_fast_and_says_mb_per_s_when_slow(capsys):
    quiet = Progress("tokenizing", 1000)
    quiet.add(1000)
    quiet.close()
    assert capsys.readouterr().out == ""
    loud = Progress("tokenizing", 3_000_000, after=0.0, every=0.0)
    loud.add(1_000_000)
    loud.add(2_000_000)
    loud.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("pretrain: tokenizing 1.0 / 3.0 MB, ") and lines[0].endswith(" MB/s")
    assert lines[-1].startswith("pretrain: tokenizing 3.0 MB in ") and lines[-1].endswith(" MB/s")

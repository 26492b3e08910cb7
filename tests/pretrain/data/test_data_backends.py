"""`--backend tokenizers|sentencepiece`: the same token ids from both (bundled corpus, WikiText-style text, a fuzz
set), for a BPE and a unigram model; byte-identical prepared folders; a one-line fallback to sentencepiece where
`tokenizers` would part from it; the progress line."""

import filecmp
import json
import random
from pathlib import Path

import pytest
from helpers.data import run_cli

from pretrain.data import backends
from pretrain.data.backends import PROBES, SentencepieceEncoder, TokenizersEncoder, encoder
from pretrain.data.prepare import prepare_dataset, split_paragraphs
from pretrain.data.resolve import corpus_path
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
# literal "<s>" / "</s>", control characters.
PARTS = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\r\n", "the", "King", "o'er", ",", ".", "?!", "🙂", "🎉", "👩‍👩‍👧",
         "❤️", "日本語", "Ωμέγα", "ñ", "ﬁ", "\u00a0", "\u200b", "\x00", "\x7f", "12345", "3.14", "\u2581", "<s>", "</s>",
         "<unk>", "ÿ", "\U0001f9ec", "\u0301", "a\u0301", "ǅ", "\ufeff"]


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
    fast, reference = encoder(tok, "tokenizers"), encoder(tok, "sentencepiece")
    assert isinstance(fast, TokenizersEncoder) and isinstance(reference, SentencepieceEncoder)
    texts = split_paragraphs(CORPUS) + WIKITEXT.split("\n") + [WIKITEXT] + fuzz_texts() + PROBES
    for eos in (True, False):
        assert fast.encode(texts, eos=eos) == reference.encode(texts, eos=eos)
    assert not fast.fell_back and capsys.readouterr().out == ""  # no fallback, nothing said


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_prepare_writes_the_same_files_with_either_backend(toks, kind, tmp_path):
    src = tmp_path / "c.txt"
    src.write_text(CORPUS[:60_000] + WIKITEXT + "\n\n".join(fuzz_texts(200, seed=1)), encoding="utf-8")
    outs = [prepare_dataset(str(src), toks[kind], str(tmp_path / b), val_fraction=0.1, backend=b)
            for b in ("tokenizers", "sentencepiece")]
    for name in ("train.bin", "val.bin"):
        assert filecmp.cmp(f"{outs[0]}/{name}", f"{outs[1]}/{name}", shallow=False), name
    assert _meta(outs[0]) == _meta(outs[1])


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

"""The two tokenizing backends of `data prepare` and `data prepare-sft` (`--backend`), which give the same ids:
    sentencepiece   (default) the `.model` itself: its batched encode on `threads` threads (the reference), through
                    a cache of its words' ids where the model allows (word_cache.py; the same ids, the whole
                    prepare 3.1-3.7x as fast on 100 MB of repetitive text, docs/PERFORMANCE.md)
    tokenizers      Hugging Face `tokenizers`, in Rust and parallel, running the pipeline below, which is
                    the tokenizer.json `pretrain export-hf` writes (hf_tokenizer.py) plus a split into words
The sentencepiece model translated into a `tokenizers` pipeline (`backend_tokenizer`) that does what sentencepiece does:
    normalizer      the model's precompiled character map (none for our identity-normalized tokenizers), then a
                    "▁" prepended (sentencepiece's dummy prefix; always, also before a leading space, unlike
                    `Metaspace`, which skips it when the text starts with a space) and every space turned into "▁"
    model           BPE with every split of every piece into two pieces as a merge, ranked by the piece's score
                    (the order sentencepiece merges in), or Unigram with the pieces' scores; byte fallback on
    post-processor  BOS before every text: `pretrain generate` and SFT examples start with BOS
    decoder         "▁" back to spaces, byte pieces back to bytes, the dummy prefix's space removed
The special pieces (pad, unk, bos, eos, as the model has them) are special added tokens.

For tokenizing (`encoder`) the pipeline also cuts the text into sentencepiece's words (a run of "▁" and the
characters up to the next "▁"), when no piece crosses such a boundary (true of every model sentencepiece trains with
its default split_by_whitespace): BPE merges and the unigram lattice then cannot cross one either, so the ids are the
same, and `tokenizers` caches the pieces of each word instead of merging a whole paragraph at a time (twice as fast).
A model the translation cannot express (user-defined symbols, char or word models), or one that gives other ids on
the probe texts or the first texts of the input, tokenizes with sentencepiece, said in one line.
"""

from __future__ import annotations

import os
import re
from itertools import chain

import numpy as np
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE, Unigram

from pretrain.data import word_cache
from pretrain.data.folders import token_dtype
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError

BACKENDS = ("sentencepiece", "tokenizers")
# sentencepiece's batched C++ encode ran 3x faster than tokenizers' on 2 cores for a 100 MB corpus (docs/PERFORMANCE.md)
DEFAULT_BACKEND = "sentencepiece"
SPACE = "\u2581"  # sentencepiece's whitespace symbol
# sentencepiece ModelProto.SentencePiece.Type (unused and byte pieces need no handling of their own)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4
# sentencepiece's words: a new one starts at a "▁" that follows something else (runs of "▁" stay together, as
# allow_whitespace_only_pieces keeps them); a piece that fits this pattern never crosses a word boundary.
WORD = SPACE + "*[^" + SPACE + "]+|" + SPACE + "+"
# Texts where a translated pipeline most easily parts from sentencepiece, checked before the first batch.
PROBES = [
    "", " ", "  ", "\n", "\t", " leading", "   three leading", "trailing ", "trailing  \n", "a", "x\ny", "\n\n\nz\n",
    "two  spaces,   three\tand a tab\n", "emoji 🎉🙂👩‍👩‍👧, 日本語, ñ, Ω, ﬁ ligature, \u00a0nbsp, \u200bzw, \x00nul",
    "12345 3.14 1,000,000", "<s> </s> <unk> <pad> literal specials", "\u2581 a literal \u2581\u2581 whitespace symbol",
    "CAPITALS and MiXeD cAsE", "tab\tinside\t\tand  \t mixed", "\r\n windows line\r\n",
]
PROBE_FIRST = 256  # texts of the first batch also encoded with sentencepiece and compared


def _proto(tok: Tokenizer) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.model_bytes)
    return proto


def untranslatable(tok: Tokenizer) -> str | None:
    """What in `tok` the `tokenizers` pipeline cannot express, or None when it can."""
    proto = _proto(tok)
    user = [p.piece for p in proto.pieces if p.type == USER_DEFINED]
    if user:  # sentencepiece cuts them out of the text before the model runs, with its own matching rules
        return f"user-defined symbols ({', '.join(user[:3])})"
    if proto.trainer_spec.model_type not in (1, 2):
        return f"a sentencepiece {proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)} model"
    return None


def backend_tokenizer(tok: Tokenizer, specials: bool = True):
    """The `tokenizers.Tokenizer` that encodes and decodes as `tok` does; `specials=False` leaves the special pieces
    out of the added tokens, so that a literal "<s>" in a text is text, as sentencepiece reads it (tokenizing)."""
    why = untranslatable(tok)
    if why:
        raise UserError(f"{tok.path}: {why}, which the Hugging Face export cannot express; export with a bpe or "
                        "unigram tokenizer without user-defined symbols (--tokenizer)")
    proto = _proto(tok)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    if spec.model_type == 2:  # BPE
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        score = {piece: s for piece, s, t in pieces if t == NORMAL}
        merges = sorted(
            ((piece[:k], piece[k:]) for piece in score for k in range(1, len(piece))
             if piece[:k] in score and piece[k:] in score),
            key=lambda m: (-score[m[0] + m[1]], vocab[m[0] + m[1]], vocab[m[0]]))
        unk = pieces[tok.unk_id][0] if tok.unk_id >= 0 else None
        model = BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=spec.byte_fallback)
    else:  # unigram
        if not specials:  # its lattice would match "<s>" & co in a text; no normalized text holds a space
            pieces = [(" " + piece if t in (CONTROL, UNKNOWN) else piece, s, t) for piece, s, t in pieces]
        model = Unigram([(piece, s) for piece, s, _ in pieces], tok.unk_id if tok.unk_id >= 0 else None,
                        byte_fallback=spec.byte_fallback)
    hf = HFTokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:  # sentencepiece trims the text and collapses runs of spaces first
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    hf.normalizer = normalizers.Sequence(steps)
    hf.pre_tokenizer = None
    decode = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        decode.append(decoders.Strip(content=" ", left=1, right=0))
    hf.decoder = decoders.Sequence(decode)
    # Control and unknown pieces are never read from text by sentencepiece; here they are special tokens, which
    # transformers needs for bos_token & co (a literal "<s>" in a text becomes BOS: see docs/interop.md).
    if specials:
        hf.add_special_tokens([AddedToken(piece, special=True, normalized=False)
                               for piece, _, t in pieces if t in (CONTROL, UNKNOWN)])
    if tok.bos_id >= 0:
        bos = tok.sp.id_to_piece(tok.bos_id)
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_id)])
    return hf


def word_split(tok: Tokenizer):
    """The pre-tokenizer that cuts text into sentencepiece's words, or None when some piece crosses a boundary."""
    pattern = re.compile(WORD)
    for p in _proto(tok).pieces:
        if p.type == NORMAL and not pattern.fullmatch(p.piece):
            return None
    return pre_tokenizers.Split(Regex(WORD), behavior="isolated")


class ListEncoder:
    """`encode_flat` for an encoder whose `encode` gives a list of ids per text."""

    tok: Tokenizer

    def encode_flat(self, texts: list[str], eos: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(every text's ids one after another, the number of ids of each text), as word_cache.py gives them."""
        rows = self.encode(texts, eos)
        lengths = np.fromiter(map(len, rows), np.int64, count=len(rows))
        flat = np.fromiter(chain.from_iterable(rows), token_dtype(self.tok.vocab_size), count=int(lengths.sum()))
        return flat, lengths

    def encode_stream(self, batches, eos: bool = False, split=None):
        """`encode_flat` of each batch of texts, in order, each text first cut by `split` (word_cache.cut)."""
        for texts in batches:
            yield self.encode_flat(word_cache.cut(texts, split), eos)


class SentencepieceEncoder(ListEncoder):
    """The reference: sentencepiece's batched encode on `threads` threads."""

    name = "sentencepiece"

    def __init__(self, tok: Tokenizer, threads: int):
        self.tok, self.threads = tok, threads

    def encode(self, texts: list[str], eos: bool = False) -> list[list[int]]:
        return self.tok.encode_batch(texts, eos=eos, num_threads=self.threads) if texts else []


class TokenizersEncoder(ListEncoder):
    """`tokenizers` running the translated pipeline (rayon threads: one per core or RAYON_NUM_THREADS, none with
    TOKENIZERS_PARALLELISM=false). Its first call checks the first texts against sentencepiece and, if they differ,
    says so and hands every text to sentencepiece from then on (nothing has been written yet)."""

    name = "tokenizers"

    def __init__(self, tok: Tokenizer, hf, reference: SentencepieceEncoder, say):
        self.tok, self.hf, self.reference, self.say = tok, hf, reference, say
        self.checked = False
        self.fell_back = False

    def encode(self, texts: list[str], eos: bool = False) -> list[list[int]]:
        if self.fell_back:
            return self.reference.encode(texts, eos)
        if not texts:
            return []
        ids = [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=eos)]
        if not self.checked:
            self.checked = True
            if ids[:PROBE_FIRST] != self.reference.encode(texts[:PROBE_FIRST], eos):
                self.say(_fallback_line(self.tok, "gives other ids than sentencepiece on the first texts of the input"))
                self.fell_back = True
                return self.reference.encode(texts, eos)
        return ids


class CheckedWordCache:
    """word_cache.py's encoder whose first call is checked against sentencepiece's plain encode on its first texts;
    where they differ it says so and hands every text to sentencepiece from then on (nothing has been written yet)."""

    name = "sentencepiece"

    def __init__(self, cached: word_cache.WordCacheEncoder, reference: SentencepieceEncoder, say):
        self.cached, self.reference, self.say = cached, reference, say
        self.checked = False
        self.fell_back = False

    def encode_flat(self, texts: list[str], eos: bool = False) -> tuple[np.ndarray, np.ndarray]:
        if self.fell_back:
            return self.reference.encode_flat(texts, eos)
        flat, lengths = self.cached.encode_flat(texts, eos)
        if not self.checked:
            self.checked = True
            want_flat, want_lengths = self.reference.encode_flat(texts[:PROBE_FIRST], eos)
            if not (np.array_equal(lengths[:PROBE_FIRST], want_lengths)
                    and np.array_equal(flat[:want_flat.size], want_flat)):
                self.say(_cache_line(self.reference.tok, "gives other ids than without it on the first texts of "
                                                         "the input"))
                self.fell_back = True
                return self.reference.encode_flat(texts, eos)
        return flat, lengths

    def encode_stream(self, batches, eos: bool = False, split=None):
        """`encode_flat` of each batch of texts (each first cut by `split`), in order: the first here (checked), the
        others in word_cache's processes, which start with the first batch's words in their caches."""
        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            return
        yield self.encode_flat(word_cache.cut(first, split), eos)
        rest = self.reference if self.fell_back else self.cached
        yield from rest.encode_stream(batches, eos, split)

    def encode(self, texts: list[str], eos: bool = False) -> list[list[int]]:
        if self.fell_back:
            return self.reference.encode(texts, eos)
        flat, lengths = self.encode_flat(texts, eos)
        return [row.tolist() for row in np.split(flat, np.cumsum(lengths)[:-1])] if texts else []


def encoder(tok: Tokenizer, backend: str = DEFAULT_BACKEND, threads: int = 1, say=print, cache: bool = True):
    """The encoder for `--backend`: `encode(texts, eos) -> ids per text` and `encode_flat(texts, eos) -> (ids,
    lengths)`, the same ids whichever backend.

    `threads` is sentencepiece's thread count, and the size of the `tokenizers` pool when RAYON_NUM_THREADS is unset
    and the pool has not started. `say` prints the one line of a fallback. `cache=False` gives sentencepiece's plain
    encode without the word cache (the reference, for tests and benchmarks)."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    reference = SentencepieceEncoder(tok, threads)
    if backend == "sentencepiece":
        return _word_cache(tok, reference, threads, say) if cache else reference
    why = untranslatable(tok)
    if why:
        say(_fallback_line(tok, f"has {why}, which tokenizers cannot express"))
        return reference
    hf = backend_tokenizer(tok, specials=False)
    hf.pre_tokenizer = word_split(tok)
    hf.post_processor = None  # no BOS: prepare appends EOS only, prepare-sft adds BOS itself
    if tok.eos_id >= 0:
        eos = tok.sp.id_to_piece(tok.eos_id)
        hf.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, tok.eos_id)])
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # read once, when the first parallel encode starts
    probes = [e.ids for e in hf.encode_batch_fast(PROBES, add_special_tokens=False)]
    if probes != reference.encode(PROBES):
        say(_fallback_line(tok, "gives other ids than sentencepiece on the probe texts"))
        return reference
    return TokenizersEncoder(tok, hf, reference, say)


def _fallback_line(tok: Tokenizer, why: str) -> str:
    return f"pretrain: --backend tokenizers: {tok.path} {why}; tokenizing with sentencepiece (the same ids, slower)"


def _word_cache(tok: Tokenizer, reference: SentencepieceEncoder, threads: int, say):
    """The word-cached encoder, or `reference` (said in one line) where the model or the probe texts rule it out."""
    why = word_cache.unsafe(tok, _proto(tok))
    if why:
        say(_cache_line(tok, f"has {why}"))
        return reference
    cached = word_cache.WordCacheEncoder(tok, _proto(tok), threads)
    if cached.encode(PROBES) != reference.encode(PROBES):
        say(_cache_line(tok, "gives other ids than without it on the probe texts"))
        return reference
    return CheckedWordCache(cached, reference, say)


def _cache_line(tok: Tokenizer, why: str) -> str:
    return (f"pretrain: --backend sentencepiece: {tok.path} {why}; tokenizing without the word cache (the same ids, "
            "slower)")

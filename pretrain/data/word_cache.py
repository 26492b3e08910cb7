"""The fast path of `--backend sentencepiece`: each distinct word of the text is encoded once, by sentencepiece itself
(batched), and every later occurrence is a dict lookup — the word cache of GPT-2's encoder, tiktoken and `tokenizers`.

Why the ids are the same as sentencepiece's encode of the whole text (src/normalizer.cc, src/model_interface.cc,
src/bpe_model.cc, src/unigram_model.cc of google/sentencepiece):
    normalize   with an empty precompiled_charsmap (`identity`), remove_extra_whitespaces off, escape_whitespaces on
                and add_dummy_prefix on, sentencepiece's normalized text is "▁" + text with every " " (U+0020 only)
                made "▁"; tabs, newlines, "\\r", no-break and other unicode spaces stay as they are, and a literal "▁"
                is "▁" as a space is. So the ids of a text are those of " " + text with each "▁" made " ". An empty
                text stays empty (no dummy prefix).
    words       sentencepiece's words start where a "▁" follows another character (SplitIntoWords). When no normal
                piece holds a "▁" after another character, no piece crosses that boundary, so BPE's merges and the
                unigram lattice never join two words: the ids of a text are the ids of its words, one after another.
                "▁" must be a piece or byte-encodable, so that no unknown piece is fused across a boundary.
    newlines    the same holds before a "\\n" when no normal piece holds one and byte fallback is on (every model we
                train: sentencepiece trains on lines), so a run of newlines starts a word too (lines are shuffled
                and joined freely in real text; this keeps the number of distinct words small).
A model where this does not hold (a normalization rule, extra-whitespace removal, whitespace as suffix, user-defined
symbols, a piece crossing the boundary) tokenizes with plain sentencepiece, said in one line; so does one whose cache
gives other ids than the plain encode on the probe texts or the first texts of the input (no model has so far).

The words (the cache's keys) are cut from " " + text by one regex (WORDS): a run of spaces, or of newlines, and the
characters up to the next space or newline. A word is encoded by sentencepiece as "a" + word, whose ids start with
those of "a" alone (checked): the word " " at a text's end would be nothing alone, without a dummy prefix of its own.
"""

from __future__ import annotations

import multiprocessing
import re
from array import array
from collections import deque
from itertools import chain, filterfalse

import numpy as np

from pretrain.data.folders import token_dtype
from pretrain.data.tokenizer import Tokenizer

SPACE = "\u2581"  # sentencepiece's whitespace symbol
# A piece that matches this never crosses the start of a word (a "▁" after another character).
PIECE = SPACE + "*[^" + SPACE + "]+|" + SPACE + "+"
WORDS = " +[^ ]*"  # the words of " " + text with "▁" made " "
WORDS_AND_LINES = " +[^ \n]*|\n+[^ \n]*"  # ... where a run of newlines starts a word too
EOS_KEY = ""  # no word is empty, so "" stands for EOS in a document's list of words
# Words kept before the cache starts afresh: about 200 bytes each, so at most about 200 MB.
MAX_WORDS = 1 << 20
CONTEXT = "a"  # what every cached word is encoded after (see the module docstring)
NORMAL, USER_DEFINED = 1, 4  # sentencepiece ModelProto.SentencePiece.Type


def unsafe(tok: Tokenizer, proto) -> str | None:
    """Why `tok`'s ids are not its words' ids one after another (so no cache), or None when they are."""
    norm, spec = proto.normalizer_spec, proto.trainer_spec
    if spec.model_type not in (1, 2):
        return f"a sentencepiece {spec.ModelType.Name(spec.model_type)} model"
    if norm.precompiled_charsmap:
        return f"the normalization rule {norm.name!r}, which can change text across words"
    if norm.remove_extra_whitespaces:
        return "remove_extra_whitespaces, which changes the spaces between words"
    if not norm.add_dummy_prefix or not norm.escape_whitespaces or spec.treat_whitespace_as_suffix:
        return "whitespace handling other than a dummy prefix and '▁' before words"
    user = [p.piece for p in proto.pieces if p.type == USER_DEFINED]
    if user:
        return f"user-defined symbols ({', '.join(user[:3])}), which sentencepiece matches across words"
    piece = re.compile(PIECE)
    crossing = [p.piece for p in proto.pieces if p.type == NORMAL and not piece.fullmatch(p.piece)]
    if crossing:
        return f"pieces that cross a word boundary ({', '.join(crossing[:3])})"
    if tok.sp.piece_to_id(SPACE) == tok.unk_id and not spec.byte_fallback:
        return "no '▁' piece and no byte fallback"
    return None


class WordCacheEncoder:
    """sentencepiece's ids through a cache of its words' ids (see the module docstring); `threads` encode the
    words not seen yet. `encode_flat` gives one array of every text's ids and the texts' lengths, without a Python
    int per token; `encode_stream` spreads batches of texts over `threads` processes."""

    name = "sentencepiece"

    def __init__(self, tok: Tokenizer, proto, threads: int):
        self.tok, self.threads = tok, threads
        self.dtype = token_dtype(tok.vocab_size)
        self.typecode = "H" if self.dtype == np.uint16 else "I"
        self.context = tok.encode(CONTEXT)
        lines = proto.trainer_spec.byte_fallback and not any(p.type == NORMAL and "\n" in p.piece for p in proto.pieces)
        self.words = re.compile(WORDS_AND_LINES if lines else WORDS).findall
        self.eos = array(self.typecode, [tok.eos_id]).tobytes()
        self.cache: dict[str, bytes] = {EOS_KEY: self.eos}

    def keys(self, text: str) -> list[str]:
        """The cache keys of `text`'s words, in order."""
        if not text:
            return []
        return self.words(" " + text.replace(SPACE, " ") if SPACE in text else " " + text)

    def _learn(self, keys: list[list[str]]) -> None:
        """Encode and cache the words of `keys` not in the cache yet."""
        new = set(filterfalse(self.cache.__contains__, chain.from_iterable(keys)))
        if len(self.cache) + len(new) > MAX_WORDS:  # start afresh: the words of these texts are encoded again
            self.cache = {EOS_KEY: self.eos}
            new = set(chain.from_iterable(keys))
            new.discard(EOS_KEY)
        new = list(new)
        rows = self.tok.encode_batch([CONTEXT + k for k in new], num_threads=self.threads)
        # One array for all of them, then each word's bytes after its context's ids (no Python list per word).
        lengths = np.fromiter(map(len, rows), np.int64, count=len(rows))
        flat = np.fromiter(chain.from_iterable(rows), self.dtype, count=int(lengths.sum()))
        starts = np.cumsum(lengths) - lengths
        n = len(self.context)
        if (lengths < n).any() or not (flat[starts[:, None] + np.arange(n)] == self.context).all():
            raise RuntimeError(f"{self.tok.path}: a word changed the ids of the word before it")
        data, size = flat.tobytes(), self.dtype.itemsize
        begin, end = ((starts + n) * size).tolist(), ((starts + lengths) * size).tolist()
        self.cache.update(zip(new, map(data.__getitem__, map(slice, begin, end))))

    def encode_flat(self, texts: list[str], eos: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(every text's ids one after another, the number of ids of each text)."""
        keys = [self.keys(t) for t in texts]
        if eos:
            for k in keys:
                k.append(EOS_KEY)
        join, rows, unseen = b"".join, [], []
        get = self.cache.__getitem__
        for i, k in enumerate(keys):  # a lookup per word, in C; the texts with a new word wait for _learn
            try:
                rows.append(join(map(get, k)))
            except KeyError:
                rows.append(b"")
                unseen.append(i)
        if unseen:
            self._learn([keys[i] for i in unseen])
            get = self.cache.__getitem__
            for i in unseen:
                rows[i] = join(map(get, keys[i]))
        lengths = np.fromiter(map(len, rows), np.int64, count=len(rows)) // self.dtype.itemsize
        return np.frombuffer(join(rows), self.dtype), lengths

    def encode(self, texts: list[str], eos: bool = False) -> list[list[int]]:
        flat, lengths = self.encode_flat(texts, eos)
        return [row.tolist() for row in np.split(flat, np.cumsum(lengths)[:-1])] if texts else []

    def encode_stream(self, batches, eos: bool = False):
        """`encode_flat` of each batch of texts, in order. With more than one thread each batch goes whole to one of
        `threads` forked processes (each with its own cache, starting from this one's), at most `threads` + 1 batches
        in flight, so that reading the next batch overlaps encoding these (the cache's lookups hold the GIL)."""
        batches = iter(batches)
        first = next(batches, None)
        if first is None:  # no process started for nothing (a prepare of one batch never starts one)
            return
        if self.threads <= 1:
            for texts in chain([first], batches):
                yield self.encode_flat(texts, eos)
            return
        # fork: the workers start with the tokenizer and the cache, no import, and nothing to pickle
        with multiprocessing.get_context("fork").Pool(self.threads, _start_worker, (self,)) as pool:
            pending = deque()
            for texts in chain([first], batches):
                pending.append(pool.apply_async(_encode_in_worker, (texts, eos)))
                if len(pending) > self.threads:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()


_worker: WordCacheEncoder | None = None  # the encoder of a process of `encode_stream`


def _start_worker(encoder: WordCacheEncoder) -> None:
    global _worker
    _worker = encoder
    _worker.threads = 1  # one process per core already


def _encode_in_worker(texts: list[str], eos: bool) -> tuple[np.ndarray, np.ndarray]:
    return _worker.encode_flat(texts, eos)

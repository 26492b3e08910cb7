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
                train: sentencepiece trains on lines): each newline is then a byte piece of its own, so each starts a
                word too (lines are shuffled and joined freely in real text; this keeps the number of distinct words
                small).
A model where this does not hold (a normalization rule, extra-whitespace removal, whitespace as suffix, user-defined
symbols, a piece crossing the boundary) tokenizes with plain sentencepiece, said in one line; so does one whose cache
gives other ids than the plain encode on the probe texts or the first texts of the input (no model has so far).

The cache's keys are cut from the text by `str.split(" ")`, in C, with every newline first made " \\n" where newlines
start words (a regex's words and holding them were over half the time; see `keys`): each piece stands for " " + piece,
or for itself where it starts with a newline that the split put there (a text's one leading space joins the first
piece, which then starts with spaces and stands for itself). A text where this cut would split a run of
spaces (two spaces in a row after the newlines' spaces) is cut by the regex WORDS instead, whose words start with
their space or newline and stand for themselves (`text_of`): a key means the same whichever cut made it.
A key is encoded by sentencepiece as "a" + its text, whose ids start with those of "a" alone (checked): the text
" " at a text's end would be nothing alone, without a dummy prefix of its own.
"""

from __future__ import annotations

import multiprocessing
import re
from collections import deque
from itertools import chain, filterfalse

import numpy as np

from pretrain.data.folders import token_dtype
from pretrain.data.tokenizer import Tokenizer

SPACE = "\u2581"  # sentencepiece's whitespace symbol
# A piece that matches this never crosses the start of a word (a "▁" after another character).
PIECE = SPACE + "*[^" + SPACE + "]+|" + SPACE + "+"
WORDS = " +[^ ]*"  # the words of " " + text with "▁" made " "
WORDS_AND_LINES = " +[^ \n]*|\n+[^ \n]*"  # ... where newlines start words too
# Keys kept before the cache starts afresh: about 200 bytes each, so at most about 200 MB.
MAX_WORDS = 1 << 20
CONTEXT = "a"  # what every key's text is encoded after (see the module docstring)
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


def newlines_start_words(proto) -> bool:
    """Whether each newline starts a word: byte fallback on and no normal piece holding one (module docstring)."""
    return bool(proto.trainer_spec.byte_fallback) and not any(p.type == NORMAL and "\n" in p.piece
                                                             for p in proto.pieces)


class WordCacheEncoder:
    """sentencepiece's ids through a cache of its words' ids (see the module docstring); `threads` encode the
    words not seen yet. `encode_flat` gives one array of every text's ids and the texts' lengths, without a Python
    int per token; `encode_stream` spreads batches of texts over `threads` processes. `lines` (default: what the
    model allows, `newlines_start_words`) says whether newlines start words."""

    name = "sentencepiece"

    def __init__(self, tok: Tokenizer, proto, threads: int, lines: bool | None = None):
        self.tok, self.threads = tok, threads
        self.dtype = token_dtype(tok.vocab_size)
        self.context = tok.encode(CONTEXT)
        self.lines = newlines_start_words(proto) if lines is None else lines
        self.words = re.compile(WORDS_AND_LINES if self.lines else WORDS).findall
        self.eos = np.array([tok.eos_id], self.dtype).tobytes()
        self.cache: dict[str, bytes] = {}

    def keys(self, text: str) -> list[str]:
        """The cache keys of `text`, in order: one C split, or the regex where the split would cut a run of spaces.
        A key that starts with a space (or a newline, where newlines start words) stands for itself, any other for
        " " + key (`text_of`): the split's pieces lost the space before them, the regex's words kept theirs."""
        if SPACE in text:
            text = text.replace(SPACE, " ")
        cut = text.replace("\n", " \n") if self.lines else text
        if "  " in cut:
            return self.words(" " + text)
        keys = cut.split(" ") if text else []
        if text[:1] == " ":  # one leading space (WikiText's lines): it and the dummy prefix's make one run
            keys[0:2] = ["  " + keys[1]]
        return keys

    def text_of(self, key: str) -> str:
        """The text a key stands for (see `keys`)."""
        return key if key[:1] == " " or (self.lines and key[:1] == "\n") else " " + key

    def _learn(self, keys: list[list[str]]) -> None:
        """Encode and cache the keys of `keys` not in the cache yet."""
        new = set(filterfalse(self.cache.__contains__, chain.from_iterable(keys)))
        if len(self.cache) + len(new) > MAX_WORDS:  # start afresh: the keys of these texts are encoded again
            self.cache = {}
            new = set(chain.from_iterable(keys))
        new = list(new)
        rows = self.tok.encode_batch([CONTEXT + self.text_of(k) for k in new], num_threads=self.threads)
        # One array for all of them, then each key's bytes after its context's ids (no Python list per key).
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
        join, keys, rows, unseen = b"".join, self.keys, [], []
        end = self.eos if eos else b""
        get = self.cache.get  # a quarter faster than __getitem__; a new key gives None, which join refuses
        # A lookup per key, in C, each text's keys dropped at once (holding a batch's keys was a third slower) but
        # those of a text with a new key, which waits for _learn.
        for i, text in enumerate(texts):
            k = keys(text)
            try:
                rows.append(join(map(get, k)) + end)
            except TypeError:
                rows.append(end)
                unseen.append((i, k))
        if unseen:
            self._learn([k for _, k in unseen])
            get = self.cache.__getitem__
            for i, k in unseen:
                rows[i] = join(map(get, k)) + end
        lengths = np.fromiter(map(len, rows), np.int64, count=len(rows)) // self.dtype.itemsize
        return np.frombuffer(join(rows), self.dtype), lengths

    def encode(self, texts: list[str], eos: bool = False) -> list[list[int]]:
        flat, lengths = self.encode_flat(texts, eos)
        return [row.tolist() for row in np.split(flat, np.cumsum(lengths)[:-1])] if texts else []

    def encode_stream(self, batches, eos: bool = False, split=None):
        """`encode_flat` of each batch of texts, in order; with `split` (a module-level function: text -> documents)
        each text is first cut into documents, in the process that encodes them (`cut`). With more than one thread
        each batch goes whole to one of `threads` forked processes (each with its own cache, starting from this
        one's), at most `threads` + 1 batches in flight, so that reading the next batch overlaps encoding these (the
        cache's lookups hold the GIL)."""
        batches = iter(batches)
        first = next(batches, None)
        if first is None:  # no process started for nothing (a prepare of one batch never starts one)
            return
        if self.threads <= 1:
            for texts in chain([first], batches):
                yield self.encode_flat(cut(texts, split), eos)
            return
        # fork: the workers start with the tokenizer and the cache, no import, and nothing to pickle
        with multiprocessing.get_context("fork").Pool(self.threads, _start_worker, (self,)) as pool:
            pending = deque()
            for texts in chain([first], batches):
                pending.append(pool.apply_async(_encode_in_worker, (texts, eos, split)))
                if len(pending) > self.threads:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()


def cut(texts: list[str], split) -> list[str]:
    """The documents of `texts`: each text cut by `split`, or the texts themselves when `split` is None."""
    return texts if split is None else [doc for text in texts for doc in split(text)]


_worker: WordCacheEncoder | None = None  # the encoder of a process of `encode_stream`


def _start_worker(encoder: WordCacheEncoder) -> None:
    global _worker
    _worker = encoder
    _worker.threads = 1  # one process per core already


def _encode_in_worker(texts: list[str], eos: bool, split) -> tuple[np.ndarray, np.ndarray]:
    return _worker.encode_flat(cut(texts, split), eos)

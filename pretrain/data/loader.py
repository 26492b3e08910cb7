"""Deterministic, resumable loading of prepared token folders.

The training stream is an endless global order of samples. A sample is `seq_len + 1` consecutive tokens
(input and next-token labels); sample i of a split starts at token i * seq_len, so neighbours share one
token and no token is dropped. The global order is a seeded permutation of the sample indices per epoch
(reshuffled when the data is exhausted). At each micro-step the data-parallel ranks together take the next
`micro_batch_size * dp_size` positions of that order, rank r the r-th slice (Megatron's pretraining
sampler). `consumed_samples` counts global positions, so a resume continues at the exact next sample and
a resume with another dp_size (same global batch) sees the same samples per global step.

Blending several folders interleaves them smoothly by weight: the j-th sample of dataset d sits at time
(j + 1/2) / w_d and the global order is the merge of those times, so after any n samples each dataset has
w_d * n of them to within one, and position -> (dataset, sample) is computed directly, without replaying
the schedule. Each dataset walks its own seeded per-epoch permutation.

Validation (`validation_batches`) reads the first min(tokens // seq_len, len) positions of the unshuffled
order, dealt out over the data-parallel ranks like training micro-steps: one fixed set for every layout.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from pretrain.data.batches import IGNORE_INDEX, LMBatch
from pretrain.data.folders import read_meta
from pretrain.data.text_bytes import TokenBytes, token_bytes
from pretrain.errors import UserError


class TokenDataset:
    """One split of one prepared folder, cut into samples of `seq_len + 1` tokens."""

    def __init__(self, path: str, seq_len: int, split: str = "train"):
        if seq_len < 1:
            raise UserError(f"data.seq_len must be >= 1, got {seq_len}")
        self.path = str(Path(path).expanduser().absolute())
        self.meta = read_meta(self.path)
        if split not in self.meta["splits"]:
            raise UserError(f"data {self.path}: no split {split!r}; it has {', '.join(self.meta['splits'])}")
        self.split, self.seq_len = split, seq_len
        self.num_tokens = int(self.meta["splits"][split]["num_tokens"])
        self._tokens: np.ndarray | None = None
        self._perms: dict[tuple, np.ndarray] = {}
        check_seq_len(self, seq_len)

    @property
    def tokens(self) -> np.ndarray:
        """The split's flat token array, memory-mapped on first use."""
        if self._tokens is None:
            f = Path(self.path) / self.meta["splits"][self.split]["file"]
            dtype = np.dtype(self.meta["dtype"])
            # np.memmap cannot map an empty file.
            self._tokens = np.memmap(f, dtype=dtype, mode="r") if self.num_tokens else np.zeros(0, dtype)
        return self._tokens

    # Workers of a torch DataLoader re-open the file instead of pickling the mapped array.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None, "_perms": {}}

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def tokenizer_sha256(self) -> str | None:
        return self.meta["tokenizer"].get("sha256")

    @property
    def tokenizer_file(self) -> str | None:
        """The folder's copy of its tokenizer (None for arrays saved without one)."""
        name = self.meta["tokenizer"].get("file")
        return str(Path(self.path) / name) if name and self.tokenizer_sha256 else None

    def num_samples(self, seq_len: int | None = None) -> int:
        """How many samples of `seq_len` (default: this dataset's) the split holds."""
        return max(0, (self.num_tokens - 1) // (seq_len or self.seq_len))

    def __len__(self) -> int:
        return self.num_samples()

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample i: tokens[i * seq_len : i * seq_len + seq_len + 1]."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        return np.asarray(self.tokens[i * self.seq_len: i * self.seq_len + self.seq_len + 1], dtype=np.int64)

    def samples(self, positions: np.ndarray, seed: Sequence[int], shuffle: bool = True) -> np.ndarray:
        """The samples at `positions` of this dataset's order ([len, seq_len + 1] int64).

        Position p lies in epoch p // len; with `shuffle` it maps through that epoch's permutation, seeded by
        (*seed, epoch); without, position p is sample p % len.
        """
        positions = np.asarray(positions, dtype=np.int64)
        n = len(self)
        index = positions % n
        if shuffle:
            epochs = positions // n
            for epoch in np.unique(epochs):
                sel = epochs == epoch
                index[sel] = self._permutation(tuple(seed), int(epoch))[index[sel]]
        starts = index * self.seq_len
        return self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64)

    def _permutation(self, seed: tuple, epoch: int) -> np.ndarray:
        key = (*seed, epoch)
        if key not in self._perms:
            if len(self._perms) >= 2:  # current and next epoch are all a loader touches at once
                self._perms.pop(next(iter(self._perms)))
            rng = np.random.default_rng(np.random.SeedSequence([*seed, epoch]))
            perm = rng.permutation(len(self))
            # int32 halves what each rank holds (4 bytes a sample) whenever the indices fit.
            self._perms[key] = perm.astype(np.int32) if len(self) < 2**31 else perm
        return self._perms[key]

    def fingerprint(self) -> dict:
        """What identifies this dataset's sample order (stored in loader states)."""
        return {"sha256": self.tokenizer_sha256, "split": self.split, "tokens": self.num_tokens, "seq_len": self.seq_len}

    def __repr__(self) -> str:
        return f"TokenDataset({self.path!r}, seq_len={self.seq_len}, split={self.split!r}, samples={len(self)})"


class BlendedDataset:
    """Several TokenDatasets (one tokenizer, one seq_len) interleaved by weight."""

    # Weights become integers (exact comparisons at any position); 2**20 resolves them to about 1e-6.
    WEIGHT_SCALE = 1 << 20

    def __init__(self, datasets: Sequence[TokenDataset], weights: Sequence[float] | None = None):
        if not datasets:
            raise UserError("data: a blend needs at least one dataset")
        weights = list(weights) if weights is not None else [float(len(d)) for d in datasets]
        if len(weights) != len(datasets):
            raise UserError(f"data: {len(datasets)} datasets but {len(weights)} weights")
        if any(not (w > 0 and math.isfinite(w)) for w in weights):
            raise UserError(f"data: blend weights must be positive numbers, got {weights}")
        shas = {d.tokenizer_sha256 for d in datasets}
        if len(shas) > 1:
            names = ", ".join(f"{d.path} ({(d.tokenizer_sha256 or 'none')[:12]})" for d in datasets)
            raise UserError(
                f"data: blended datasets must share one tokenizer, but they differ: {names}; re-prepare them with one"
            )
        if len({d.seq_len for d in datasets}) > 1:
            raise UserError("data: blended datasets must share one seq_len")
        self.datasets = list(datasets)
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self._int_weights = [max(1, round(w * self.WEIGHT_SCALE)) for w in self.weights]
        self.seq_len = datasets[0].seq_len

    @property
    def vocab_size(self) -> int:
        return max(d.vocab_size for d in self.datasets)

    @property
    def tokenizer_sha256(self) -> str | None:
        return self.datasets[0].tokenizer_sha256

    @property
    def tokenizer_file(self) -> str | None:
        return self.datasets[0].tokenizer_file  # one tokenizer for all (checked above)

    def __len__(self) -> int:
        """Samples in one pass over every member (the natural size of a validation pass)."""
        return sum(len(d) for d in self.datasets)

    def locate(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset id, that dataset's own position) for global positions start .. start + count - 1."""
        W, S, D = self._int_weights, sum(self._int_weights), len(self._int_weights)
        # Element (d, j) sits at time (2j + 1) / (2 W_d); the global position is its rank by (time, d).
        # Fewer than `start` elements lie before t_lo and at least start + count before t_hi.
        t_lo = Fraction(max(0, start - D), S)
        t_hi = Fraction(start + count + D, S)
        below = [_count_before(w, t_lo) for w in W]
        window = sorted(
            (Fraction(2 * j + 1, 2 * w), d, j)
            for d, w in enumerate(W)
            for j in range(below[d], _count_before(w, t_hi))
        )
        chosen = window[start - sum(below): start - sum(below) + count]
        return np.array([d for _, d, _ in chosen], np.int64), np.array([j for _, _, j in chosen], np.int64)

    def samples(self, positions: np.ndarray, seed: Sequence[int], shuffle: bool = True) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions), self.seq_len + 1), np.int64)
        # Loaders ask for consecutive positions; locate them as one range.
        lo, hi = int(positions.min()), int(positions.max())
        ds_id, local = self.locate(lo, hi - lo + 1)
        ds_id, local = ds_id[positions - lo], local[positions - lo]
        for d, dataset in enumerate(self.datasets):
            sel = ds_id == d
            if sel.any():
                out[sel] = dataset.samples(local[sel], (*seed, d), shuffle)
        return out

    def fingerprint(self) -> dict:
        return {"blend": [d.fingerprint() for d in self.datasets], "weights": self._int_weights}

    def __repr__(self) -> str:
        return f"BlendedDataset({[d.path for d in self.datasets]}, weights={[round(w, 4) for w in self.weights]})"


def _count_before(w: int, t: Fraction) -> int:
    """#{j >= 0 : (2j + 1) / (2w) < t}."""
    return max(0, math.ceil(w * t - Fraction(1, 2)))


Dataset = TokenDataset | BlendedDataset


class DataLoader:
    """Endless micro-batches of (tokens, labels) for one data-parallel rank, resumable from `consumed_samples`."""

    def __init__(
        self,
        dataset: Dataset,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        consumed_samples: int = 0,
        shuffle: bool = True,
    ):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad loader shape: micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, dp_size={dp_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.dataset, self.micro_batch_size = dataset, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.consumed_samples = consumed_samples

    def positions(self) -> np.ndarray:
        """Global positions this rank reads at the next micro-step."""
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        return start + np.arange(self.micro_batch_size, dtype=np.int64)

    def __iter__(self) -> "DataLoader":
        return self

    token_weighted = False  # every micro-batch has micro_batch_size * seq_len labels (pretrain/data/batches.py)

    def __next__(self) -> LMBatch:
        batch = torch.from_numpy(self.dataset.samples(self.positions(), (self.seed,), self.shuffle))
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return LMBatch(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())

    def state_dict(self) -> dict:
        """What a checkpoint stores; `consumed_samples` is global, so it is the same on every rank."""
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "shuffle": self.shuffle,
                "fingerprint": _digest(self.dataset.fingerprint())}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue at `state["consumed_samples"]`; with `strict`, refuse a state saved for another order."""
        if strict:
            if state.get("seed", self.seed) != self.seed:
                raise UserError(
                    f"data: the checkpoint's loader used seed {state['seed']} but this run uses {self.seed}; "
                    "set the same data seed to resume the exact sample order"
                )
            if state.get("fingerprint", self.state_dict()["fingerprint"]) != self.state_dict()["fingerprint"]:
                raise UserError(
                    "data: the checkpoint was trained on other data (dataset, split, seq_len or blend weights "
                    "differ); use the same data to resume, or start the data order afresh"
                )
        self.consumed_samples = int(state["consumed_samples"])

    @property
    def samples_per_epoch(self) -> int:
        return len(self.dataset)


def unigram_cross_entropy(path: str) -> float:
    """Cross-entropy (nats/token) of a prepared folder's validation tokens under its training tokens' add-one-smoothed
    unigram distribution: the loss of the best context-free predictor, where a model that stopped learning settles."""
    train, val = TokenDataset(path, 1, "train"), TokenDataset(path, 1, "val")
    counts = np.bincount(train.tokens, minlength=train.vocab_size).astype(np.float64) + 1.0
    return float(-np.log(counts / counts.sum())[val.tokens].mean())


def validation_size(dataset: Dataset, tokens: int, what: str = "eval.tokens") -> int:
    """Samples in the validation set of token budget `tokens`: min(tokens // seq_len, samples in the split).

    `what` names the setting in the error raised when the budget is less than one sample."""
    if tokens < dataset.seq_len:
        raise UserError(
            f"{what}={tokens} is less than one validation sample of seq_len {dataset.seq_len} tokens; "
            f"set it to at least {dataset.seq_len}"
        )
    return min(tokens // dataset.seq_len, len(dataset))


class ValidationBatches:
    """One data-parallel rank's micro-batches of the validation set: the first `num_samples` positions of the
    dataset's fixed unshuffled order, dealt out as the training loader does (micro-step k, rank r: positions
    k * micro_batch_size * dp_size + r * micro_batch_size + [0, micro_batch_size)), so the ranks together
    hold each of them exactly once whatever micro_batch_size and dp_size are.

    Without `pad` the last micro-batch of a rank may be smaller, and a rank may have fewer micro-batches than
    rank 0 (or none). With `pad` (pipeline engines need equal shapes and counts) every rank has
    ceil(num_samples / (micro_batch_size * dp_size)) micro-batches of exactly micro_batch_size samples,
    filled up with token-0 samples whose labels are all IGNORE_INDEX. Read lazily: list-like, re-iterable.
    """

    def __init__(self, dataset: Dataset, num_samples: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, pad: bool = False):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad loader shape: micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, dp_size={dp_size}")
        if not 0 <= num_samples <= len(dataset):
            raise ValueError(f"num_samples={num_samples} out of range [0, {len(dataset)}]")
        self.dataset, self.num_samples, self.micro_batch_size = dataset, num_samples, micro_batch_size
        self.dp_rank, self.dp_size, self.pad = dp_rank, dp_size, pad
        self.seq_len = dataset.seq_len
        per_step = micro_batch_size * dp_size
        first = dp_rank * micro_batch_size  # this rank reads micro-batches from here on, one every per_step positions
        self._len = -(-num_samples // per_step) if pad else max(0, -(-(num_samples - first) // per_step))

    @property
    def num_tokens(self) -> int:
        """Label tokens of the whole set (all ranks): the denominator of the validation loss."""
        return self.num_samples * self.seq_len

    @functools.cached_property
    def token_bytes(self) -> TokenBytes | None:
        """The byte table of the set's tokenizer, which counts the text each micro-batch's targets cover (bits per
        byte: text_bytes.py); None when the data has no tokenizer."""
        return token_bytes(getattr(self.dataset, "tokenizer_file", None))

    def positions(self, k: int) -> np.ndarray:
        """Global positions of the real samples in this rank's micro-batch k (fewer than micro_batch_size at the end)."""
        start = k * self.micro_batch_size * self.dp_size + self.dp_rank * self.micro_batch_size
        return np.arange(start, min(start + self.micro_batch_size, self.num_samples), dtype=np.int64)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, k: int) -> LMBatch:
        if not 0 <= k < len(self):
            raise IndexError(f"validation micro-batch {k} out of range [0, {len(self)})")
        positions = self.positions(k)
        batch = np.zeros((self.micro_batch_size if self.pad else len(positions), self.seq_len + 1), np.int64)
        if len(positions):
            batch[: len(positions)] = self.dataset.samples(positions, (0,), shuffle=False)
        tokens, labels = torch.from_numpy(batch[:, :-1].copy()), torch.from_numpy(batch[:, 1:].copy())
        labels[len(positions):] = IGNORE_INDEX
        return LMBatch(tokens, labels)

    def __iter__(self) -> Iterator[LMBatch]:
        return (self[k] for k in range(len(self)))

    def __repr__(self) -> str:
        return (f"ValidationBatches({self.num_samples} samples of {self.dataset!r}, micro_batch_size="
                f"{self.micro_batch_size}, dp {self.dp_rank}/{self.dp_size}, pad={self.pad}, {len(self)} micro-batches)")


def validation_batches(
    dataset: Dataset, tokens: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, pad: bool = False,
    what: str = "eval.tokens",
) -> ValidationBatches:
    """This rank's share of the validation set of token budget `tokens` (see `validation_size`): the split's
    first min(tokens // seq_len, len(dataset)) samples in fixed unshuffled order (for a blend, the first
    positions of the unshuffled blended order), the same set for every micro_batch_size, dp_size and layout."""
    return ValidationBatches(dataset, validation_size(dataset, tokens, what), micro_batch_size, dp_rank, dp_size, pad)


def check_seq_len(dataset: TokenDataset, seq_len: int) -> None:
    """Raise a UserError when the split holds fewer tokens than one sample of `seq_len` needs."""
    if dataset.num_tokens == 0:
        hint = "prepare more text"
        if dataset.split == "val":
            hint = "prepare it with --val-fraction > 0 (and more than one document)"
        raise UserError(f"data {dataset.path}: the {dataset.split} split holds no tokens; {hint}")
    if dataset.num_samples(seq_len) == 0:
        raise UserError(
            f"data.seq_len={seq_len} is longer than the data: {dataset.path} [{dataset.split}] holds "
            f"{dataset.num_tokens} tokens and one sample needs seq_len + 1 = {seq_len + 1}; lower data.seq_len or "
            "prepare more text"
        )


def check_vocab(dataset_or_meta: Dataset | dict | str, model_vocab_size: int) -> None:
    """Raise a UserError when the data's tokenizer has more ids than the model's embedding."""
    if isinstance(dataset_or_meta, (str, Path)):
        dataset_or_meta = read_meta(dataset_or_meta)
    if isinstance(dataset_or_meta, dict):
        vocab, where = int(dataset_or_meta["vocab_size"]), dataset_or_meta.get("tokenizer", {}).get("path")
    else:
        vocab = dataset_or_meta.vocab_size
        where = getattr(dataset_or_meta, "path", None) or ", ".join(d.path for d in dataset_or_meta.datasets)
    if vocab > model_vocab_size:
        raise UserError(
            f"the tokenizer's vocab ({vocab}, data {where}) is larger than model.vocab_size={model_vocab_size}; "
            f"set model.vocab_size >= {vocab}, or prepare the data with a tokenizer of at most {model_vocab_size} tokens"
        )


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]

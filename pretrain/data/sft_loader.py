"""Training on SFT folders: examples pooled from folders, packed into rows, resumable loading, validation.

A sample is one row of `data.seq_len` positions (`SFTSamples`). With packing, each epoch shuffles the examples
(seeded by (train.seed, epoch)) and fills rows greedily in that order; positions restart at 0 for every example,
and `doc_ids` give each example of a row its own id, so attention never crosses an example boundary
(`models.llama.document_mask`). Without packing a row is one example, right-padded to the longest of its
micro-batch (to data.seq_len under pipeline parallelism); causal attention is then exact without a mask. Sample
positions are global and dealt out over micro-steps and data-parallel ranks like pretraining samples (`SFTLoader`,
loader.py's DataLoader), so a resume continues at the exact next row. Padding has label -100, never EOS. The loss
is token-weighted over the global batch (pretrain/train/loop.py). Validation (`SFTValidationBatches`): the val
split's examples packed the same way in file order; its first min(eval.tokens // seq_len, rows) rows.

The folders are sft_prepare.py's format.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from pretrain.data.batches import IGNORE_INDEX, pipeline_labels, trained_tokens
from pretrain.data.loader import DataLoader, ValidationBatches
from pretrain.data.sft_prepare import read_sft_meta
from pretrain.errors import UserError


class SFTDataset:
    """One split of one or more SFT folders (examples pooled in folder order): example i -> (tokens, mask)."""

    def __init__(self, paths: str | Sequence[str], split: str = "train"):
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        self.paths = [str(Path(p).expanduser().absolute()) for p in paths]
        self.split = split
        self.metas = [read_sft_meta(p) for p in self.paths]
        shas = {m["tokenizer"].get("sha256") for m in self.metas}
        if len(shas) > 1:
            raise UserError(f"data: the SFT folders {', '.join(self.paths)} use different tokenizers; prepare them "
                            "with one")
        self._parts = None
        counts = [m["splits"][split]["num_examples"] for m in self.metas]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.lengths = np.concatenate([np.diff(self._index(j)) for j in range(len(self.paths))]).astype(np.int64) \
            if self.paths else np.zeros(0, np.int64)

    def _index(self, j: int) -> np.ndarray:
        return np.fromfile(Path(self.paths[j]) / self.metas[j]["splits"][self.split]["index_file"], dtype=np.int64)

    @property
    def parts(self):
        if self._parts is None:  # memory-mapped on first use (workers re-open instead of pickling the maps)
            self._parts = []
            for j, (p, m) in enumerate(zip(self.paths, self.metas)):
                info = m["splits"][self.split]
                n = info["num_tokens"]
                tokens = np.memmap(Path(p) / info["file"], dtype=np.dtype(m["dtype"]), mode="r") if n else np.zeros(0, np.uint16)
                mask = np.memmap(Path(p) / info["mask_file"], dtype=np.uint8, mode="r") if n else np.zeros(0, np.uint8)
                self._parts.append((tokens, mask, self._index(j)))
        return self._parts

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_parts": None}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (int64) and trained-target mask (bool) of example i."""
        j = int(np.searchsorted(self.starts, i, side="right") - 1)
        tokens, mask, index = self.parts[j]
        a, b = index[i - self.starts[j]], index[i - self.starts[j] + 1]
        return np.asarray(tokens[a:b], np.int64), np.asarray(mask[a:b]).astype(bool)

    @property
    def vocab_size(self) -> int:
        return max(int(m["vocab_size"]) for m in self.metas)

    @property
    def tokenizer_sha256(self) -> str | None:
        return self.metas[0]["tokenizer"].get("sha256")

    @property
    def tokenizer_file(self) -> str | None:
        """The first folder's copy of the tokenizer (all share one)."""
        name = self.metas[0]["tokenizer"].get("file")
        return str(Path(self.paths[0]) / name) if name else None

    @property
    def trained_tokens(self) -> int:
        return sum(int(m["splits"][self.split]["num_trained_tokens"]) for m in self.metas)

    def fingerprint(self) -> dict:
        return {"sft": [{"sha256": m["tokenizer"].get("sha256"), "split": self.split,
                         "tokens": m["splits"][self.split]["num_tokens"],
                         "examples": m["splits"][self.split]["num_examples"]} for m in self.metas]}


class SFTBatch(NamedTuple):
    """A micro-batch of SFT rows: inputs and labels [B, T]; positions and doc_ids [B, T] for packed rows, None
    for padded ones (one example per row from position 0, plain causal attention)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None

    def model_kwargs(self, device=None) -> dict:
        """The keyword arguments of `Llama.forward` besides tokens and labels."""
        if self.positions is None:
            return {}
        return {"positions": self.positions.to(device), "doc_ids": self.doc_ids.to(device)}

    def trained_tokens(self) -> int:
        return trained_tokens(self.labels)

    def pipeline(self, scale: float | torch.Tensor | None = None) -> tuple:
        """The (inputs, labels) pair DeepSpeed's pipeline engine takes: inputs (tokens, labels) or (tokens,
        positions, doc_ids, labels); labels a tensor or, with `scale`, (labels, scale) for the token-weighted loss."""
        packing = () if self.positions is None else (self.positions, self.doc_ids)
        return (self.tokens, *packing, self.labels), pipeline_labels(self.labels, scale)


def pack_bounds(positions: np.ndarray, seq_len: int, packing: bool) -> np.ndarray:
    """Row boundaries over a sequence of examples needing `positions` each: greedy packing in order (a row is
    closed when the next example does not fit), or one example per row. Returns [0, ..., len(positions)]."""
    if not packing:
        return np.arange(len(positions) + 1, dtype=np.int64)
    bounds, used = [0], 0
    for i, n in enumerate(positions.tolist()):
        if used + n > seq_len:
            bounds.append(i)
            used = 0
        used += n
    bounds.append(len(positions))
    return np.array(bounds if len(positions) else [0], np.int64)


class SFTSamples:
    """Rows (samples) of `seq_len` positions built from an SFTDataset, by global position (see module docstring).

    `fixed_length`: unpacked rows are padded to seq_len (pipeline parallelism needs equal shapes) instead of the
    longest example of their micro-batch."""

    def __init__(self, dataset: SFTDataset, seq_len: int, packing: bool = True, fixed_length: bool = False):
        self.dataset, self.seq_len, self.packing, self.fixed_length = dataset, seq_len, packing, fixed_length
        if len(dataset) == 0:
            hint = ("prepare it with --val-fraction > 0 (and more than one example), or set eval.interval=0"
                    if dataset.split == "val" else "prepare more examples")
            raise UserError(f"data {', '.join(dataset.paths)}: the {dataset.split} split holds no examples; {hint}")
        self.positions = dataset.lengths - 1
        longest = int(self.positions.max())
        if longest > seq_len:
            raise UserError(
                f"data {', '.join(dataset.paths)}: its longest {dataset.split} example needs {longest} positions (tokens "
                f"- 1) but data.seq_len={seq_len}; raise data.seq_len to {longest}, or re-prepare with `pretrain data "
                f"prepare-sft ... --seq-len {seq_len} --overlong truncate` (or drop)"
            )
        self._order = np.arange(len(dataset), dtype=np.int64)
        self._fixed = pack_bounds(self.positions, seq_len, packing)  # unshuffled order (validation)
        self._epochs: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._counts: dict[tuple, list[int]] = {}

    def __len__(self) -> int:
        """Rows of one pass in file order (the validation set's size)."""
        return len(self._fixed) - 1

    def _epoch(self, seed: tuple, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        key = (*seed, epoch)
        if key not in self._epochs:
            if len(self._epochs) >= 2:
                self._epochs.pop(next(iter(self._epochs)))
            rng = np.random.default_rng(np.random.SeedSequence([*seed, epoch]))
            order = rng.permutation(len(self.dataset)).astype(np.int64)
            self._epochs[key] = order, pack_bounds(self.positions[order], self.seq_len, self.packing)
        return self._epochs[key]

    def _epoch_start(self, seed: tuple, position: int) -> tuple[int, int]:
        """(epoch, its first global position) of global `position` of the shuffled order."""
        counts = self._counts.setdefault(tuple(seed), [])
        start, epoch = 0, 0
        while True:
            if epoch == len(counts):
                counts.append(len(self._epoch(seed, epoch)[1]) - 1)
            if position < start + counts[epoch]:
                return epoch, start
            start += counts[epoch]
            epoch += 1

    def groups(self, positions: np.ndarray, seed: Sequence[int], shuffle: bool = True) -> list[np.ndarray]:
        """The example indices of the rows at global `positions`."""
        out = []
        for p in np.asarray(positions, np.int64).tolist():
            if shuffle:
                epoch, start = self._epoch_start(tuple(seed), p)
                order, bounds = self._epoch(tuple(seed), epoch)
                k = p - start
            else:
                order, bounds, k = self._order, self._fixed, p % len(self)
            out.append(order[bounds[k]:bounds[k + 1]])
        return out

    def rows(self, groups: list[np.ndarray], pad_rows: int = 0) -> SFTBatch:
        """The micro-batch holding `groups` (one row each), plus `pad_rows` fully ignored rows."""
        need = [int(self.positions[g].sum()) for g in groups]
        T = self.seq_len if self.packing or self.fixed_length else max(need, default=1)
        B = len(groups) + pad_rows
        tokens = np.zeros((B, T), np.int64)
        labels = np.full((B, T), IGNORE_INDEX, np.int64)
        positions = np.tile(np.arange(T, dtype=np.int64), (B, 1))
        doc_ids = np.zeros((B, T), np.int64)
        for r, group in enumerate(groups):
            t = 0
            for d, e in enumerate(group.tolist()):
                ids, mask = self.dataset.example(e)
                n = len(ids) - 1
                tokens[r, t:t + n] = ids[:-1]
                labels[r, t:t + n] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
                positions[r, t:t + n] = np.arange(n)
                doc_ids[r, t:t + n] = d
                t += n
            positions[r, t:] = np.arange(T - t)  # the padding block: an example of its own, no labels
            doc_ids[r, t:] = len(group)
        as_t = torch.from_numpy
        if not self.packing:
            return SFTBatch(as_t(tokens), as_t(labels))
        return SFTBatch(as_t(tokens), as_t(labels), as_t(positions), as_t(doc_ids))

    def batch(self, positions: np.ndarray, seed: Sequence[int], shuffle: bool = True) -> SFTBatch:
        return self.rows(self.groups(positions, seed, shuffle))

    @property
    def tokenizer_file(self) -> str | None:
        return self.dataset.tokenizer_file

    def fingerprint(self) -> dict:
        return {**self.dataset.fingerprint(), "seq_len": self.seq_len, "packing": self.packing}

    def __repr__(self) -> str:
        return (f"SFTSamples({self.dataset.paths}, split={self.dataset.split!r}, seq_len={self.seq_len}, "
                f"packing={self.packing}, {len(self.dataset)} examples, {len(self)} rows in file order)")


class SFTLoader(DataLoader):
    """Endless SFT micro-batches (`SFTBatch`) for one data-parallel rank, resumable from `consumed_samples` (rows);
    pretrain/train/loop.py gives their loss token-weighted over the global batch."""

    token_weighted = True

    def __next__(self) -> SFTBatch:
        batch = self.dataset.batch(self.positions(), (self.seed,), self.shuffle)
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return batch


class SFTValidationBatches(ValidationBatches):
    """ValidationBatches of SFT rows (`SFTSamples` in file order): the same dealing out over ranks and padding."""

    @property
    def num_tokens(self) -> int:
        """Trained label tokens of the whole set (all ranks): the denominator of the validation loss."""
        samples = self.dataset
        groups = samples.groups(np.arange(self.num_samples), (0,), shuffle=False)
        return sum(int(samples.dataset.example(e)[1][1:].sum()) for g in groups for e in g.tolist())

    def __getitem__(self, k: int) -> SFTBatch:
        if not 0 <= k < len(self):
            raise IndexError(f"validation micro-batch {k} out of range [0, {len(self)})")
        positions = self.positions(k)
        pad = self.micro_batch_size - len(positions) if self.pad else 0
        return self.dataset.rows(self.dataset.groups(positions, (0,), shuffle=False), pad_rows=pad)

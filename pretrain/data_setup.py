"""Glue between the experiment config and the data package: resolve paths, check them, build loaders."""

from __future__ import annotations

import torch.distributed as dist

from pretrain.config import ExperimentConfig
from pretrain.data.bundled import resolve_data_path
from pretrain.data.loader import BlendedDataset, DataLoader, TokenDataset, check_seq_len, check_vocab
from pretrain.distributed import Topology
from pretrain.evaluate import build_validation


def resolve_paths(cfg: ExperimentConfig, topo: Topology) -> list[str]:
    """Prepared folders for data.paths; a bundled corpus is prepared by local rank 0 while the others wait."""
    if topo.local_rank == 0:
        paths = [resolve_data_path(p, cfg.data.cache_dir) for p in cfg.data.paths]
    dist.barrier()
    if topo.local_rank != 0:
        paths = [resolve_data_path(p, cfg.data.cache_dir) for p in cfg.data.paths]
    return paths


def build_dataset(cfg: ExperimentConfig, paths: list[str], split: str):
    parts = [TokenDataset(p, cfg.data.seq_len, split) for p in paths]
    for part in parts:
        check_vocab(part, cfg.model.vocab_size)
        check_seq_len(part, cfg.data.seq_len)
    if len(parts) == 1 and cfg.data.weights is None:
        return parts[0]
    return BlendedDataset(parts, cfg.data.weights)


def build_loaders(cfg: ExperimentConfig, topo: Topology, consumed_samples: int):
    """(train iterator from `consumed_samples` on, validation micro-batches or None) for this DP rank.

    The validation set is the val split's first eval.tokens // data.seq_len samples (pretrain/evaluate.py)."""
    paths = resolve_paths(cfg, topo)
    train = DataLoader(
        build_dataset(cfg, paths, "train"), micro_batch_size=cfg.train.micro_batch_size, dp_rank=topo.dp_rank,
        dp_size=topo.dp, seed=cfg.train.seed, consumed_samples=consumed_samples,
    )
    val = None
    if cfg.eval.interval > 0:
        val = build_validation(
            build_dataset(cfg, paths, "val"), cfg.eval.tokens, cfg.train.micro_batch_size, topo,
            pipelined=cfg.parallel.pp > 1,
        )
    return train, val

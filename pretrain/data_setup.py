"""Glue between the experiment config and the data package: resolve paths, check them, build loaders."""

from __future__ import annotations

import torch.distributed as dist

from pretrain.config import ExperimentConfig
from pretrain.distributed import Topology


def resolve_paths(cfg: ExperimentConfig, topo: Topology) -> list[str]:
    """Prepared folders for data.paths; bundled corpora are prepared once per node (local rank 0 first)."""
    from pretrain.data.bundled import resolve_data_path

    if topo.local_rank == 0:
        paths = [resolve_data_path(p, cfg.data.cache_dir) for p in cfg.data.paths]
    dist.barrier()
    if topo.local_rank != 0:
        paths = [resolve_data_path(p, cfg.data.cache_dir) for p in cfg.data.paths]
    return paths


def build_dataset(cfg: ExperimentConfig, topo: Topology, split: str):
    from pretrain.data.loader import BlendedDataset, TokenDataset, check_seq_len, check_vocab

    paths = resolve_paths(cfg, topo)
    parts = [TokenDataset(p, split, cfg.data.seq_len) for p in paths]
    for part in parts:
        check_vocab(part, cfg.model.vocab_size)
        check_seq_len(part, cfg.data.seq_len)
    if len(parts) == 1:
        return parts[0]
    return BlendedDataset(parts, cfg.data.weights, seed=cfg.train.seed)


def build_train_loader(cfg: ExperimentConfig, topo: Topology, consumed_samples: int):
    """Iterator of (tokens, labels) micro-batches for this data-parallel rank, from `consumed_samples` on."""
    from pretrain.data.loader import PretrainLoader

    return iter(PretrainLoader(
        build_dataset(cfg, topo, "train"), micro_batch_size=cfg.train.micro_batch_size, dp_rank=topo.dp_rank,
        dp_size=topo.dp, seed=cfg.train.seed, consumed_samples=consumed_samples,
    ))


def build_val_batches(cfg: ExperimentConfig, topo: Topology) -> list:
    """The first eval.batches micro-batches of this rank's share of the validation split (fixed order)."""
    from pretrain.data.loader import validation_batches

    return validation_batches(
        build_dataset(cfg, topo, "val"), micro_batch_size=cfg.train.micro_batch_size, dp_rank=topo.dp_rank,
        dp_size=topo.dp, num_batches=cfg.eval.batches,
    )

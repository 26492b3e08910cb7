"""Glue between the experiment config and the data package: resolve paths, check them, build loaders."""

from __future__ import annotations

import torch.distributed as dist

from pretrain.config import ExperimentConfig
from pretrain.data.loader import BlendedDataset, DataLoader, TokenDataset, check_seq_len, check_vocab, validation_size
from pretrain.data.resolve import resolve_data_path
from pretrain.data.sft_loader import SFTDataset, SFTLoader, SFTSamples, SFTValidationBatches
from pretrain.data.sft_prepare import folder_kind, read_sft_meta
from pretrain.errors import UserError
from pretrain.train.distributed import Topology
from pretrain.train.evaluate import build_validation


def resolve_paths(cfg: ExperimentConfig, topo: Topology) -> list[str]:
    """Prepared folders for data.paths; a bundled corpus (or bundled instruction set) is prepared by local rank 0
    while the others wait."""
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

    The validation set is the val split's first eval.tokens // data.seq_len samples (pretrain/train/evaluate.py).
    SFT folders (`pretrain data prepare-sft`) give SFT loaders instead (`build_sft_loaders`)."""
    paths = resolve_paths(cfg, topo)
    if is_sft(paths):
        return build_sft_loaders(cfg, topo, paths, consumed_samples)
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


def is_sft(paths: list[str]) -> bool:
    """Whether the prepared folders are SFT folders; a mix of SFT and pretraining folders is refused."""
    kinds = {p: folder_kind(p) for p in paths}
    if len(set(kinds.values())) > 1:
        sft = [p for p, k in kinds.items() if k == "sft"]
        raise UserError(f"data.paths mixes SFT folders ({', '.join(sft)}) with pretraining folders; train on one kind "
                        "at a time (pretrain first, then continue with train.init_from)")
    return "sft" in kinds.values()


def build_sft_loaders(cfg: ExperimentConfig, topo: Topology, paths: list[str], consumed_samples: int):
    """(SFT train loader from `consumed_samples` rows on, SFT validation micro-batches or None) for this DP rank.

    Several SFT folders are pooled into one set of examples; rows are packed (data.sft_packing) or padded, to
    data.seq_len under pipeline parallelism, which needs equal shapes (pretrain/data/sft_loader.py)."""
    if cfg.data.weights is not None:
        raise UserError("data.weights: SFT folders are pooled, not blended; leave data.weights null")
    for p in paths:
        check_vocab(read_sft_meta(p), cfg.model.vocab_size)
    fixed = cfg.parallel.pp > 1

    def samples(split: str) -> SFTSamples:
        return SFTSamples(SFTDataset(paths, split), cfg.data.seq_len, cfg.data.sft_packing, fixed_length=fixed)

    train = SFTLoader(samples("train"), micro_batch_size=cfg.train.micro_batch_size, dp_rank=topo.dp_rank,
                      dp_size=topo.dp, seed=cfg.train.seed, consumed_samples=consumed_samples)
    val = None
    if cfg.eval.interval > 0:
        val_samples = samples("val")
        val = SFTValidationBatches(val_samples, validation_size(val_samples, cfg.eval.tokens),
                                   cfg.train.micro_batch_size, topo.dp_rank, topo.dp, pad=fixed)
    return train, val

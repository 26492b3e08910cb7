"""The validation micro-batches an analysis of a model runs on (`pretrain analyze-depth`, `pretrain attribute`).

--seq-len and --micro-batch-size default to the source's run settings (data.seq_len, train.micro_batch_size); an HF
directory has no run, so it gets the config defaults, seq_len clipped to the model's positions.
"""

from __future__ import annotations

from pretrain.config import ExperimentConfig
from pretrain.data.loader import TokenDataset, check_vocab, validation_batches
from pretrain.data.resolve import resolve_data_path
from pretrain.errors import UserError
from pretrain.state.sources import ModelSource


def analysis_batches(source: ModelSource, data: str, num_batches: int, micro_batch_size: int | None = None,
                     seq_len: int | None = None, split: str = "val") -> tuple[dict, list]:
    """(the settings JSON outputs record: data, split, micro_batch_size, seq_len; the first `num_batches`
    validation micro-batches of `split` of `data`); None settings come from the source's run."""
    if num_batches < 1:
        raise UserError(f"--batches must be >= 1, got {num_batches}")
    model = source.model_config
    run = source.run_config or ExperimentConfig()  # an HF directory: the config defaults
    seq_len = seq_len or (run.data.seq_len if source.run_config else min(run.data.seq_len, model.max_seq_len))
    if not 1 <= seq_len <= model.max_seq_len:
        raise UserError(f"--seq-len {seq_len} must be between 1 and the model's max_seq_len {model.max_seq_len}")
    micro = micro_batch_size or run.train.micro_batch_size
    if micro < 1:
        raise UserError(f"--micro-batch-size must be >= 1, got {micro}")
    path, batches = load_batches(data, run.data.cache_dir, model.vocab_size, seq_len, micro, num_batches, split)
    return {"data": path, "split": split, "micro_batch_size": micro, "seq_len": seq_len}, batches


def load_batches(data: str, cache_dir: str | None, vocab_size: int, seq_len: int, micro_batch_size: int,
                 num_batches: int, split: str) -> tuple[str, list]:
    """(the data folder, the first `num_batches` validation micro-batches of `split`) of `data`."""
    path = resolve_data_path(data, cache_dir)
    dataset = TokenDataset(path, seq_len, split)
    check_vocab(dataset, vocab_size)
    return path, list(validation_batches(dataset, num_batches * micro_batch_size * seq_len, micro_batch_size))

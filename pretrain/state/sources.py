"""Where a run's model comes from besides its own config: a checkpoint it resumes, or `train.init_from`.

`resolve_model(cfg)` fills the model keys the config does not give (`ExperimentConfig.given_keys`): from the checkpoint a
resume continues (so a run keeps its model when defaults change), else from the `train.init_from` source, a
training checkpoint of any TP/PP layout or a Hugging Face Llama directory. A key the config gives that changes a
weight's shape must agree with the source: a one-line error otherwise. `load_weights` reads the source's full
(TP = 1) weights; pretrain/state/reshard.py `apply_weights` puts each rank's shard into the engine.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from models.config import ModelConfig
from pretrain.config import ExperimentConfig, load_config
from pretrain.errors import UserError

# Keys whose change changes a weight's shape (or the set of weights): they must agree with the source.
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "tie_embeddings")


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "trainer_state.json"))


def source_folder(path: str) -> str:
    """The checkpoint folder (or HF directory) `train.init_from` names; a one-line error when there is none."""
    from pretrain.state import checkpoint

    if not os.path.exists(path):
        raise UserError(f"train.init_from: {path} does not exist; give a run folder, a checkpoint folder or a "
                        "Hugging Face Llama directory")
    if is_hf_dir(path):
        return path
    folder = checkpoint.find_checkpoint(path)
    if not os.path.isfile(os.path.join(folder, checkpoint.STATE_FILE)):
        raise UserError(f"train.init_from: {path} is neither a complete training checkpoint (no "
                        f"{checkpoint.STATE_FILE}) nor a Hugging Face directory (no config.json)")
    return folder


def source_model_config(folder: str, norm_scheme: str) -> ModelConfig:
    if is_hf_dir(folder):
        import json

        from models.hf import from_hf_config

        with open(os.path.join(folder, "config.json")) as f:
            try:
                return from_hf_config(json.load(f), norm_scheme=norm_scheme)
            except ValueError as e:
                raise UserError(f"train.init_from {folder}: {e}") from None
    return load_config(os.path.join(folder, "config.yaml"), stored=True).model


def resolve_model(cfg: ExperimentConfig, resume_folder: str | None) -> ExperimentConfig:
    """`cfg` with the model keys it does not give taken from the resumed checkpoint or the init_from source."""
    if resume_folder is not None:
        source, what = load_config(os.path.join(resume_folder, "config.yaml"), stored=True).model, None
    elif cfg.train.init_from is not None:
        folder = source_folder(cfg.train.init_from)
        scheme = cfg.model.norm_scheme if "model.norm_scheme" in cfg.given_keys else "pre_ln"
        source, what = source_model_config(folder, scheme), f"train.init_from {cfg.train.init_from}"
    else:
        return cfg
    given = cfg.given_keys
    values = {}
    conflicts = []
    for f in dataclasses.fields(ModelConfig):
        ours, theirs = getattr(cfg.model, f.name), getattr(source, f.name)
        if f"model.{f.name}" not in given:
            values[f.name] = theirs
            continue
        values[f.name] = ours
        if what and f.name in SHAPE_KEYS and ours != theirs:
            conflicts.append(f"model.{f.name}={ours} (source: {theirs})")
    if conflicts:
        raise UserError(f"{what}: the config's weight shapes differ from the source's: {', '.join(conflicts)}; drop "
                        "these keys from the config to take the source's values")
    try:
        resolved = dataclasses.replace(cfg, model=ModelConfig(**values))
    except ValueError as e:
        raise UserError(str(e)) from None
    return resolved


def load_weights(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    """The full (TP = 1) fp32 weights of `train.init_from`, checked against the model `cfg` builds."""
    from models import Llama
    from models.hf import load_hf_state
    from pretrain.state.checkpoint import load_model_state

    folder = source_folder(cfg.train.init_from)
    if is_hf_dir(folder):
        try:
            _, weights = load_hf_state(folder, norm_scheme=cfg.model.norm_scheme)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(f"train.init_from {folder}: {e}") from None
    else:
        _, weights = load_model_state(folder)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Llama(cfg.model).named_parameters()}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected) - {"head.weight"})
    if missing or extra:
        raise UserError(
            f"train.init_from {folder}: its weights do not fit model.norm_scheme={cfg.model.norm_scheme}"
            + (f"; missing {', '.join(missing[:4])}" if missing else "")
            + (f"; not in this model {', '.join(extra[:4])}" if extra else "")
            + "; use a source trained with a scheme that has the same parameters"
        )
    for k, shape in expected.items():
        if weights[k].shape != shape:
            raise UserError(f"train.init_from {folder}: {k} has shape {tuple(weights[k].shape)} in the source but "
                            f"{tuple(shape)} in this model")
    return {k: weights[k].float() for k in expected}

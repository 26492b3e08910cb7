"""Hugging Face directories: writing one's files, reading one (safetensors, sharded or not, or a .bin) into our state
dict and model.

`save_hf` writes the files only; publishing a folder all-or-nothing is pretrain/files.py's `atomic_folder`, which
`pretrain export-hf` wraps around it (models/ imports nothing of pretrain, so the one atomic write lives there)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from models.config import ModelConfig
from models.hf.convert import from_hf_state_dict, to_hf_config, to_hf_state_dict
from models.llama import Llama

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"


def save_hf(
    cfg: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    **config_overrides: Any,
) -> Path:
    """Write a `from_pretrained`-loadable directory (Llama, Qwen3 or OLMo 2 by scheme): config.json +
    model.safetensors, into `out_dir` (made if absent; an existing non-empty one is refused with FileExistsError).

    A refusal to convert (ValueError) comes before anything is written. The files are written in place: a caller
    that must never leave a half-written export writes into `pretrain.files.atomic_folder`'s temporary folder (as
    `pretrain export-hf` does, adding the tokenizer files there). `config_overrides` go to `to_hf_config` (e.g.
    bos_token_id, eos_token_id).
    """
    from safetensors.torch import save_file  # with transformers: only HF conversions need it

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or remove it")
    hf_sd = to_hf_state_dict(cfg, state_dict)  # before touching the disk: refusals leave nothing behind
    dtypes = {t.dtype for t in hf_sd.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    hf_cfg = to_hf_config(cfg, dtype=dtype, **config_overrides)

    out.mkdir(parents=True, exist_ok=True)
    hf_cfg.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(out / SAFETENSORS_NAME), metadata={"format": "pt"})
    _mode_open_gives(out / SAFETENSORS_NAME)
    return out


def _mode_open_gives(path: Path) -> None:
    """safetensors 0.8's writer creates its file private (0600, through a temporary file) whatever the umask; give it
    the mode `open()` would (0644 under umask 022), so that colleagues on a shared cluster can read an export."""
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # with transformers: only HF conversions need it

    if (path / SAFETENSORS_NAME).is_file():
        return load_file(str(path / SAFETENSORS_NAME))
    if (path / SAFETENSORS_INDEX_NAME).is_file():
        index = json.loads((path / SAFETENSORS_INDEX_NAME).read_text())
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            sd.update(load_file(str(path / shard)))
        return sd
    if (path / BIN_NAME).is_file():
        return torch.load(path / BIN_NAME, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME} or {BIN_NAME} found")


def load_hf_state(path: str | os.PathLike,
                  norm_scheme: str | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """An HF Llama, Qwen3 or OLMo 2 directory (config.json + weights) -> our (ModelConfig, full state dict);
    `norm_scheme` as `from_hf_config` (None: by model_type)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a transformers model directory)")
    hf_config = json.loads(config_file.read_text())
    return from_hf_state_dict(hf_config, _read_hf_weights(path), norm_scheme=norm_scheme)


def load_hf(path: str | os.PathLike, norm_scheme: str | None = None) -> Llama:
    """An HF Llama, Qwen3 or OLMo 2 directory -> our `Llama` (TP = 1, fp32, on CPU)."""
    cfg, sd = load_hf_state(path, norm_scheme=norm_scheme)
    return Llama.from_state_dict(cfg, sd)

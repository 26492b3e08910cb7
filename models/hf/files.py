"""Hugging Face directories: writing one all-or-nothing, reading one (safetensors, sharded or not, or a .bin) into our
state dict and model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from models.config import ModelConfig
from models.hf.common import build
from models.hf.convert import from_hf_state_dict, to_hf_config, to_hf_state_dict
from models.llama import Llama

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"


def save_hf(
    cfg: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    write_extra: Callable[[Path], None] | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a `from_pretrained`-loadable directory (Llama, Qwen3 or OLMo 2 by scheme): config.json +
    model.safetensors.

    Written into a temporary sibling directory and renamed into place, so a failure leaves no half-written
    `out_dir`. An existing non-empty `out_dir` is refused (FileExistsError) unless `overwrite`.
    `config_overrides` go to `to_hf_config` (e.g. bos_token_id, eos_token_id). `write_extra(tmp_dir)` adds files
    (tokenizer, generation config) to the directory before it is renamed into place, so they are part of the same
    all-or-nothing write.
    """
    from safetensors.torch import save_file  # with transformers: only HF conversions need it

    out = Path(out_dir)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or remove it")
    hf_sd = to_hf_state_dict(cfg, state_dict)  # before touching the disk: refusals leave nothing behind
    dtypes = {t.dtype for t in hf_sd.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    hf_cfg = to_hf_config(cfg, dtype=dtype, **config_overrides)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        hf_cfg.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        if write_extra is not None:
            write_extra(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    """Move `src` to `dst`; an existing `dst` is swapped out first and removed only after the move."""
    if not dst.exists():
        os.replace(src, dst)
        return
    if dst.is_dir() and not any(dst.iterdir()):
        dst.rmdir()
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    old.rmdir()
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old) if old.is_dir() else old.unlink()


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
    return build(cfg, sd)

"""Model math: a Llama-like decoder whose normalization scheme is one config switch."""

from models.config import PRESETS, ModelConfig

__all__ = ["PRESETS", "ModelConfig", "Llama"]


def __getattr__(name: str):
    # The model (torch) loads on first use: the config and the scheme table stay importable without torch, so
    # config validation and `pretrain --help` answer at once.
    if name == "Llama":
        from models.llama import Llama  # torch: on first use
        return Llama
    raise AttributeError(f"module 'models' has no attribute {name!r}")

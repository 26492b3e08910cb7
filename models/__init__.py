"""Model math: a Llama-like decoder whose normalization scheme is one config switch."""

from models.config import PRESETS, ModelConfig
from models.llama import Llama

__all__ = ["PRESETS", "ModelConfig", "Llama"]

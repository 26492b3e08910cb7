"""MFU is right: FLOPs per token pinned to a hand count, the head counted when tied, GPU peaks told apart."""

from __future__ import annotations

import pytest
import torch

from models import ModelConfig
from models.llama import Llama
from pretrain.train.metrics import peak_flops_for


def _flops(preset: str, seq_len: int = 256, **overrides) -> float:
    with torch.device("meta"):
        return Llama(ModelConfig.from_preset(preset, **overrides)).flops_per_token(seq_len)


def test_flops_per_token_of_130m_by_hand():
    d, layers, ffn, vocab, heads, head_dim, seq = 768, 12, 2048, 32000, 12, 64, 256
    qkv = d * 3 * heads * head_dim  # 12 query + 12 key + 12 value heads of 64
    per_block = qkv + d * d + 2 * d * ffn + ffn * d  # qkv, o, gate + up, down
    matmul = layers * per_block + vocab * d  # + the head
    assert matmul == 109_510_656
    assert _flops("130m") == 6 * matmul + 12 * layers * d * seq == 685_375_488


def test_tied_head_is_a_matmul_too():
    assert _flops("130m", tie_embeddings=True) == _flops("130m")
    assert _flops("tiny", tie_embeddings=True) == _flops("tiny")


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA A10", 125e12), ("Tesla T4", None),
])
def test_gpu_peaks(name, peak):
    assert peak_flops_for(name) == peak

"""A stock RMSNorm made linear, so that a norm-free (`ln_free`) model runs in a class that has norms.

With eps >> mean(x^2), x / sqrt(mean(x^2) + eps) * w = x * w / sqrt(eps) * (1 - mean(x^2) / (2 eps) + ...), so the
gain w = sqrt(eps) gives the identity up to a relative error of mean(x^2) / (2 eps) (the LN-removal authors' trick for
their GPT-2 releases). eps = 2^40 is a power of 4, so sqrt(eps) = 2^20 and 1/sqrt(eps) are exact in fp32 and bf16 and
multiplying by them is exact. Moreover mean(x^2) + 2^40 rounds to exactly 2^40 in fp32 (where transformers computes the
statistic, for bf16 inputs too) whenever mean(x^2) < 2^16 (half an fp32 ulp of 2^40): below that the norm is the
identity bit for bit, above it the error stays under mean(x^2) / 2^41, below 1e-5 up to mean(x^2) = 2.2e7. Trained
`ln_free` models here have per-token mean squares of order 1 to 100 (tests/models/test_hf_parity.py measures them). fp16 is
not supported: 2^20 overflows it.
"""

from __future__ import annotations

import math

import torch

LINEAR_EPS = 2.0**40
LINEAR_GAIN = 2.0**20  # sqrt(LINEAR_EPS), exact
# rms_norm_eps from which an imported Llama is read as linearized norms (ln_free): no trained norm uses an eps anywhere
# near this, and a norm with it is linear to 1e-5 for mean squares up to 2e7 * eps / 2^40.
LINEAR_EPS_MIN = 2.0**30

assert math.sqrt(LINEAR_EPS) == LINEAR_GAIN


def relative_error_bound(mean_square: float, eps: float = LINEAR_EPS) -> float:
    """The linear norm's relative deviation from the identity for a token of this mean(x^2) (first order)."""
    return mean_square / (2.0 * eps)


def is_linear_eps(eps: float) -> bool:
    return eps >= LINEAR_EPS_MIN


def linear_gain(dim: int, dtype: torch.dtype, eps: float = LINEAR_EPS) -> torch.Tensor:
    return torch.full((dim,), math.sqrt(eps), dtype=dtype)

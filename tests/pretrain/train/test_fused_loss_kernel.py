"""Which kernel computes train.fused_loss on a GPU (pretrain/train/engine.py): Liger's only after a check on the
device gives our loss and gradient, and the run's log line says which and why. Liger's kernel is CUDA-only, so the
check runs here on the CPU against stand-ins; tests/test_cuda.py runs the real kernel."""

from __future__ import annotations

import torch

import pretrain.train.engine as engine
from models.parallel import cross_entropy

CPU = torch.device("cpu")


def plain(x, weight, labels, reduction="mean"):
    return cross_entropy(torch.nn.functional.linear(x, weight), labels, None, reduction=reduction)


def test_the_probe_passes_a_kernel_that_gives_our_loss(monkeypatch):
    monkeypatch.setattr(engine, "liger_cross_entropy", plain)
    assert engine.liger_probe(CPU) is None


def test_the_probe_refuses_a_kernel_that_fails_or_differs(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed\nlong Triton trace")

    monkeypatch.setattr(engine, "liger_cross_entropy", broken)
    assert engine.liger_probe(CPU) == "it failed on a check: RuntimeError: PassManager::run failed"
    monkeypatch.setattr(engine, "liger_cross_entropy", lambda *a, **k: plain(*a, **k) * 1.01)
    assert "differs from ours" in engine.liger_probe(CPU)


def test_the_log_line_says_which_kernel_and_why():
    line = engine.fused_loss_line
    assert line({"liger"}, True) == "train.fused_loss: Liger's fused linear cross-entropy (liger-kernel)"
    assert "liger-kernel is not installed" in line({"chunked"}, False)
    assert "vocab-parallel or scaled head" in line({"chunked"}, True)
    assert "installed but it failed on a check: X" in line({"chunked"}, False, "it failed on a check: X")
    assert line(set(), True) is None  # a pipeline stage without the head says nothing

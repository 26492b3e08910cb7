"""`pretrain bench` runs the real engine and prints a row per preset (GPU figures: docs/PERFORMANCE.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers.train import REPO, train_env

pytestmark = pytest.mark.processes  # starts subprocesses, ranks or training runs (tests/conftest.py: tiers)


def test_bench_prints_a_row_with_and_without_diagnostics(data_cache):
    """The second run also goes past the preset's model.max_seq_len (1,024): bench sizes the RoPE tables for it."""
    for interval, seq_len, micro in (("0", "64", "4"), ("1", "1100", "1")):
        proc = subprocess.run(
            [sys.executable, "-m", "pretrain", "bench", "--presets", "tiny", "--steps", "2", "--seq-len", seq_len,
             "--micro-batch-size", micro, "--diagnostics-interval", interval],
            cwd=REPO, env=train_env(data_cache), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        row = [line for line in proc.stdout.splitlines() if line.startswith("tiny")]
        assert len(row) == 1 and float(row[0].split()[3].replace(",", "")) > 0  # tokens/s
        assert f"diagnostics every {'never' if interval == '0' else 1}" in proc.stdout


def test_bench_refuses_a_negative_interval(data_cache):
    proc = subprocess.run([sys.executable, "-m", "pretrain", "bench", "--presets", "tiny", "--diagnostics-interval",
                           "-1"], cwd=REPO, env=train_env(data_cache), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --diagnostics-interval")

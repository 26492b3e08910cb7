"""Pretraining framework for normalization research: training, data, diagnostics, launch glue."""

__version__ = "0.1.0"

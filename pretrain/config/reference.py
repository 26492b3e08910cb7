"""The docs' generated config tables (docs/configuration.md, docs/schemes.md): every key with its default and
meaning, which composable model keys and which parametrizations each norm scheme takes, and the training settings a
scheme brings (`pretrain config --docs`)."""

from __future__ import annotations

import dataclasses
import typing

import yaml

from models.config import PRESETS, ModelConfig
from models.norms import NORM_SCHEMES, OPTIONS, refusal_reason
from models.parametrization import PARAMETRIZATIONS
from models.parametrization import REFUSED as PARAMETRIZATION_REFUSED
from pretrain.config.sections import SECTIONS, ExperimentConfig


def composition_reference() -> str:
    """Markdown table: which composable model keys (models/norms.py `OPTIONS`) each norm scheme takes, and why one
    refuses a key where the table says so."""
    keys = list(OPTIONS)
    rows = ["| scheme | " + " | ".join(f"`model.{k}`" for k in keys) + " |", "| --- |" + " --- |" * len(keys)]
    for name, scheme in NORM_SCHEMES.items():
        cells = ["yes" if k in scheme.options else f"refused: {refusal_reason(name, k)}" for k in keys]
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def parametrization_reference() -> str:
    """Markdown table: which model.parametrization each norm scheme takes (models/parametrization.py `REFUSED`, the
    one-line error's reason where it refuses)."""
    values = PARAMETRIZATIONS[1:]  # standard: every scheme
    rows = ["| scheme | " + " | ".join(f"`{v}`" for v in values) + " |", "| --- |" + " --- |" * len(values)]
    for name in NORM_SCHEMES:
        cells = []
        for value in values:
            reason = PARAMETRIZATION_REFUSED.get((name, value))
            if reason is None and (name, value) == ("ln_free", "completep"):
                reason = "with `model.ln_free_base_depth=0` only (its own depth multipliers otherwise count depth twice)"
                cells.append(f"yes, {reason}")
                continue
            cells.append("yes" if reason is None else f"refused: {reason}")
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def scheme_defaults_reference() -> str:
    """Markdown table: the training settings each scheme's paper fixes (its entry's `train_defaults`), applied where
    the config does not choose them, at every preset's width."""
    rows = ["| scheme | preset | its own training settings |", "| --- | --- | --- |"]
    for name, scheme in NORM_SCHEMES.items():
        for preset, shape in PRESETS.items():
            settings = scheme.train_defaults(ModelConfig(**{**shape, "norm_scheme": name, "tie_embeddings": False}))
            if settings:
                rows.append(f"| `{name}` | {preset} | " + ", ".join(f"`{k}={v}`" for k, v in settings.items()) + " |")
    return "\n".join(rows)


def config_reference() -> str:
    """Markdown table of every config key, its default and its documentation."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section, section_type in typing.get_type_hints(ExperimentConfig).items():
        if section not in SECTIONS:
            continue
        if section == "deepspeed":
            f = next(f for f in dataclasses.fields(ExperimentConfig) if f.name == "deepspeed")
            rows.append(f"| `deepspeed` | `{{}}` | {f.metadata['help']} |")
            continue
        for f in dataclasses.fields(section_type):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append(f"| `{section}.{f.name}` | `{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}` | {f.metadata['help']} |")
    return "\n".join(rows)

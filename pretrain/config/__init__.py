"""Experiment configuration: typed dataclasses loaded from YAML with dotted command-line overrides.

    cfg = load_config("configs/tiny.yaml", ["model.norm_scheme=lns", "train.lr=3e-4"])

Unknown keys, wrong types and bad values raise `UserError` with one line naming the key and the valid
choices. Every field is documented once, in its `doc(...)` help string; `pretrain config --docs` and the
key reference of docs/configuration.md are generated from those strings.

    sections.py     the sections (dataclasses) and their validation
    loading.py      YAML and overrides in, YAML out (`load_config`, `save_config`)
    reference.py    the docs' generated tables (docs/configuration.md, docs/schemes.md)
"""

from pretrain.config.loading import dump_yaml, load_config, save_config, to_dict
from pretrain.config.reference import (composition_reference, config_reference, parametrization_reference,
                                       scheme_defaults_reference)
from pretrain.config.sections import ExperimentConfig, RemovalConfig, RunConfig

__all__ = ["ExperimentConfig", "RemovalConfig", "RunConfig", "load_config", "save_config", "dump_yaml", "to_dict",
           "config_reference", "composition_reference", "scheme_defaults_reference",
           "parametrization_reference"]

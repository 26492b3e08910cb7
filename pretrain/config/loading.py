"""Reading and writing the experiment config: YAML plus dotted command-line overrides, keys of earlier versions,
presets, the scheme's paper-fixed training settings, and type checks with one-line errors naming the key."""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from typing import Any

import yaml

from models.config import PRESETS, ModelConfig, check_choices, literal_choices
from models.norms import NORM_SCHEMES
from pretrain.config.sections import SECTIONS, ExperimentConfig, LoggingConfig, sections
from pretrain.errors import UserError
from pretrain.files import atomic_write


# Keys earlier versions had: a user's file naming one gets the fix; a config stored in an old checkpoint loads.
REMOVED_KEYS = {
    "eval.batches": "the validation set is a token budget now: use eval.tokens (the same samples on every layout)",
}


MODEL_DEFAULT_SCHEME = ModelConfig.norm_scheme  # the scheme of a config file that names none (the field's default)


# Keys added later whose new default would change what a config stored before them describes: such a stored
# config (a run's or a checkpoint's) without the key gets the value that keeps its old meaning.
LEGACY_DEFAULTS = {
    "model.ln_free_base_depth": 0,  # ln_free before its depth-muP multipliers: plain x + F(x)
}


def load_config(path: str | None = None, overrides: list[str] = (), stored: bool = False,
                values: dict[str, Any] | None = None) -> ExperimentConfig:
    """The experiment in YAML file `path` (None: all defaults) with `values` ({dotted key: value}, set as they are)
    and then `key.sub=value` overrides (value parsed as YAML) applied.

    `stored`: the file is a config normlab wrote (a run's or a checkpoint's), so keys of earlier versions
    (REMOVED_KEYS) are dropped instead of refused."""
    raw: dict = {}
    chosen: set[str] = set(values or {}) | {item.partition("=")[0] for item in overrides}  # on top of the file
    if path is not None:
        if not os.path.isfile(path):
            raise UserError(f"config file {path} does not exist; pass a YAML file such as configs/tiny.yaml")
        with open(path) as f:
            raw = read_yaml(f, path) or {}
        if not isinstance(raw, dict):
            raise UserError(f"{path}: the top level must be a mapping of sections (run, model, train, ...)")
    file_keys, file_scheme = _given(raw), _scheme_of(raw)
    for key, value in (values or {}).items():
        set_key(raw, key, value)
    for item in overrides:
        apply_override(raw, item)
    _translate_tensorboard(raw, say=not stored)
    _drop_removed_keys(raw, refuse=not stored)
    if stored:
        for dotted, value in LEGACY_DEFAULTS.items():
            section, key = dotted.split(".")
            if isinstance(raw.get(section), dict) and key not in raw[section]:
                raw[section][key] = value
    given = _given(raw)
    if isinstance(raw.get("model"), dict) and raw["model"].get("preset") in PRESETS:
        given |= {f"model.{key}" for key in PRESETS[raw["model"]["preset"]]}
    cfg = from_dict(raw)
    # A file written for another scheme (configs/tiny.yaml is pre_ln's) does not choose this scheme's paper-fixed
    # settings: `pretrain train configs/tiny.yaml model.norm_scheme=ngpt` trains nGPT as its paper does, and says so.
    if file_scheme == cfg.model.norm_scheme:
        chosen |= file_keys
    applied = _scheme_train_defaults(cfg, raw, chosen, path, file_scheme, say=not stored)  # said when it trained
    if applied:
        cfg = from_dict(raw)
    return dataclasses.replace(cfg, given_keys=frozenset(given - set(applied)))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last silently, so a second
    `norm_scheme:` would win unseen and a second `model:` section would drop the first."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: PyYAML's own error says so
                    continue
                if first != key_node.start_mark.line + 1:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} given twice (first on line {first}); keep one",
                        key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_yaml(stream, path) -> object:
    """The YAML document in `stream` (text or an open file) read safely; a syntax error or a key given twice is a
    one-line UserError naming `path` and the line."""
    try:
        return yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path} line {mark.line + 1}" if mark is not None else str(path)
        problem = e.problem or e.context or "not valid YAML"
        if "\\t" in problem or "\t" in problem:
            problem += " (YAML indents with spaces, not tabs)"
        raise UserError(f"{where}: {problem}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None


def _given(raw: dict) -> set[str]:
    return {f"{section}.{key}" for section, keys in raw.items() if isinstance(keys, dict) for key in keys}


def _scheme_of(raw: dict) -> str:
    model = raw.get("model")
    return model.get("norm_scheme", MODEL_DEFAULT_SCHEME) if isinstance(model, dict) else MODEL_DEFAULT_SCHEME


def _scheme_train_defaults(cfg: ExperimentConfig, raw: dict, chosen: set[str], path: str | None, file_scheme: str,
                           say: bool) -> dict[str, object]:
    """Set in `raw` the training settings the scheme's paper fixes (its entry's `train_defaults`, models/norms.py)
    that the config does not choose; a chosen other value is trained as given, with a warning. Returns
    {key: value set}."""
    scheme = cfg.model.norm_scheme
    applied, replaced = {}, {}
    for dotted, value in NORM_SCHEMES[scheme].train_defaults(cfg.model).items():
        section, key = dotted.split(".")
        current = raw.get(section, {}).get(key)
        if dotted not in chosen:
            if key in raw.get(section, {}) and current != value:
                replaced[dotted] = current
            raw.setdefault(section, {})[key] = value
            applied[dotted] = value
        elif current != value and say:
            print(f"warning: {dotted}={current} with model.norm_scheme={scheme}, whose paper trains with "
                  f"{dotted}={value}; training as given", file=sys.stderr)
    if replaced and say:
        print(f"note: model.norm_scheme={scheme} trains at its paper's "
              f"{', '.join(f'{k}={applied[k]}' for k in replaced)}, not {path}'s "
              f"{', '.join(f'{k}={v}' for k, v in replaced.items())} (set for {file_scheme}); give a key on the "
              f"command line to choose otherwise", file=sys.stderr)
    return applied


def _translate_tensorboard(raw: dict, say: bool) -> None:
    """logging.tensorboard (before logging.backends) as logging.backends: true keeps tensorboard in the backends
    (given or default), false removes it. A user's file or override gets a one-line notice; a stored config (an older
    run's, read to resume it) is translated silently."""
    logging = raw.get("logging")
    if not isinstance(logging, dict) or "tensorboard" not in logging:
        return
    on = logging.pop("tensorboard")
    if not isinstance(on, bool):
        raise UserError(f"logging.tensorboard: expected true or false, got {on!r}; it is logging.backends now, e.g. "
                        "logging.backends=[tensorboard,wandb]")
    backends = logging.get("backends", LoggingConfig().backends)
    if isinstance(backends, list):
        backends = [b for b in backends if b != "tensorboard"]
        logging["backends"] = ["tensorboard", *backends] if on else backends
    if say:
        shown = "[" + ",".join(map(str, logging["backends"])) + "]" if isinstance(backends, list) else backends
        print(f"note: logging.tensorboard={str(on).lower()} is read as logging.backends={shown}; use "
              "logging.backends instead (logging.tensorboard will be removed)", file=sys.stderr)


def _drop_removed_keys(raw: dict, refuse: bool) -> None:
    for dotted, fix in REMOVED_KEYS.items():
        section, key = dotted.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            if refuse:
                raise UserError(f"{dotted} was removed: {fix}")
            del raw[section][key]


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b=value` (value parsed as YAML: numbers, booleans, null, lists) in the nested dict `raw`."""
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override {item!r} is not of the form section.key=value (e.g. model.norm_scheme=lns)")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    set_key(raw, key, parsed, what=f"override {item!r}")


def set_key(raw: dict, key: str, value: Any, what: str | None = None) -> None:
    """Set dotted `key` to `value` in the nested dict `raw`."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"{what or key}: {part} is not a section")
    node[leaf] = value


def from_dict(raw: dict) -> ExperimentConfig:
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise UserError(_unknown_key_message(sorted(unknown)[0], "", SECTIONS))
    try:
        kwargs = {}
        for name, section_type in typing.get_type_hints(ExperimentConfig).items():
            if name not in SECTIONS:
                continue
            value = raw.get(name, {})
            if name == "deepspeed":
                kwargs[name] = _check_type(value, dict, "deepspeed")
                continue
            if not isinstance(value, dict):
                raise UserError(f"{name}: expected a mapping of keys, got {type(value).__name__}")
            if name == "model":
                value = _with_preset(value)
            kwargs[name] = _build(section_type, value, name + ".")
        return ExperimentConfig(**kwargs)
    except ValueError as e:
        raise UserError(str(e)) from None


def _with_preset(model: dict) -> dict:
    preset = model.get("preset")
    if preset is None:
        return model
    if preset not in PRESETS:
        raise UserError(f"model.preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return {**PRESETS[preset], **model}


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise UserError(_unknown_key_message(key, prefix, fields))
    for key, value in values.items():
        choices = fields[key].metadata.get("choices")  # a key whose valid values are a table's (models/norms.py)
        if choices and value not in choices:
            raise UserError(f"{prefix}{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    kwargs = {key: _check_type(value, hints[key], prefix + key) for key, value in values.items()}
    obj = cls(**kwargs)
    check_choices(obj, prefix)
    return obj


def _check_type(value: Any, tp, key: str) -> Any:
    """Return `value` (ints widened to float where a float is expected) or raise a one-line UserError."""
    choices = literal_choices(tp)
    if choices is not None:
        if value not in choices:
            raise UserError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(value, inner, key)
    expected = origin or tp
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _unknown_key_message(key: str, prefix: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"did you mean {prefix}{close[0]}? " if close else ""
    return f"unknown config key {prefix}{key}; {hint}valid keys: {', '.join(prefix + k for k in valid)}"


def to_dict(cfg: ExperimentConfig) -> dict:
    """{section: {key: value}} (`deepspeed`: its mapping) of every config key."""
    return {f.name: dataclasses.asdict(getattr(cfg, f.name)) if f.name != "deepspeed" else dict(cfg.deepspeed)
            for f in sections()}


def dump_yaml(cfg: ExperimentConfig, say_scheme_defaults: bool = False) -> str:
    """The resolved config as YAML; `say_scheme_defaults`: a closing comment naming the scheme's own defaults it
    applied (what `pretrain config` prints; a saved config.yaml is data, without it)."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    line = scheme_defaults_line(cfg) if say_scheme_defaults else None
    return text + f"# {line}\n" if line else text


def scheme_defaults_applied(cfg: ExperimentConfig) -> dict[str, object]:
    """The training settings the scheme's entry sets (`train_defaults`, models/norms.py) that the config did not
    choose."""
    defaults = NORM_SCHEMES[cfg.model.norm_scheme].train_defaults(cfg.model)
    return {k: v for k, v in defaults.items() if k not in cfg.given_keys}


def scheme_defaults_line(cfg: ExperimentConfig) -> str | None:
    """`ngpt's own defaults: train.warmup_steps=0 (...)`, or None when the scheme set nothing."""
    applied = scheme_defaults_applied(cfg)
    if not applied:
        return None
    values = ", ".join(f"{k}={v}" for k, v in applied.items())
    return f"{cfg.model.norm_scheme}'s own defaults: {values} (its paper's settings; give a key to choose otherwise)"


def save_config(cfg: ExperimentConfig, path: str) -> None:
    """Write the resolved config as YAML, atomically (a reader never sees half a file)."""
    atomic_write(path, dump_yaml(cfg))

"""Where a model comes from: one model source for every command and for `train.init_from`.

`open_source(path, flag)` reads what `path` names -- a training checkpoint (a step folder, a checkpoints/ folder or a
run folder: their `latest`; any TP/PP layout) or a Hugging Face directory (config.json and no trainer_state.json; a
Llama, Qwen3 or OLMo 2, which `models.hf` reads by model_type as pre_ln or ln_free, pre_ln with qk_norm=head,
reordered with qk_norm=full)
-- into a `ModelSource`: the model config, the full (TP = 1) fp32 weights, the `models.Llama` built from them in
eval mode on a device, the tokenizer, the checkpoint's step and a description for JSON outputs. Every error is
one line that names `flag` (`--checkpoint`, `train.init_from`). generate, eval-sft, eval, analyze-depth,
attribute, export-hf, remove-norms and `train.init_from` read their model through it.

`resolve_model(cfg)` fills the model keys the config does not give (`ExperimentConfig.given_keys`): from the
checkpoint a resume continues (so a run keeps its model when defaults change), else from the `train.init_from`
source. A key the config gives that changes a weight's shape must agree with the source: a one-line error
otherwise. `load_weights` reads the source's full (TP = 1) weights; pretrain/state/reshard.py `apply_weights`
puts each rank's shard into the engine.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from functools import cached_property

import torch
from safetensors import SafetensorError

from models import Llama
from models.config import ModelConfig
from models.hf import from_hf_config, load_hf_state
from models.norm_layers import TAPER_GAIN
from pretrain.config import ExperimentConfig
from pretrain.data.resolve import resolve_data_path, resolve_tokenizer, training_tokenizer
from pretrain.data.sft_prepare import folder_kind, read_sft_meta
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError
from pretrain.runs import read_stored_config
from pretrain.state.checkpoint import STATE_FILE, find_checkpoint, load_model_state, read_state

# Keys whose change changes a weight's shape (or the set of weights): they must agree with the source.
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "tie_embeddings")
WHAT = "give a run folder, a checkpoints/ or step folder, or a Hugging Face Llama, Qwen3 or OLMo 2 directory"


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, STATE_FILE))


@dataclass
class ModelSource:
    """A model to read: a complete training checkpoint or a Hugging Face directory (`open_source` makes one)."""

    path: str  # as given
    folder: str  # the checkpoint's step folder, or the HF directory
    flag: str  # what names the source in errors: "--checkpoint", "train.init_from"
    run_config: ExperimentConfig | None  # a checkpoint's stored config; None for an HF directory
    step: int | None  # a checkpoint's step; None for an HF directory
    hf_config: dict | None = None  # an HF directory's config.json
    # The scheme an HF directory is read as: None picks by config.json's model_type (models.hf.from_hf_config); lns
    # undoes an lns export's fold.
    norm_scheme: str | None = None

    @property
    def is_hf(self) -> bool:
        return self.hf_config is not None

    @cached_property
    def model_config(self) -> ModelConfig:
        if not self.is_hf:
            return self.run_config.model
        try:
            return from_hf_config(self.hf_config, norm_scheme=self.norm_scheme)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{self.flag} {self.path}: {_first_line(e)}") from None

    def weights(self) -> dict[str, torch.Tensor]:
        """The full (TP = 1) fp32 weights (and persistent buffers), read anew on each call."""
        if not self.is_hf:
            return load_model_state(self.folder, self.run_config)[1]
        try:
            _, weights = load_hf_state(self.folder, norm_scheme=self.norm_scheme)
        except (ValueError, KeyError, OSError) as e:
            raise UserError(f"{self.flag} {self.path}: {_first_line(e)}") from None
        except SafetensorError as e:  # a truncated or corrupt model.safetensors
            raise UserError(_unreadable_weights(self, e)) from None
        return {k: v.float() for k, v in weights.items()}

    def build(self, device: torch.device | str = "cpu") -> Llama:
        """The fp32 `models.Llama` (TP = 1) holding the weights, in eval mode on `device`."""
        return Llama.from_state_dict(self.model_config, self.weights()).to(device).eval()

    def tokenizer(self, explicit: str | None = None) -> Tokenizer:
        """`explicit` (a .model file or a folder holding one), else a checkpoint's training data's tokenizer or an
        HF directory's tokenizer.model."""
        if explicit:
            return resolve_tokenizer(explicit)
        if not self.is_hf:
            return training_tokenizer(self.run_config, self.folder)
        try:
            return resolve_tokenizer(self.folder)
        except UserError as e:
            raise UserError(f"{e}; pass --tokenizer") from None

    def sft_template_name(self) -> str | None:
        """The SFT template the run's data folders were prepared with (their meta.json); None for a pretraining run
        or an HF directory. Folders prepared with different templates are refused: the caller must choose."""
        if self.is_hf:
            return None
        data = self.run_config.data
        names = set()
        for path in data.paths:
            try:
                folder = resolve_data_path(path, data.cache_dir)
                if folder_kind(folder) == "sft":
                    names.add(read_sft_meta(folder)["template"])
            except UserError as e:
                raise UserError(f"cannot read the run's data {path} for its SFT template ({e}); name the template "
                                "(--template / --chat-template NAME)") from None
        if len(names) > 1:
            raise UserError(f"the run's SFT data folders were prepared with different templates "
                            f"({', '.join(sorted(names))}); name one (--template / --chat-template NAME)")
        return names.pop() if names else None

    @property
    def description(self) -> dict:
        """What JSON outputs record of the model: checkpoint (absolute folder), step, norm_scheme or hf_model_type."""
        about = {"checkpoint": os.path.abspath(self.folder), "step": self.step}
        if self.is_hf:
            return {**about, "hf_model_type": self.hf_config.get("model_type")}
        return {**about, "norm_scheme": self.model_config.norm_scheme}

    def hf_causal_lm(self, device: torch.device | str = "cpu"):
        """An HF directory as transformers' AutoModelForCausalLM (any causal LM it knows, not only Llama), fp32, in
        eval mode on `device`."""
        if not self.is_hf:
            raise UserError(f"{self.flag} {self.path}: a training checkpoint, not a Hugging Face directory")
        # transformers loads only here: seconds of import time that no other path pays
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # one result line, not a loading bar
        try:
            model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{self.flag} {self.path}: cannot load it as a Hugging Face causal LM: "
                            f"{_first_line(e)}") from None
        except SafetensorError as e:
            raise UserError(_unreadable_weights(self, e)) from None
        except RuntimeError as e:
            if "mismatched" not in str(e):  # transformers' refusal of weights whose shapes differ from config.json's
                raise
            raise UserError(f"{self.flag} {self.path}: its weights do not fit its config.json"
                            f"{_shape_mismatch(self.folder, model_config_of(self.folder))}; export it again or "
                            "correct config.json") from None
        return model.to(device).eval()


def _unreadable_weights(source: ModelSource, e: BaseException) -> str:
    return (f"{source.flag} {source.path}: its weights cannot be read ({_first_line(e)}): the file is truncated or "
            "corrupt; copy or export it again")


def model_config_of(folder: str):
    """transformers' config of an HF directory (for the shape check below)."""
    from transformers import AutoConfig  # transformers loads only on the HF paths

    return AutoConfig.from_pretrained(folder)


def _shape_mismatch(folder: str, hf_config) -> str:
    """': NAME is (a, b) in the weights, (c, d) by config.json' for the first weight whose stored shape differs from
    the one the config describes ('' when none is found). Reads the safetensors headers and builds the model on the
    meta device: no weights are read."""
    from safetensors import safe_open  # with transformers: only HF paths need it
    from transformers import AutoModelForCausalLM  # transformers loads only on the HF paths

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(hf_config).state_dict().items()}
    for file in sorted(p for p in os.listdir(folder) if p.endswith(".safetensors")):
        with safe_open(os.path.join(folder, file), framework="pt") as f:
            for key in f.keys():
                stored = tuple(f.get_slice(key).get_shape())
                if key in expected and expected[key] != stored:
                    return f": {key} is {stored} in {file}, {expected[key]} by config.json"
    return ""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def open_source(path: str, flag: str = "--checkpoint", norm_scheme: str | None = None) -> ModelSource:
    """The model `path` names (see the module docstring); reads only configs and the trainer state here.
    `norm_scheme` is the scheme an HF directory is read as (None: by its model_type)."""
    if not os.path.exists(path):
        raise UserError(f"{flag}: {path} does not exist; {WHAT}")
    if is_hf_dir(path):
        try:
            with open(os.path.join(path, "config.json")) as f:
                hf_config = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{flag} {path}: cannot read its config.json: {_first_line(e)}") from None
        if not isinstance(hf_config, dict):
            raise UserError(f"{flag} {path}: its config.json is not a JSON object")
        return ModelSource(path, path, flag, None, None, hf_config, norm_scheme)
    folder = find_checkpoint(path)
    if not os.path.isdir(folder):
        raise UserError(f"{flag}: {path} names checkpoint {folder} in its latest, which does not exist; {WHAT}")
    if not os.path.isfile(os.path.join(folder, STATE_FILE)):
        raise UserError(f"{flag}: {folder} is incomplete or not a checkpoint (no {STATE_FILE}, which a save writes "
                        f"last) and not a Hugging Face directory (no config.json); {WHAT}")
    run_config = read_stored_config(folder)  # the one read of the stored config: the source carries it
    return ModelSource(path, folder, flag, run_config, read_state(folder).get("step"), None, norm_scheme)


# ----------------------------------------------------------------------------------------------------------
# train.init_from
# ----------------------------------------------------------------------------------------------------------


def resolve_model(cfg: ExperimentConfig, resumed: ExperimentConfig | None) -> ExperimentConfig:
    """`cfg` with the model keys it does not give taken from the resumed checkpoint (`resumed`: its stored config)
    or the init_from source."""
    if resumed is not None:
        source, what = resumed.model, None
    elif cfg.train.init_from is not None:
        scheme = cfg.model.norm_scheme if "model.norm_scheme" in cfg.given_keys else None
        source = open_source(cfg.train.init_from, "train.init_from", norm_scheme=scheme).model_config
        what = f"train.init_from {cfg.train.init_from}"
    else:
        return cfg
    given = cfg.given_keys
    values = {}
    conflicts = []
    for f in dataclasses.fields(ModelConfig):
        ours, theirs = getattr(cfg.model, f.name), getattr(source, f.name)
        if f"model.{f.name}" not in given:
            values[f.name] = theirs
            continue
        values[f.name] = ours
        if what and f.name in SHAPE_KEYS and ours != theirs:
            conflicts.append(f"model.{f.name}={ours} (source: {theirs})")
    if conflicts:
        raise UserError(f"{what}: the config's weight shapes differ from the source's: {', '.join(conflicts)}; drop "
                        "these keys from the config to take the source's values")
    try:
        resolved = dataclasses.replace(cfg, model=ModelConfig(**values))
    except ValueError as e:
        raise UserError(str(e)) from None
    return resolved


def load_weights(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    """The full (TP = 1) fp32 weights of `train.init_from`, checked against the model `cfg` builds."""
    source = open_source(cfg.train.init_from, "train.init_from", norm_scheme=cfg.model.norm_scheme)
    weights = source.weights()
    expected = {k: v.shape for k, v in Llama.meta(cfg.model).named_parameters()}
    for k in expected:  # a TaperNorm's own gain gamma~ is new: set to gamma when its taper starts, ones until then
        if k.endswith(f".{TAPER_GAIN}") and k not in weights:
            weights[k] = torch.ones(expected[k])
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected) - {"head.weight"})
    if missing or extra:
        raise UserError(
            f"train.init_from {source.folder}: its weights do not fit model.norm_scheme={cfg.model.norm_scheme}"
            + (f"; missing {', '.join(missing[:4])}" if missing else "")
            + (f"; not in this model {', '.join(extra[:4])}" if extra else "")
            + "; use a source trained with a scheme that has the same parameters"
        )
    for k, shape in expected.items():
        if weights[k].shape != shape:
            raise UserError(f"train.init_from {source.folder}: {k} has shape {tuple(weights[k].shape)} in the source "
                            f"but {tuple(shape)} in this model")
    return {k: weights[k].float() for k in expected}

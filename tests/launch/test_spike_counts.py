"""Spikes per run (metrics.jsonl's spike events, pretrain/train/spikes.py) in `sweep status` and the report's
per-run table, counted once per step whichever series spiked."""

from __future__ import annotations

import json

from launch.status import format_table, run_status
from pretrain.analysis.report import runs_block
from pretrain.analysis.report_table import Run
from pretrain.runs import count_spikes, train_records

METRICS = [
    {"step": 1, "loss": 7.0, "consumed_tokens": 100},
    {"step": 2, "event": "spike", "series": "loss", "value": 90.0, "median": 7.0, "threshold": 8.0},
    {"step": 2, "event": "spike", "series": "grad_norm", "value": 40.0, "median": 1.0, "threshold": 2.0},
    {"step": 2, "loss": 90.0, "consumed_tokens": 200},
    {"step": 1, "event": "rollback", "from_step": 2, "spike_steps": [2]},
    {"step": 2, "event": "spike", "series": "loss", "value": 50.0, "median": 7.0, "threshold": 8.0},  # again, after it
    {"step": 2, "loss": 50.0, "consumed_tokens": 200},
    {"step": 3, "event": "non_finite", "module": "blocks.0.attn", "direction": "forward"},
    {"step": 3, "loss": 6.5, "consumed_tokens": 300},
]


def test_spikes_are_counted_once_per_step_and_again_after_a_rollback():
    assert count_spikes(METRICS) == 2
    assert count_spikes([m for m in METRICS if m.get("event") != "spike"]) == 0


def test_the_records_of_steps_a_rollback_discarded_give_way_to_the_steps_trained_again():
    assert [(m["step"], m["loss"]) for m in train_records(METRICS)] == [(1, 7.0), (2, 50.0), (3, 6.5)]


def test_sweep_status_and_the_report_show_the_spikes_of_each_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in METRICS))
    row = run_status(str(tmp_path), {}, [])
    assert (row.spikes, row.step, row.train_loss) == (2, 3, 6.5)
    header, line = format_table([row]).splitlines()[:2]
    assert header.split()[-2:] == ["spikes", "error"] and line.split()[-2:] == ["2", "-"]
    run = Run(path=str(tmp_path), name="r", config={"train.steps": 3}, scheme="pre_ln",
              train=train_records(METRICS), spikes=2)
    block = runs_block([run], [])
    assert block.header[-2:] == ["state", "spikes"] and block.rows[0][-1] == ("2", "")

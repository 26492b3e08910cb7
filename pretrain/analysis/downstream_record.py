"""The `down` record of metrics.jsonl (eval.downstream, written by pretrain/analysis/downstream_loop.py), and the same
numbers in the shape of a `pretrain eval-downstream --out` result, for the report's Table 2 of a run that has no
downstream.json. No torch here: the report reads it."""

from __future__ import annotations

# per task, down_TASK_NAME; gold_ll: the mean log-likelihood of the right answers (nats), which moves long before an
# accuracy does at small scale
METRICS = ("acc", "acc_norm", "acc_per_token", "acc_per_char", "primary", "gold_ll")


def is_downstream(record: dict) -> bool:
    return "down_primary_metric" in record


def as_result(record: dict) -> dict:
    """A `down` record as eval-downstream's result: per task its metrics and OLMo's primary metric's name; format,
    shots, limit, step."""
    names = record["down_primary_metric"]
    return {"tasks": {t: {**{m: record[f"down_{t}_{m}"] for m in METRICS}, "primary_metric": names[t]} for t in names},
            "format": "lm-eval", "shots": 0, "limit": record.get("down_limit"), "step": record["step"]}

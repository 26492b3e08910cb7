"""Tensor parallelism (megatron-core layers, two gloo ranks) reproduces the single-process model, with the fused
loss in several chunks and with activation checkpointing.

One spawned TP = 2 job (`_tp_worker`, ~10 s, mostly two megatron-core imports) builds every case's model,
asserts nothing itself and returns what it saw: its own and the sharded-from-full state dicts, the merged
state dict, the all-gathered logits, the loss, the merged gradients and the errors it got. The tests below compare those with a TP = 1 model built in the pytest
process, so a failing case is reported by name.
"""

from __future__ import annotations

import pytest
import torch

from helpers.distributed import run_distributed_test
from models.config import ModelConfig
from models.llama import Llama
from models.norms import NORM_SCHEMES
from models.parallel import TensorParallel, cross_entropy, merge_state_dicts, shard_state_dict, tp_splits

SEED = 1234
TOL = 1e-5
# GQA (4 query heads over 2 kv heads, so each rank holds 2 query heads and 1 kv head); 4 layers, so mix_ln
# has one Post-LN block.
BASE = dict(vocab_size=96, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=16, init_std=0.1)
SCHEMES = list(NORM_SCHEMES)  # every scheme of the table, TP = 2 against TP = 1
# The modules that define the schemes' blocks: the spawned ranks import them, so that a scheme registered outside
# models/norms.py (tests/models/test_scheme_recipe.py's plugin) is in their table too.
SCHEME_MODULES = sorted({NORM_SCHEMES[scheme].block.__module__ for scheme in SCHEMES})
CASES: dict[str, dict] = {
    f"{scheme}-{'tied' if tie else 'untied'}": dict(norm_scheme=scheme, tie_embeddings=tie)
    for scheme in SCHEMES
    for tie in (False, True)
    if not (tie and NORM_SCHEMES[scheme].unit_weights)  # ngpt refuses tied embeddings
}
CASES["pre_ln-mha"] = dict(n_kv_heads=4)
CASES["pre_ln-layernorm"] = dict(norm_type="layernorm")
# model.qk_norm: the full-width norm sums its statistics over the TP group; the per-head one is replicated.
CASES["pre_ln-qk_head"] = dict(qk_norm="head")
CASES["pre_ln-qk_full"] = dict(qk_norm="full")
CASES["lns-qk_full"] = dict(norm_scheme="lns", qk_norm="full")
CASES["peri_ln-qk_full-layernorm"] = dict(norm_scheme="peri_ln", qk_norm="full", norm_type="layernorm")
# The attention gate is split with the heads; GPAS's g and zero-centred gains are replicated.
CASES["pre_ln-gate_headwise"] = dict(attn_gate="headwise")
CASES["lns-gate_elementwise-gpas"] = dict(norm_scheme="lns", attn_gate="elementwise", gpas=True)
CASES["deepnorm-gpas"] = dict(norm_scheme="deepnorm", gpas=True)
CASES["pre_ln-zero_centered-qk_full"] = dict(norm_gain="zero_centered", qk_norm="full")
CASES["ngpt-mha"] = dict(norm_scheme="ngpt", n_kv_heads=4)
# Residual streams: the state and its mixing weights are replicated, each rank mixes it whole.
CASES["pre_ln-mhc"] = dict(residual="mhc")
CASES["pre_ln-hc"] = dict(residual="hc", residual_streams=2)
CASES["pre_ln-attn_res"] = dict(residual="attn_res", residual_streams=2)  # 2 blocks of 2 layers
CASES["pre_ln-siamese"] = dict(residual="siamese")
# Gemma 4's and Muse Glimmer's pieces (the schemes themselves are cases above): per-head norms of q, k and v without
# gain and the layer scalar are replicated, each rank normalizing its own heads.
CASES["pre_ln-qk_scaleless-v_norm-layer_scalar"] = dict(qk_norm="head", qk_norm_scale="none", v_norm=True,
                                                        layer_scalar=True)


# Configs that TP = 2 must refuse, and the field the error must name.
INDIVISIBLE = {
    "model.vocab_size": dict(vocab_size=95),
    "model.n_heads": dict(d_model=24, n_heads=3, n_kv_heads=3),
    "model.n_kv_heads": dict(n_kv_heads=1),
    "model.ffn_hidden": dict(ffn_hidden=47),  # (the 1b preset's 5461 is odd, too)
}


pytestmark = [pytest.mark.processes, pytest.mark.usefixtures("single_thread"), pytest.mark.compat]


def make_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**BASE, **overrides})


def perturbed_state_dict(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The seed's full model with its norm gains, DyT/Derf scalars, GPAS gates, nGPT scales and Block AttnRes's
    pseudo-queries and key gains moved off their init, so they matter."""
    sd = Llama(cfg, seed=SEED).state_dict()
    gen = torch.Generator().manual_seed(SEED)
    for name in sorted(sd):
        if name.endswith((".alpha", ".shift", "residual.gate", ".rates", "scale.weight", "emb_out.scale",
                          "layer_scalar.scale", ".query", ".key_gain")) or (
                "norm" in name and name.endswith(".weight")):
            sd[name] = sd[name] + 0.3 * torch.randn(sd[name].shape, generator=gen)
    return sd


def make_batch(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(cfg.vocab_size, (2, 12), generator=gen)
    labels = torch.randint(cfg.vocab_size, (2, 12), generator=gen)
    labels[0, :3] = -100  # ignored positions must not count in the mean
    return tokens, labels


# The fused loss in chunks of 5 tokens (this rank's 48 vocabulary entries), so that every case's loss and gradients
# here come from several chunks, each with the vocab-parallel loss's all-reduces.
CHUNK_ELEMENTS = 5 * BASE["vocab_size"] // 2
# Cases also run with activation checkpointing (models/llama.py `recompute`): the same loss and gradients.
RECOMPUTED = ("pre_ln-untied", "ngpt-mha", "lns-gate_elementwise-gpas")


def _tp_worker(cases: dict[str, dict], indivisible: dict[str, dict], scheme_modules: list[str]) -> dict:
    """Runs on every rank of a TP = 2 job."""
    import importlib

    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    import models.parallel
    from models.llama import recompute

    models.parallel.LOSS_CHUNK_ELEMENTS = CHUNK_ELEMENTS
    for module in scheme_modules:
        importlib.import_module(module)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tp = TensorParallel.from_parallel_state()
    out: dict = {"tp": (tp.size, tp.rank), "cases": {}, "errors": {}}

    def gather_objects(obj):
        objs = [None] * tp.size
        dist.all_gather_object(objs, obj, group=tp.group)
        return objs

    for name, overrides in cases.items():
        cfg = make_config(**overrides)
        model = Llama(cfg, tp, seed=SEED)
        own = {k: v.clone() for k, v in model.state_dict().items()}
        sharded = shard_state_dict(Llama(cfg, seed=SEED).state_dict(), model)
        merged = merge_state_dicts(gather_objects(own), model)
        layer_types = {
            "qkv": isinstance(model.blocks[0].attn.qkv, tensor_parallel.ColumnParallelLinear),
            "gate": isinstance(model.blocks[0].mlp.gate, tensor_parallel.ColumnParallelLinear),
            "up": isinstance(model.blocks[0].mlp.up, tensor_parallel.ColumnParallelLinear),
            "o": isinstance(model.blocks[0].attn.o, tensor_parallel.RowParallelLinear),
            "down": isinstance(model.blocks[0].mlp.down, tensor_parallel.RowParallelLinear),
            "tok_emb": isinstance(model.tok_emb, tensor_parallel.VocabParallelEmbedding),
            "head": model.head is None or isinstance(model.head, tensor_parallel.ColumnParallelLinear),
        }

        # Loading a sharded checkpoint into the TP model must work strictly (checkpoint resume does this).
        sharded_perturbed = shard_state_dict(perturbed_state_dict(cfg), model)
        try:
            model.load_state_dict(sharded_perturbed)
            load_error = None
        except RuntimeError as e:
            load_error = " ".join(str(e).split())[:600]
            # Go on with the other checks; megatron may only have added keys of its own.
            assert not model.load_state_dict(sharded_perturbed, strict=False).missing_keys
        tokens, labels = make_batch(cfg)
        with torch.no_grad():
            local_logits = model(tokens)  # [B, T, V / tp]
        parts = [torch.empty_like(local_logits) for _ in range(tp.size)]
        dist.all_gather(parts, local_logits.contiguous(), group=tp.group)
        loss = model(tokens, labels)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        splits = tp_splits(model)
        recomputed = {}
        for mode in ("full", "selective") if name in RECOMPUTED else ():
            model.zero_grad()
            recompute(model, mode)
            loss_again = model(tokens, labels)
            loss_again.backward()
            recompute(model, "none")
            recomputed[mode] = (loss_again.detach(), merge_state_dicts(
                gather_objects({n: p.grad.detach().clone() for n, p in model.named_parameters()}), model))
        out["cases"][name] = dict(
            recomputed=recomputed,
            state_dict=own,
            sharded_from_full=sharded,
            merged=merged,
            layer_types=layer_types,
            local_vocab=local_logits.shape[-1],
            load_error=load_error,
            logits=torch.cat(parts, dim=-1),
            loss=loss.detach(),
            grads=merge_state_dicts(gather_objects(grads), model),
            replicated_grads={n: g for n, g in grads.items() if n not in splits},
        )

    # The loss must not touch the logits it is given (megatron's kernel works in place on its input).
    cfg = make_config()
    model = Llama(cfg, tp, seed=SEED)
    tokens, labels = make_batch(cfg)
    logits = model(tokens)
    before = logits.detach().clone()
    cross_entropy(logits, labels, tp).backward()
    out["ce_logits_change"] = (logits.detach() - before).abs().max().item()

    for field, overrides in indivisible.items():
        try:
            Llama(make_config(**overrides), tp, seed=SEED)
        except ValueError as e:
            out["errors"][field] = str(e)
        else:
            out["errors"][field] = None
    return out


@pytest.fixture(scope="module")
def tp_results() -> list[dict]:
    return run_distributed_test(_tp_worker, world_size=2, args=(CASES, INDIVISIBLE, SCHEME_MODULES), timeout=240)


def reference(cfg: ModelConfig) -> dict:
    """The TP = 1 model (plain PyTorch, no process group) on the same weights and batch."""
    model = Llama(cfg, seed=SEED)
    model.load_state_dict(perturbed_state_dict(cfg))
    tokens, labels = make_batch(cfg)
    with torch.no_grad():
        logits = model(tokens)
    loss = model(tokens, labels)
    loss.backward()
    # The same in float64: the truth both fp32 results are measured against, so a gradient that nearly cancels
    # (a DyT alpha summed over every position) is judged by how far fp32 itself is from it.
    exact = Llama(cfg, seed=SEED)
    exact.load_state_dict(perturbed_state_dict(cfg))
    exact.double()(tokens, labels).backward()
    return dict(model=model, logits=logits, loss=loss.detach(), grads={n: p.grad for n, p in model.named_parameters()},
                grads64={n: p.grad for n, p in exact.named_parameters()})


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = TOL) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= atol, f"{what}: max |TP=2 - TP=1| = {err:.3g} > {atol:g}"


def test_both_ranks_ran_tp2(tp_results):
    assert [r["tp"] for r in tp_results] == [(2, 0), (2, 1)]
    assert all(r["cases"].keys() == CASES.keys() for r in tp_results)


@pytest.mark.parametrize("case", CASES)
def test_tp_layers_are_megatron(tp_results, case):
    cfg = make_config(**CASES[case])
    for rank, r in enumerate(tp_results):
        res = r["cases"][case]
        assert all(res["layer_types"].values()), f"rank {rank}: {res['layer_types']}"
        assert res["local_vocab"] == cfg.vocab_size // 2


@pytest.mark.parametrize("case", CASES)
def test_tp_init_matches_single_process(tp_results, case):
    """Same seed, same model: the TP shards are the shards of the TP = 1 weights, and merge inverts shard."""
    full = Llama(make_config(**CASES[case]), seed=SEED).state_dict()
    for rank, r in enumerate(tp_results):
        res = r["cases"][case]
        own, sharded = res["state_dict"], res["sharded_from_full"]
        assert own.keys() == full.keys(), f"rank {rank}: TP and TP=1 state dicts have different keys"
        for k in full:
            assert torch.equal(own[k], sharded[k]), f"rank {rank}: {k} differs from shard_state_dict(full)[{k}]"
        merged = res["merged"]
        assert merged.keys() == full.keys()
        for k in full:
            assert torch.equal(merged[k], full[k]), f"rank {rank}: merge_state_dicts(...)[{k}] != TP=1 {k}"
    # The two ranks hold different halves of every sharded weight.
    qkv = "blocks.0.attn.qkv.weight"
    assert not torch.equal(tp_results[0]["cases"][case]["state_dict"][qkv], tp_results[1]["cases"][case]["state_dict"][qkv])


def test_tp_model_loads_sharded_state_dict_strictly(tp_results):
    """tp_model.load_state_dict(shard_state_dict(full, tp_model)) (strict, as a checkpoint resume does)."""
    failed = {
        (case, rank): res["load_error"]
        for rank, r in enumerate(tp_results)
        for case, res in r["cases"].items()
        if res["load_error"] is not None
    }
    if failed:
        (case, rank), err = next(iter(failed.items()))
        pytest.fail(f"strict load failed for {len(failed)} (case, rank) pairs, e.g. {case} on rank {rank}: {err}")


@pytest.mark.parametrize("case", CASES)
def test_tp_logits_loss_and_grads_match_single_process(tp_results, case):
    cfg = make_config(**CASES[case])
    ref = reference(cfg)
    for rank, r in enumerate(tp_results):
        res = r["cases"][case]
        assert_close(res["logits"], ref["logits"], f"rank {rank} gathered logits")
        assert_close(res["loss"], ref["loss"], f"rank {rank} loss")
        grads = res["grads"]
        assert grads.keys() == ref["grads"].keys()
        largest = max(g.abs().max().item() for g in ref["grads"].values())
        for name, g in ref["grads"].items():
            # fp32 round-off grows with the gradient: TOL per unit of its largest entry (gemma4's embedding gradient
            # is sqrt(d) times larger, through its sqrt(d) multiplier)
            assert_close(grads[name], g, f"rank {rank} grad of {name}", atol=TOL * max(1.0, g.abs().max().item()))
            # Relative to float64: TP = 2 within 1e-4, or no further than 10x the TP = 1 fp32 error where the
            # gradient is a near-cancelling sum, or within fp32's round-off of the model's gradients (1e-6 of the
            # largest entry): a scalar gain summed over every activation, e.g. the last block's layer scalar, whose
            # output the final RMSNorm divides back out, has a true gradient of ~1e-8 and fp32 sums of size ~1.
            g64 = ref["grads64"][name]
            err = (grads[name].double() - g64).norm()
            rel = err / g64.norm().clamp(min=1e-30)
            rel_single = (g.double() - g64).norm() / g64.norm().clamp(min=1e-30)
            assert rel < max(1e-4, 10 * rel_single) or err <= 1e-6 * largest, (
                f"rank {rank} grad of {name}: relative error {rel:.3g} (TP = 1 fp32: {rel_single:.3g}), "
                f"absolute {err:.3g}")
        # Replicated parameters (norm gains, DyT alphas) get the full gradient on every rank.
        for name, g in res["replicated_grads"].items():
            assert_close(g, ref["grads"][name], f"rank {rank} local grad of replicated {name}")
        if not NORM_SCHEMES[cfg.norm_scheme].norm_free:
            assert res["replicated_grads"], "expected replicated norm parameters"
    # The comparison is not vacuous: the gradients are far from zero.
    assert largest > 1e-2
    assert abs(ref["loss"].item() - torch.log(torch.tensor(float(cfg.vocab_size))).item()) < 2.0


@pytest.mark.parametrize("case", RECOMPUTED)
def test_tp_activation_checkpointing_gives_the_same_loss_and_grads(tp_results, case):
    for rank, r in enumerate(tp_results):
        res = r["cases"][case]
        assert sorted(res["recomputed"]) == ["full", "selective"]
        for mode, (loss, grads) in res["recomputed"].items():
            assert_close(loss, res["loss"], f"rank {rank} {mode} loss", atol=1e-6)
            for name, g in res["grads"].items():
                assert_close(grads[name], g, f"rank {rank} {mode} grad of {name}", atol=1e-6)


@pytest.mark.parametrize("field", INDIVISIBLE)
def test_tp_indivisible_config_raises_naming_field(tp_results, field):
    for r in tp_results:
        msg = r["errors"][field]
        assert msg is not None, f"TP=2 accepted {INDIVISIBLE[field]}"
        assert "parallel.tp=2" in msg and "\n" not in msg, msg
        assert field in msg, msg


def test_tp_cross_entropy_does_not_modify_logits(tp_results):
    for rank, r in enumerate(tp_results):
        assert r["ce_logits_change"] == 0, (
            f"rank {rank}: models.parallel.cross_entropy changed its input logits in place "
            f"(by up to {r['ce_logits_change']:.3g}); with TP = 1 it does not"
        )

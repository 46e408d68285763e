"""The memory plan (``llama2_align.plan``) and ``llama2-align plan``.

The per-layer activation formula is checked against what autograd really keeps (every tensor saved for backward,
seen through ``saved_tensors_hooks``) on the tiny preset, for full fine-tuning and LoRA, fp32 and bf16, with and
without activation checkpointing; parameter and adapter counts against the built models; the choices (sharding,
checkpointing, micro-batch, QLoRA) and the refusals on the 70B preset.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from llama2_align import plan as P
from llama2_align.cli import EXIT_REFUSED, EXIT_USAGE, app
from llama2_align.model import LoraSettings, build_model, trainable_parameters
from llama2_align.pipeline import PipelineConfig, resolve

GiB = 2**30
runner = CliRunner()


def _plan(preset: str, gpus: int = 1, memory: str = "80GiB", nodes: int = 1, **overrides):
    return P.plan_pipeline(resolve(PipelineConfig(preset=preset, overrides=overrides)), gpus, memory, nodes)


@pytest.mark.parametrize("text,expected", [("80GiB", 80 * GiB), ("80 GiB", 80 * GiB), ("141GB", 141 * 10**9),
                                           ("40G", 40 * GiB), ("81920MiB", 80 * GiB), ("1.5TiB", int(1.5 * 2**40)),
                                           ("1024", 1024), (2048, 2048)])
def test_parse_memory(text, expected):
    assert P.parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["80XB", "", "GiB", "-5GiB", "0GiB", "eighty"])
def test_parse_memory_refuses_malformed_sizes(bad):
    with pytest.raises(ValueError, match="memory size"):
        P.parse_memory(bad)


@pytest.mark.parametrize("preset", ["llama2-7b", "llama2-13b", "llama2-70b", "small", "tiny", "micro"])
def test_shapes_count_exactly_what_the_meta_model_holds(preset):
    shape = P.model_shape(preset)  # raises when the per-module arithmetic disagrees with the meta-device model
    assert shape.total() == shape.params
    assert shape.total(scalar=True) == shape.params - shape.vocab * shape.hidden + shape.hidden


def test_vocab_override_and_scalar_and_lora_counts_match_built_models():
    shape = P.model_shape("micro", vocab_size=300)
    lora = LoraSettings(enabled=True, r=4)
    for role, scalar in (("policy", False), ("value", True)):
        full = build_model("micro", role, vocab_size=300, device="cpu", dtype="fp32")
        assert trainable_parameters(full)[1] == shape.total(scalar)
        with_lora = build_model("micro", role, vocab_size=300, device="cpu", dtype="fp32", lora=lora)
        assert trainable_parameters(with_lora)[0] == shape.lora_params(lora, scalar)


def test_role_memory_bytes():
    shape = P.model_shape("llama2-7b")
    n = shape.params
    full = P.role_memory(shape, "policy", scalar=False, mode="full", p=2)
    assert (full.weights, full.grads, full.optim) == (2 * n, 2 * n, 12 * n)  # bf16 + fp32 master, m, v
    frozen = P.role_memory(shape, "reference", scalar=False, mode="frozen", p=2)
    assert (frozen.weights, frozen.grads, frozen.optim) == (2 * n, 0, 0)
    lora = LoraSettings(enabled=True, r=16)
    a = shape.lora_params(lora)
    lo = P.role_memory(shape, "policy", scalar=False, mode="lora", p=2, lora=lora)
    assert (lo.weights, lo.grads, lo.optim) == (2 * n + 4 * a, 4 * a, 8 * a)
    q = P.role_memory(shape, "policy", scalar=False, mode="lora", p=2, lora=lora, qlora=True)
    assert q.weights == pytest.approx(shape.quantizable() * P.NF4_BYTES_PER_PARAM
                                      + (n - shape.quantizable()) * 4 + 4 * a)
    assert 0.30 < q.weights / lo.weights < 0.36  # 4-bit layers (3.3 GiB) + fp32 embeddings and LM head (1 GiB)


def _saved_bytes(model, ids, mask) -> int:
    """Bytes of the distinct tensors autograd keeps for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask)
    return sum(seen.values())


@pytest.mark.parametrize("dtype,lora,ckpt", [
    ("fp32", None, False), ("bf16", None, False), ("fp32", None, True), ("bf16", None, True),
    ("fp32", 0.0, False), ("bf16", 0.0, False), ("bf16", 0.0, True),
])
def test_activation_formula_matches_what_autograd_keeps(dtype, lora, ckpt):
    torch.manual_seed(0)
    settings = LoraSettings(enabled=True, r=8, dropout=lora) if lora is not None else None
    model = build_model("tiny", "policy", dtype=dtype, device="cpu", lora=settings, gradient_checkpointing=ckpt)
    model.train()
    b, s = 4, 64
    ids = torch.randint(3, 2048, (b, s))
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0  # padding: transformers' SDPA path with a mask (k and v repeated to every head)
    measured = _saved_bytes(model, ids, mask)
    shape = P.model_shape("tiny")
    p = P.DTYPE_BYTES[dtype]
    est = P.training_activation_bytes(shape, b * s, p, "lora" if settings else "full", settings, ckpt)
    if ckpt:  # the saved inputs only; the recomputed layer lives during backward, not in the forward's saves
        est -= b * s * P.layer_activation_bytes(shape, p, "lora" if settings else "full", settings)
    assert 0.95 < est / measured < 1.06, (est, measured)  # measured: 0.994 .. 1.034


def test_demo_presets_fit_one_gpu_replicated():
    plan = _plan("demo-tiny")
    assert plan.fits
    assert all(s.sharding in ("none", "single") and not s.qlora for s in plan.stages)


def test_70b_lora_on_8x80_shards_everything_and_ppo_uses_its_qlora_default():
    plan = _plan("llama2-70b-lora", gpus=8)
    by = {s.stage: s for s in plan.stages}
    for stage in ("sft", "reward-helpfulness", "reward-safety", "ppo"):
        assert by[stage].fits and by[stage].sharding == "fsdp" and by[stage].world == 8, by[stage]
    assert by["ppo"].qlora and by["ppo"].checkpointing
    assert not by["sft"].qlora
    # without the preset's QLoRA default, PPO's five roles need it anyway
    no_q = _plan("llama2-70b-lora", gpus=8, **{"ppo.lora.quantize": "none"})
    ppo = next(s for s in no_q.stages if s.stage == "ppo")
    assert ppo.qlora and any("QLoRA" in c for c in ppo.choices)
    # evaluation holds the policy and both reward models in one process: 3 x 128 GiB does not fit any 80 GiB GPU
    assert not by["eval"].fits and by["eval"].total > 3 * 128 * GiB
    assert not by["rejection-sampling"].enabled  # optional, off: shown, not counted
    assert {s.stage for s in plan.refused()} == {"eval"}


def test_70b_lora_on_one_gpu_needs_qlora_for_sft_and_refuses_ppo():
    plan = _plan("llama2-70b-lora", gpus=1)
    by = {s.stage: s for s in plan.stages}
    assert by["sft"].fits and by["sft"].qlora and by["sft"].sharding == "none"
    assert by["reward-helpfulness"].fits and by["reward-helpfulness"].qlora
    assert not by["ppo"].fits and by["ppo"].micro_batch == 1
    assert {s.stage for s in plan.refused()} == {"ppo", "eval"}


def test_micro_batch_is_halved_before_qlora():
    # 7B LoRA SFT at micro-batch 32 x 4096 tokens without checkpointing does not fit 40 GiB: checkpointing first,
    # then halving, and QLoRA only when nothing else works
    plan = _plan("llama2-7b-lora", gpus=1, memory="40GiB", **{"sft.micro_batch_size": 32,
                                                              "sft.gradient_checkpointing": False})
    sft = plan.stages[0]
    assert sft.fits and sft.checkpointing and not sft.qlora and 1 <= sft.micro_batch < 32
    assert any("halved" in c for c in sft.choices) and any("checkpointing" in c for c in sft.choices)


def test_check_plan_refuses_with_the_numbers():
    resolved = resolve(PipelineConfig(preset="llama2-70b-lora"))
    with pytest.raises(P.PlanRefused) as info:
        P.check_plan(resolved, gpus=1, gpu_memory="80GiB")
    assert isinstance(info.value, ValueError)  # a validation error: never retried
    text = str(info.value)
    assert "ppo needs" in text and "GiB per GPU" in text and "stage" in text and "fits?" in text
    assert P.check_plan(resolve(PipelineConfig(preset="demo-micro")), gpus=1, gpu_memory="16GiB").fits


def test_cli_plan_table_json_and_exit_codes():
    ok = runner.invoke(app, ["plan", "--preset", "llama2-7b-lora", "--gpus", "1", "--gpu-memory", "80GiB"])
    assert ok.exit_code == 0, ok.output
    assert "stage" in ok.stdout and "ppo" in ok.stdout and "fits?" in ok.stdout
    js = runner.invoke(app, ["plan", "--preset", "llama2-7b-lora", "--json"])
    data = json.loads(js.stdout)
    assert data["fits"] and [s["stage"] for s in data["stages"]] == list(P.STAGES)
    assert all(s["activations_no_ckpt"] >= s["activations_ckpt"] for s in data["stages"])
    bad = runner.invoke(app, ["plan", "--preset", "llama2-70b-lora", "--gpus", "1"])
    assert bad.exit_code == EXIT_REFUSED
    assert "cannot fit" in bad.stderr and "ppo" in bad.stderr and "GiB" in bad.stderr
    assert "ppo" in bad.stdout  # the table is printed before the refusal
    multi = runner.invoke(app, ["plan", "--preset", "llama2-70b-lora", "--gpus", "8", "--nodes", "2", "--json"])
    assert json.loads(multi.stdout)["world_size"] == 16
    for args in (["--preset", "nope"], ["--preset", "demo-tiny", "--gpu-memory", "80XB"],
                 ["--preset", "demo-tiny", "--set", "ppo.nope=1"], ["--preset", "demo-tiny", "--gpus", "0"]):
        r = runner.invoke(app, ["plan", *args])
        assert r.exit_code == EXIT_USAGE, (args, r.output)

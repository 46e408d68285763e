"""QLoRA on the CPU (bitsandbytes >= 0.48 has 4-bit NF4 kernels for the CPU): a 4-bit frozen base under LoRA
adapters trains through the real stages, and its saved adapters load back over a 4-bit base.

SFT on the micro preset (the preset's base is saved, then loaded 4-bit by transformers' BitsAndBytesConfig), then a
2-iteration PPO whose policy and value are QLoRA on the session's full SFT and reward models (those sources are
quantized in memory after loading); the reference is the 4-bit policy with its adapters off.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.slow

QLORA = {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0, "quantize": "nf4"}


@pytest.fixture(scope="module")
def qlora_sft(tmp_path_factory, demo_world_dir, tokenizer_dir):
    from llama2_align.pipeline import preset_config
    from llama2_align.stages.sft import SFTConfig, SFTInputs, run_sft

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("qlora_sft")
    cfg = SFTConfig.model_validate({**preset_config("demo-tiny").sft.model_dump(), "max_steps": 16, "batch_size": 16,
                                    "micro_batch_size": 16, "logging_steps": 1, "save_steps": 8, "eval_steps": 100,
                                    "num_samples": 2, "sample_max_new_tokens": 6, "progress_bar": False,
                                    "learning_rate": 1e-2, "lora": QLORA})
    result = run_sft(cfg, SFTInputs(base="micro", data=str(demo_world_dir / "sft.jsonl"),
                                    tokenizer=str(tokenizer_dir)), out)
    return out, result


def test_qlora_sft_trains_a_4bit_base_and_the_adapter_reloads(qlora_sft):
    from llama2_align.model import build_model, export_merged, is_peft, is_quantized, trainable_parameters

    out, result = qlora_sft
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 16
    # it learns through the 4-bit base (a random-init micro base under rank-8 adapters: slowly, 6.17 -> 5.90)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.15, losses
    final = out / "final"
    meta = json.loads((final / "llama2_align_model.json").read_text())
    assert meta["adapter"] and meta["quantize"] == "nf4"
    assert not (final / "model.safetensors").exists()  # the adapter alone: the 4-bit base is never saved
    trained, total = result.metrics["trainable_params"], result.metrics["total_params"]
    assert 0 < trained < total / 3

    model = build_model(final, "policy", dtype="fp32", device="cpu")
    assert is_peft(model) and is_quantized(model)
    assert {type(m).__name__ for m in model.modules()} >= {"Linear4bit"}
    assert trainable_parameters(model)[0] == trained  # a reloaded adapter continues training

    # merged into the full-precision base, the adapter gives nearly the 4-bit model's logits (quantization error)
    merged = build_model(export_merged(final, out / "merged"), "policy", dtype="fp32", device="cpu")
    assert not is_quantized(merged) and not is_peft(merged)
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q, f = model(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (q.argmax(-1) == f.argmax(-1)).float().mean() > 0.7
    assert (q - f).abs().max() < 0.5 * f.abs().max()


def test_qlora_resume_continues_from_the_checkpoint(qlora_sft, tmp_path, demo_world_dir, tokenizer_dir):
    """Killed after step 8 (its newer checkpoint and final model gone), the QLoRA SFT resumes from the step-8 DCP
    checkpoint over a 4-bit base and ends where the uninterrupted run ended: the same losses at steps 9-16."""
    import shutil

    from llama2_align.stages.sft import SFTConfig, SFTInputs, run_sft

    out, first = qlora_sft
    assert (out / "checkpoint-8" / "models" / ".metadata").is_file()  # the adapters and optimizer, as DCP
    killed = tmp_path / "sft"
    shutil.copytree(out, killed, ignore=shutil.ignore_patterns("checkpoint-16", "final", "merged", "result.json"))
    cfg = SFTConfig.model_validate(json.loads((out / "result.json").read_text())["config"])
    resumed = run_sft(cfg, SFTInputs(base="micro", data=str(demo_world_dir / "sft.jsonl"),
                                     tokenizer=str(tokenizer_dir)), killed)
    assert resumed.provenance["resumed_from"].endswith("checkpoint-8")
    assert resumed.steps == first.steps == 16

    def losses(d):
        return {r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    before, after = losses(out), losses(killed)
    assert sorted(k for k in after if k > 8) == list(range(9, 17))
    assert all(abs(after[k] - before[k]) < 1e-3 for k in range(9, 17)), (before, after)


def test_qlora_ppo_policy_and_value_on_4bit_bases(tmp_path, demo_world_dir, sft_dir, rm_dirs):
    from llama2_align.model import Reference, build_model, is_quantized
    from llama2_align.stages.ppo import PPOConfig, PPOInputs, run_ppo

    torch.set_num_threads(1)
    cfg = PPOConfig(iterations=2, prompts_per_iteration=8, mini_batch_size=8, micro_batch_size=4, max_new_tokens=6,
                    save_every=1, keep_checkpoints=1, num_samples=0, lora=QLORA, learning_rate=1e-3,
                    dtype="fp32")
    inputs = PPOInputs(policy=str(sft_dir / "final"), reward_helpfulness=str(rm_dirs["helpfulness"] / "final"),
                       reward_safety=str(rm_dirs["safety"] / "final"),
                       prompts=str(demo_world_dir / "ppo_prompts.jsonl"))
    result = run_ppo(cfg, inputs, tmp_path)
    assert result.steps == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2] and all(r["kl_ref"] == r["kl_ref"] for r in records)
    for name in ("final", "value"):
        meta = json.loads((tmp_path / name / "llama2_align_model.json").read_text())
        assert meta["adapter"] and meta["quantize"] == "nf4", meta
    policy = build_model(tmp_path / "final", "policy", dtype="fp32", device="cpu")
    assert is_quantized(policy)
    ref = Reference(policy)  # adapters off: the 4-bit SFT policy, no second copy
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    sft = build_model(sft_dir / "final", "policy", dtype="fp32", device="cpu")
    with torch.no_grad():
        base_logits, sft_logits = ref(input_ids=ids).logits, sft(input_ids=ids).logits
    assert (base_logits.argmax(-1) == sft_logits.argmax(-1)).float().mean() > 0.7

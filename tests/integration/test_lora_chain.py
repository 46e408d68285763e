"""The LoRA chain of the GPU presets on the micro model: LoRA SFT -> LoRA reward model -> LoRA PPO.

Each stage starts from the previous stage's adapter merged into its base, so PPO's reference (adapters off) is the
SFT policy itself with no second copy of the weights, and every saved adapter loads back to the same model.
"""

from __future__ import annotations

import json

import pytest
import torch

from llama2_align.pipeline import preset_config

pytestmark = pytest.mark.slow

LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def lora_chain(tmp_path_factory, demo_world_dir, tokenizer_dir):
    from llama2_align.stages.ppo import PPOConfig, PPOInputs, run_ppo
    from llama2_align.stages.reward import RewardConfig, RewardInputs, run_reward
    from llama2_align.stages.sft import SFTConfig, SFTInputs, run_sft

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora_chain")
    sft = SFTConfig.model_validate({**preset_config("demo-tiny").sft.model_dump(), "max_steps": 6, "batch_size": 8,
                                    "micro_batch_size": 8, "save_steps": 100, "eval_steps": 100, "num_samples": 0,
                                    "progress_bar": False, "lora": LORA})
    run_sft(sft, SFTInputs(base="micro", data=str(demo_world_dir / "sft.jsonl"), tokenizer=str(tokenizer_dir)),
            root / "sft")
    rms = {}
    for kind in ("helpfulness", "safety"):
        cfg = RewardConfig.model_validate({**preset_config("demo-tiny").reward_helpfulness.model_dump(), "kind": kind,
                                           "max_steps": 4,
                                           "batch_size": 8, "micro_batch_size": 8, "save_steps": 100,
                                           "eval_steps": 100, "min_warmup_steps": 1, "progress_bar": False,
                                           "lora": LORA})
        run_reward(cfg, RewardInputs(sft_model=str(root / "sft" / "final"),
                                     data=str(demo_world_dir / "preferences.jsonl")), root / f"rm_{kind}")
        rms[kind] = root / f"rm_{kind}" / "final"
    ppo = PPOConfig(iterations=2, prompts_per_iteration=8, mini_batch_size=8, micro_batch_size=8,
                    max_new_tokens=6, save_every=100, num_samples=0, lora=LORA, learning_rate=1e-3)
    run_ppo(ppo, PPOInputs(policy=str(root / "sft" / "final"), reward_helpfulness=str(rms["helpfulness"]),
                           reward_safety=str(rms["safety"]), prompts=str(demo_world_dir / "ppo_prompts.jsonl")),
            root / "ppo")
    return root, rms


def test_every_stage_saved_an_adapter_pointing_at_its_input(lora_chain):
    root, rms = lora_chain
    sft_final = root / "sft" / "final"
    assert (sft_final / "adapter_config.json").exists()
    for path in rms.values():
        assert (path / "adapter_config.json").exists()
        assert json.loads((path / "llama2_align_model.json").read_text())["base"] == str(sft_final.resolve())
    ppo_meta = json.loads((root / "ppo" / "final" / "llama2_align_model.json").read_text())
    assert ppo_meta["base"] == str(sft_final.resolve())


def test_ppo_reference_is_the_sft_policy_with_one_copy(lora_chain):
    from llama2_align.io import read_jsonl
    from llama2_align.model import build_model, build_reference

    root, _ = lora_chain
    first = read_jsonl(root / "ppo" / "metrics.jsonl")[0]
    assert abs(first["kl_ref"]) < 1e-3  # iteration 1 samples from the SFT policy itself
    sft = build_model(root / "sft" / "final", "policy", device="cpu", dtype="fp32").eval()
    policy = build_model(root / "sft" / "final", "policy", lora=__import__("llama2_align.model").model.LoraSettings(
        **LORA), continue_adapter=False, device="cpu", dtype="fp32").eval()
    ref = build_reference(policy, root / "sft" / "final")
    assert ref.shares_weights
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
        assert torch.allclose(ref(input_ids=ids).logits, sft(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(policy(input_ids=ids).logits, sft(input_ids=ids).logits, atol=1e-3)


def test_saved_adapters_load_back(lora_chain):
    from llama2_align.model import build_model, is_peft
    from llama2_align.stages.reward import RewardScorer

    root, rms = lora_chain
    ppo = build_model(root / "ppo" / "final", "policy", device="cpu", dtype="fp32")
    assert is_peft(ppo)
    value = build_model(root / "ppo" / "value", "value", device="cpu", dtype="fp32")
    assert is_peft(value)
    scorer = RewardScorer(rms["safety"], device="cpu", dtype="fp32")
    s1 = scorer.score(["How do I kill a python process?"], ["Use the kill command."])
    s2 = RewardScorer(rms["safety"], device="cpu", dtype="fp32").score(["How do I kill a python process?"],
                                                                       ["Use the kill command."])
    assert torch.isfinite(s1).all() and torch.equal(s1, s2)

"""Context distillation, GAtt and the multi-turn evaluation through the rlhf-pipeline flow on demo-micro: the
stages run after PPO in the paper's order, each writes what it promises, and the report compares them with the
policy they started from."""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytestmark = pytest.mark.slow


def test_pipeline_micro_with_context_distillation_and_gatt(prefect_server, tmp_path):
    import torch

    from flows.pipeline import rlhf_pipeline
    from llama2_align.chat import B_SYS
    from llama2_align.data import read_records
    from llama2_align.pipeline import PipelineConfig

    torch.set_num_threads(1)
    cfg = PipelineConfig(preset="demo-micro", runs_root=str(tmp_path), run_name="post", gatt=True,
                         context_distillation=True,
                         overrides={"context_distillation.compare_untargeted": True, "sft.max_steps": 10,
                                    "reward_helpfulness.max_steps": 2, "reward_safety.max_steps": 2,
                                    "ppo.iterations": 1, "gatt.safety_share": 0.5, "gatt.passes": 2,
                                    "gatt.demonstrations": 8})
    state = rlhf_pipeline(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    run = tmp_path / "post"
    report = json.loads((run / "report.json").read_text())
    assert {"ppo", "context-distillation", "gatt", "eval", "adherence"} <= set(report["stages"])

    def started_from(stage):
        return json.loads((run / stage / "result.json").read_text())["inputs"]["policy"]["path"]

    assert started_from("context-distillation") == str((run / "ppo" / "final").resolve())  # the paper's order
    assert started_from("gatt") == str((run / "context-distillation" / "final").resolve())
    assert report["final"] == "gatt" and set(report["eval"]) == {"sft", "ppo", "cd", "cd-untargeted", "gatt"}

    # the demo data carried the extra demonstrations, with their own tokenizer
    sft = read_records(run / "data" / "sft_extended.jsonl", "sft")
    assert {r.category for r in sft} >= {"instruction", "dialogue", "safety-preprompt"}
    assert (run / "tokenizer+dialogues+preprompts").is_dir()
    # and both reward models learnt from the safety pairs with evasive answers (data.demo_evasive_pairs)
    for rm in ("reward-helpfulness", "reward-safety"):
        data = json.loads((run / rm / "result.json").read_text())["inputs"]["data"]["path"]
        assert data == str((run / "data" / "preferences+evasive.jsonl").resolve())

    # context distillation: the targeted set is the filtered one, the untargeted comparison trained beside it
    cd = report["stages"]["context-distillation"]["metrics"]
    # (where the safety RM does not prefer the distilled answer, the original one is trained on: not_preferred)
    assert cd["filter"] == "targeted" and cd["kept_targeted"] <= cd["kept_untargeted"]
    assert cd["sft_train_examples"] <= cd["kept_targeted"] + cd["kept_original"]
    assert (run / "context-distillation" / "untargeted" / "sft" / "final").is_dir()
    for rec in read_records(run / "context-distillation" / "cd.jsonl", "sft"):
        assert [m.role for m in rec.messages] == ["user", "assistant"]  # trained without the preprompt

    # GAtt: inst as the system prompt of the first turn only; one example per dialogue (the demo's train_on:
    # dialogue), each answer weighted, the last one trained
    records = read_records(run / "gatt" / "gatt.jsonl", "sft")
    # gatt.demonstrations: the warm-up fine-tunes the distilled policy on the first 8 of the demo world's instruction
    # demonstrations, and the first pass samples from it
    demos = read_records(run / "gatt" / "warm-up" / "demonstrations.jsonl", "sft")
    world = read_records(run / "data" / "instruction_demos.jsonl", "sft")[:8]
    assert [[m.content for m in r.messages] for r in demos] == [[m.content for m in r.messages] for r in world]
    assert all([m.role for m in r.messages] == ["system", "user", "assistant"] for r in demos)
    warm = json.loads((run / "gatt" / "warm-up" / "sft" / "result.json").read_text())
    assert warm["inputs"]["base"]["path"] == str((run / "context-distillation" / "final").resolve())
    for rec in records:
        assert rec.messages[0].role == "system"
        assert not any(B_SYS.strip() in m.content for m in rec.messages[1:])
        weights = [m.weight for m in rec.messages if m.role == "assistant"]
        assert set(weights) <= {0, 1} and weights[-1] == 1
    assert (run / "gatt" / "final" / "model.safetensors").exists()
    # every sampled turn is trained or dropped; each turn was the best of 2 by the helpfulness RM
    g = json.loads((run / "gatt" / "result.json").read_text())["metrics"]
    first = g["passes"][0]  # gatt.jsonl is the first pass's data
    assert g["demonstrations"] == 8 and g["warm_up_steps"] == warm["steps"]
    assert first["trained_answers"] == sum(first["kept_by_turn"]) == sum(
        m.weight for r in records for m in r.messages if m.role == "assistant") and first["kept"] == len(records)
    for m in g["passes"]:
        assert m["trained_answers"] + sum(v for k, v in m.items() if k.startswith("dropped_")) == m["turns_sampled"]
    samples = json.loads((run / "gatt" / "gatt_samples.json").read_text())
    assert samples["reward_helpfulness"].endswith("reward-helpfulness/final")
    assert samples["policy"] == str(run / "gatt" / "warm-up" / "sft" / "final")
    # gatt.passes 2: the second pass sampled fresh dialogues from the first pass's policy, and GAtt's final is its
    second = json.loads((run / "gatt" / "pass-2" / "gatt_samples.json").read_text())
    assert second["policy"] == str(run / "gatt" / "sft" / "final")
    assert second["sampling"]["seed"] == samples["sampling"]["seed"] + 1
    assert os.path.samefile(run / "gatt" / "final" / "model.safetensors",
                            run / "gatt" / "pass-2" / "sft" / "final" / "model.safetensors")
    assert len(g["passes"]) == 2 and g["kept"] == g["passes"][1]["kept"]
    # gatt.safety_share: about half the turns are the prompts file's safety prompts, picked by the safety RM
    assert samples["reward_safety"].endswith("reward-safety/final")
    safety_prompts = {r.prompt for r in read_records(run / "data" / "ppo_prompts.jsonl", "prompts") if r.is_safety}
    flags = [(t in safety_prompts, f) for d in samples["dialogues"] for t, f in zip(d["turns"], d["safety"])]
    assert all(a == b for a, b in flags) and 0 < sum(f for _, f in flags) < len(flags)

    # the report: each stage against the policy it started from; adherence by turn with the plot
    assert {k: v["vs"] for k, v in report["added_stages"].items()} == {"cd": "ppo", "cd-untargeted": "ppo",
                                                                        "gatt": "cd"}
    mt = report["multiturn"]
    assert mt["baseline"] == "cd" and mt["order"] == ["sft", "ppo", "cd", "gatt"]
    assert all(len(mt["checkpoints"][n]["adherence_by_turn"]) == 3 for n in mt["order"])
    assert "adherence_late" in mt["checkpoints"]["gatt"]["ci"]
    md = (run / "report.md").read_text()
    assert "## Multi-turn adherence" in md and "## Stages after RLHF" in md and "adherence/adherence.png" in md

    # killed during the second pass's fine-tune: a re-run keeps pass 1 whole and pass 2's samples, and trains pass 2
    from llama2_align.stages.gatt import GAttConfig, GAttInputs, run_gatt

    done = json.loads((run / "gatt" / "result.json").read_text())
    pass1 = (run / "gatt" / "sft" / "result.json").stat().st_mtime_ns
    for path in ("result.json", "final", "pass-2/sft"):
        target = run / "gatt" / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    again = run_gatt(GAttConfig(**done["config"]), GAttInputs(**{k: v["path"] for k, v in done["inputs"].items()}),
                     run / "gatt")
    assert again.provenance["resumed_from"] == str(run / "gatt" / "pass-2" / "gatt_samples.json")
    assert (run / "gatt" / "sft" / "result.json").stat().st_mtime_ns == pass1
    assert (run / "gatt" / "final" / "model.safetensors").exists()
    assert [p["kept"] for p in again.metrics["passes"]] == [p["kept"] for p in g["passes"]]

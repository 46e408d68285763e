"""PPO sharded with FSDP2 on 2 CPU processes (gloo), against the same run in one plain process.

"Matches" means: with the same data order and seeds, rollouts that do not depend on the sampler's random stream
(``top_p`` so small that only the most likely token is kept, so rank 1's sampler seed changes nothing) and one
mini-batch per epoch (the rows a rank's mini-batch takes depend on the world size), every iteration's rollout and
reward metrics agree and the final models, loaded in plain transformers, give the same logits to within 1e-4, while
training moved them by more than 1e-3 (by ~4 here). What may differ is only the order of floating-point reductions
(FSDP reduce-scatters per shard; one process sums micro-batches): ~3e-6 measured.

- a full policy, the rollout decoding in lockstep with per-layer gathers (``rollout_gather: false``): a DCP
  checkpoint of both ranks' shards, a final save gathered into HF safetensors;
- a LoRA policy (the base sharded once, shared with the reference), ranks SIGKILLed mid-run, resumed in ONE process
  from the 2-rank DCP checkpoint, which must end where an uninterrupted single-process run ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch

from llama2_align.launch import LaunchError, launch_stage
from llama2_align.pipeline import preset_config
from llama2_align.stages.common import checkpoints
from llama2_align.stages.ppo import PPOConfig, PPOInputs, run_ppo

pytestmark = pytest.mark.slow
torch.set_num_threads(1)

NPROC = 2
# what the rollouts and their scores give (the loss statistics are means of micro-batch means: their grouping into
# micro-batches differs with the world size, the gradient does not)
COMPARED = ("reward_combined", "rm_helpfulness", "rm_safety", "kl_ref", "response_length", "no_eos_frac")
LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}  # no dropout: its random stream is per rank


def _config(**overrides) -> PPOConfig:
    return PPOConfig.model_validate({
        **preset_config("demo-tiny").ppo.model_dump(), "prompts_per_iteration": 8, "mini_batch_size": 8,
        "micro_batch_size": 4, "ppo_epochs": 1, "max_new_tokens": 8, "learning_rate": 1e-3,
        "value_learning_rate": 1e-3, "top_p": 1e-9, "save_every": 1, "keep_checkpoints": 2, "sample_every": 1,
        "num_samples": 2, "sharding": "fsdp", **overrides})


@pytest.fixture(scope="module")
def ppo_inputs(demo_world_dir, sft_dir, rm_dirs) -> PPOInputs:
    return PPOInputs(policy=str(sft_dir / "final"), reward_helpfulness=str(rm_dirs["helpfulness"] / "final"),
                     reward_safety=str(rm_dirs["safety"] / "final"),
                     prompts=str(demo_world_dir / "ppo_prompts.jsonl"))


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b]
    for ra, rb in zip(a, b):
        for key in COMPARED:
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), (ra["iteration"], key, ra[key], rb[key])


def _logits(model_dir, ids: torch.Tensor) -> torch.Tensor:
    """The saved policy as plain transformers loads it (an adapter merged over its base by peft)."""
    from transformers import AutoModelForCausalLM

    if (model_dir / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        return model(input_ids=ids).logits


def _values(model_dir, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    with torch.no_grad():
        return AutoModelForSequenceClassification.from_pretrained(model_dir)(input_ids=ids).logits


IDS = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))


def test_full_policy_sharded_matches_one_process(tmp_path, ppo_inputs, sft_dir):
    cfg = _config(iterations=3, rollout_gather=False)
    lines: list[str] = []
    t0 = time.perf_counter()
    sharded = launch_stage("ppo", cfg.model_copy(update={"num_processes": NPROC}), ppo_inputs, tmp_path / "fsdp",
                           NPROC, log=lines.append)
    print(f"2-process FSDP PPO (3 iterations) took {time.perf_counter() - t0:.1f}s")
    single = run_ppo(cfg, ppo_inputs, tmp_path / "single")
    assert sharded.provenance["world_size"] == NPROC and single.provenance["world_size"] == 1
    assert any(line.startswith("[rank1] ") for line in lines)

    # a checkpoint: both ranks' shards and the index (DCP), each rank's RNG and loop state
    ckpt = tmp_path / "fsdp" / "checkpoint-2"
    assert sorted(p.name for p in ckpt.iterdir()) == ["loop-rank0.json", "loop-rank1.json", "models",
                                                      "rng-rank0.pt", "rng-rank1.pt"]
    assert sorted(p.name for p in (ckpt / "models").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                                   "param_groups.json"]
    assert not (tmp_path / "fsdp" / ".staging").exists()

    _assert_same_metrics(_rows(tmp_path / "fsdp"), _rows(tmp_path / "single"))
    fsdp_logits, single_logits = _logits(tmp_path / "fsdp" / "final", IDS), _logits(tmp_path / "single" / "final", IDS)
    moved = (fsdp_logits - _logits(sft_dir / "final", IDS)).abs().max().item()
    diff = (fsdp_logits - single_logits).abs().max().item()
    print(f"final policy logits: FSDP vs one process {diff:.2e}; moved from SFT by {moved:.2e}")
    assert moved > 1e-3 and diff < 1e-4
    value_diff = (_values(tmp_path / "fsdp" / "value", IDS) - _values(tmp_path / "single" / "value", IDS)).abs()
    assert value_diff.max().item() < 1e-4


CHILD = textwrap.dedent("""
    import sys
    from llama2_align.launch import launch_stage
    from llama2_align.stages.ppo import PPOConfig, PPOInputs
    launch_stage("ppo", PPOConfig.model_validate_json(sys.argv[1]), PPOInputs.model_validate_json(sys.argv[2]),
                 sys.argv[3], int(sys.argv[4]), log=lambda line: None)
""")


def _kill_ranks(launcher: subprocess.Popen) -> int:
    """SIGKILL the stage's rank processes (torchrun's workers under this launcher), by pid; returns how many."""
    ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
             if "llama2_align.launch" in " ".join(p.cmdline()) and "torch.distributed.run" not in p.cmdline()]
    for p in ranks:
        os.kill(p.pid, signal.SIGKILL)
    return len(ranks)


def test_lora_sharded_killed_then_resumed_on_one_process(tmp_path, ppo_inputs):
    iterations = 4
    cfg = _config(iterations=iterations, lora=LORA)
    out = tmp_path / "fsdp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-c", CHILD, cfg.model_copy(update={"num_processes": NPROC})
                                 .model_dump_json(), ppo_inputs.model_dump_json(), str(out), str(NPROC)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not checkpoints(out):
            assert launcher.poll() is None, launcher.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        assert _kill_ranks(launcher) == NPROC
        launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode != 0 and LaunchError.__name__ in launcher.stderr.read().decode()
    assert not (out / "result.json").exists(), "the run finished before its ranks were killed"
    step, ckpt = checkpoints(out)[-1]
    assert 1 <= step < iterations

    # resumed in one process (no process group, no sharding) from the 2-rank checkpoint
    seen: list[dict] = []
    resumed = run_ppo(cfg, ppo_inputs, out, progress=seen.append)
    assert resumed.provenance["resumed_from"] == str(ckpt) and resumed.provenance["world_size"] == 1
    assert seen[0]["step"] == step + 1
    rows = _rows(out)
    assert [r["iteration"] for r in rows] == list(range(1, iterations + 1))
    assert abs(rows[0]["kl_ref"]) < 1e-4  # the shared base with adapters off is the reference: zero KL at first

    single = tmp_path / "single"
    run_ppo(cfg, ppo_inputs, single)
    _assert_same_metrics(rows, _rows(single))
    assert (out / "final" / "adapter_config.json").exists()
    diff = (_logits(out / "final", IDS) - _logits(single / "final", IDS)).abs().max().item()
    print(f"LoRA: killed at checkpoint-{step} of 2 ranks, resumed on 1; final logits vs one process: {diff:.2e}")
    assert diff < 1e-4

"""The real PPO stage (``run_ppo``) for a few iterations on random weights of a preset: timings, decode mode, memory;
with ``--launch N`` under torchrun (NCCL on GPUs, gloo on the CPU) and ``--sharding fsdp``, the FSDP2 path, its DCP
checkpoint and a resume from it.

Everything is made here, offline: a SentencePiece tokenizer trained on the micro demo world (its ids are a subset
of the model's vocabulary), one random-weight checkpoint of the preset (the policy; both reward models and the
value model are made from it, each with a new scalar head), and prompts of one length (so the CUDA-graph decode
step is captured once, not once per prompt width). The roles are the recipe's: LoRA policy (its base shared with
the reference), value model, two reward models.

    python bench/ppo_run.py --device cuda --preset llama2-7b --lora                   # 2 iterations, batch 32
    python bench/ppo_run.py --device cuda --preset small --lora --launch 1 --sharding fsdp --resume-check
    python bench/ppo_run.py --device cpu --preset micro --lora --new-tokens 8 --batch 8
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import device_name, random_model

STEP_FAILED = "compiled decode step failed"


class _Seen(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def make_inputs(work: Path, preset: str, device: torch.device, dtype: torch.dtype, batch: int):
    """A tokenizer, one random-weight checkpoint of ``preset`` (with the tokenizer), prompts of one length."""
    from llama2_align.demo_world import DemoSizes, generate_demo_world
    from llama2_align.model import PRESETS, save_model
    from llama2_align.stages.ppo import PPOInputs
    from llama2_align.tokenizer import load_tokenizer, train_tokenizer

    tok_dir = train_tokenizer(generate_demo_world(0, DemoSizes.micro()).corpus_texts(), work / "tokenizer",
                              vocab_size=512)
    tokenizer = load_tokenizer(tok_dir)
    vocab = max(PRESETS[preset]["vocab_size"], len(tokenizer))
    model = random_model(preset, device, dtype, vocab_size=vocab)
    save_model(model, work / "model", tokenizer, role="policy")
    del model
    if device.type == "cuda":  # pragma: no cover - GPU only
        torch.cuda.empty_cache()
    prompts = work / "prompts.jsonl"
    rows = [{"id": f"p{i}", "prompt": "Please write one line about the sea.", "is_safety": i % 2 == 1}
            for i in range(max(batch, 8))]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = str(work / "model")
    return PPOInputs(policy=path, reward_helpfulness=path, reward_safety=path, prompts=str(prompts))


def ppo_config(a, sharding: str):
    from llama2_align.stages.ppo import PPOConfig

    return PPOConfig(
        iterations=a.iterations, prompts_per_iteration=a.batch, generation_batch_size=a.batch,
        mini_batch_size=a.batch, micro_batch_size=a.micro_batch, score_batch_size=a.score_batch,
        max_new_tokens=a.new_tokens, ppo_epochs=1, learning_rate=1e-5, value_learning_rate=1e-5,
        lora={"enabled": a.lora, "r": 16, "alpha": 32, "dropout": 0.0}, save_every=1, keep_checkpoints=2,
        num_samples=0, sample_every=1000, sharding=sharding, num_processes=max(1, a.launch))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default=None, help="default: micro (cpu), llama2-7b (cuda)")
    ap.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="rollouts per iteration (one generation batch)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--score-batch", type=int, default=16)
    ap.add_argument("--launch", type=int, default=0, help="run under torchrun on this many processes (0: in-process)")
    ap.add_argument("--sharding", default="ddp", choices=["ddp", "fsdp"])
    ap.add_argument("--resume-check", action="store_true",
                    help="then drop the final model and run again: it must resume from the last DCP checkpoint")
    ap.add_argument("--workdir", default=None, help="keep the files here (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file (bench/gpu.py reads it)")
    a = ap.parse_args()

    from llama2_align.launch import launch_stage
    from llama2_align.stages.common import checkpoints
    from llama2_align.stages.ppo import run_ppo

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    preset = a.preset or ("llama2-7b" if cuda else "micro")
    dtype = torch.bfloat16 if cuda else torch.float32
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    record: dict = {"part": "fsdp" if a.sharding == "fsdp" else "ppo", "preset": preset, "device": device_name(device),
                    "lora": a.lora, "dtype": str(dtype).replace("torch.", ""), "batch": a.batch,
                    "new_tokens": a.new_tokens, "iterations": a.iterations, "launch": a.launch,
                    "sharding": a.sharding, "ok": False}
    seen = _Seen()
    logging.getLogger("llama2_align.generation").addHandler(seen)
    try:
        t = time.perf_counter()
        inputs = make_inputs(work, preset, device, dtype, a.batch)
        record["inputs_s"] = round(time.perf_counter() - t, 1)
        cfg = ppo_config(a, a.sharding)
        out = work / "ppo"
        print(f"{preset} on {device_name(device)}: PPO {a.iterations} iterations x {a.batch} rollouts of "
              f"{a.new_tokens} tokens, {'LoRA' if a.lora else 'full'}, {dtype}, "
              + (f"torchrun x{a.launch} ({a.sharding})" if a.launch else "in-process"), flush=True)
        if cuda:  # pragma: no cover - GPU only
            torch.cuda.reset_peak_memory_stats(device)

        def run():
            t0 = time.perf_counter()
            if a.launch:
                result = launch_stage("ppo", cfg, inputs, out, a.launch, log=print)
            else:
                result = run_ppo(cfg, inputs, out)
            return result, time.perf_counter() - t0

        result, seconds = run()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        record.update(stage_s=round(seconds, 1), world_size=result.provenance["world_size"],
                      sharded=result.provenance.get("sharding"),
                      **{f"{phase}_s": [r[f"time_{phase}_s"] for r in rows]
                         for phase in ("rollout", "scoring", "optim", "iteration")})
        record["rollout_tokens_per_s"] = round(a.batch * a.new_tokens / rows[-1]["time_rollout_s"], 1)
        record["checkpoint_files"] = sorted(p.name for p in (out / "checkpoint-1" / "models").iterdir()) \
            if (out / "checkpoint-1").exists() else []
        if not a.launch:
            from llama2_align.generation import _StepRunner

            failed = [m for m in seen.messages if STEP_FAILED in m]
            record["decode"] = ("eager (compile failed: " + failed[0][:200] + ")" if failed
                                else "cuda-graph" if len(_StepRunner._compiled) else "eager")
        if cuda and not a.launch:  # pragma: no cover - GPU only
            record["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        if a.resume_check:
            step, ckpt = checkpoints(out)[-1]
            for name in ("result.json", "final", "value"):
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            resumed, seconds = run()
            record.update(resumed_from=Path(resumed.provenance["resumed_from"] or "").name, resume_s=round(seconds, 1))
            assert resumed.provenance["resumed_from"] == str(ckpt), resumed.provenance["resumed_from"]
        if a.sharding == "fsdp":
            assert record["sharded"].startswith("fsdp"), record["sharded"]
        if preset.startswith("llama2-"):  # the final save is there (loading 7B again on the CPU would take a while)
            assert (out / "final" / ("adapter_config.json" if a.lora else "config.json")).exists()
        else:
            from llama2_align.model import build_model

            build_model(out / "final", "policy", device="cpu", dtype="fp32")  # the final save loads
        record["ok"] = True
    finally:
        print(json.dumps(record), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps([record], indent=1))
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if record["ok"] else 1)


if __name__ == "__main__":
    main()

"""PPO iterations: this project's ``run_ppo`` against TRL 1.12.0's ``PPOTrainer`` (the last TRL with one), on CPU.

Set-up (built once with the project's own code, saved under bench/out/ppo_vs_trl/):
- the demo world's micro datasets and tokenizer; a random-init ``--preset`` policy (the "SFT" model) and a reward
  model (the policy's backbone with a scalar head), saved as HF directories; TRL loads the same directories;
- the same prompts (the demo PPO prompts in the Llama 2 chat format, the same token ids on both sides), the same
  batch (rollouts per iteration), response length, PPO epochs, mini-batch and learning rate.
Differences that remain (of the recipes, not the benchmark): our stage scores with two reward models (helpfulness and
safety, the same directory here) and stops a response at EOS; TRL's scores with one and generates the full response
length before truncating at the stop token. Both sides run full fine-tuning of policy and value, fp32, on CPU.

TRL runs as a subprocess in its own virtual environment, bench/.venv-trl, which this script creates on first use:
``pip install torch==2.13.0 trl==1.12.0`` (pip resolves transformers). If that fails, the script says why.

    python bench/ppo_vs_trl.py [--iterations 10 --batch 32 --response-length 24 --epochs 1 --repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / ".venv-trl"
OUT = HERE / "out" / "ppo_vs_trl"
TRL_VERSION = "1.12.0"

TRL_SIDE = r'''
import json, sys, time
args = json.loads(sys.argv[1])
import torch
torch.manual_seed(0)
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
try:
    from trl import PPOConfig, PPOTrainer
except ImportError:
    from trl.experimental.ppo import PPOConfig, PPOTrainer
tok = AutoTokenizer.from_pretrained(args["policy"])
policy = AutoModelForCausalLM.from_pretrained(args["policy"], dtype=torch.float32)
ref = AutoModelForCausalLM.from_pretrained(args["policy"], dtype=torch.float32)
value = AutoModelForSequenceClassification.from_pretrained(args["reward"], num_labels=1, dtype=torch.float32)
reward = AutoModelForSequenceClassification.from_pretrained(args["reward"], num_labels=1, dtype=torch.float32)
ds = Dataset.from_dict({"input_ids": args["prompt_ids"]})
B = args["batch"]
cfg = PPOConfig(output_dir=args["out"], per_device_train_batch_size=B, gradient_accumulation_steps=1,
                num_mini_batches=max(1, B // args["mini_batch"]), total_episodes=B * args["iterations"],
                response_length=args["response_length"], num_ppo_epochs=args["epochs"], learning_rate=args["lr"],
                stop_token="eos", missing_eos_penalty=-1.0, kl_coef=0.02, temperature=1.0,
                local_rollout_forward_batch_size=B, report_to=[], save_strategy="no", logging_steps=1,
                use_cpu=True, bf16=False, fp16=False, seed=0, num_sample_generations=0, dataloader_num_workers=0)
trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                     train_dataset=ds, value_model=value)
t = time.perf_counter()
trainer.train()
dt = time.perf_counter() - t
print("BENCH " + json.dumps({"seconds": dt, "samples": B * args["iterations"], "trl": trl.__version__}))
'''


def ensure_trl_venv() -> tuple[Path | None, str]:
    py = VENV / "bin" / "python"
    if py.exists():
        ok = subprocess.run([str(py), "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
        if ok.returncode == 0 and ok.stdout.strip() == TRL_VERSION:
            return py, ""
    print(f"creating {VENV} with trl=={TRL_VERSION} (one-off) ...", flush=True)
    if not py.exists():
        r = subprocess.run([sys.executable, "-m", "venv", str(VENV)], capture_output=True, text=True)
        if r.returncode:
            return None, f"python -m venv failed: {r.stderr[-2000:]}"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0", f"trl=={TRL_VERSION}"],
                       capture_output=True, text=True)
    if r.returncode:
        return None, f"pip install trl=={TRL_VERSION} failed:\n{(r.stdout + r.stderr)[-3000:]}"
    return py, ""


def build_models(preset: str, seed: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from llama2_align.demo_world import DemoSizes, generate_demo_world, write_demo_datasets
    from llama2_align.model import build_model, save_model
    from llama2_align.tokenizer import load_tokenizer, train_tokenizer

    OUT.mkdir(parents=True, exist_ok=True)
    paths = {k: str(v) for k, v in write_demo_datasets(OUT / "data", seed, DemoSizes.micro()).items()}
    tok_dir = OUT / "tokenizer"
    if not tok_dir.exists():
        train_tokenizer(generate_demo_world(seed, DemoSizes.micro()).corpus_texts(), tok_dir, 400, seed=seed)
    tok = load_tokenizer(tok_dir)
    policy_dir, rm_dir = OUT / f"policy-{preset}", OUT / f"reward-{preset}"
    if not (policy_dir / "config.json").exists():
        save_model(build_model(preset, "policy", vocab_size=len(tok), device="cpu", dtype="fp32", seed=seed),
                   policy_dir, tok, role="policy")
    if not (rm_dir / "config.json").exists():
        save_model(build_model(preset, "reward", vocab_size=len(tok), device="cpu", dtype="fp32", seed=seed + 1),
                   rm_dir, tok, role="reward")
    return {"policy": str(policy_dir), "reward": str(rm_dir), "prompts": paths["prompts"]}


def run_ours(models: dict, a) -> dict:
    from llama2_align.stages.ppo import PPOConfig, PPOInputs, run_ppo

    cfg = PPOConfig(iterations=a.iterations, prompts_per_iteration=a.batch, mini_batch_size=a.mini_batch,
                    micro_batch_size=a.mini_batch, ppo_epochs=a.epochs, learning_rate=a.lr, value_learning_rate=a.lr,
                    weight_decay=0.0, kl_beta=0.02, max_new_tokens=a.response_length, generation_batch_size=a.batch,
                    score_batch_size=a.batch, save_every=10**6, sample_every=10**6, num_samples=0, dtype="fp32",
                    seed=0)
    import shutil

    out = OUT / "ours-run"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    run_ppo(cfg, PPOInputs(policy=models["policy"], reward_helpfulness=models["reward"],
                           reward_safety=models["reward"], prompts=models["prompts"]), out)
    dt = time.perf_counter() - t
    from llama2_align.io import read_jsonl

    iters = sum(r["time_iteration_s"] for r in read_jsonl(out / "metrics.jsonl"))
    return {"seconds": dt, "iteration_seconds": iters, "samples": a.batch * a.iterations}


def run_ours_fresh(a) -> dict:
    """One run of ours in a fresh process (as TRL's side: first-call costs are paid every time)."""
    argv = [sys.executable, __file__, "--_ours-child", "--preset", a.preset, "--iterations", str(a.iterations),
            "--batch", str(a.batch), "--mini-batch", str(a.mini_batch), "--response-length", str(a.response_length),
            "--epochs", str(a.epochs), "--lr", str(a.lr)]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=str(ROOT))
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("BENCH ")]
    if r.returncode or not lines:
        raise SystemExit(f"our side failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return json.loads(lines[-1][6:])


def run_trl(py: Path, models: dict, a) -> tuple[dict | None, str]:
    args = {"policy": models["policy"], "reward": models["reward"], "prompt_ids": prompt_ids_like_ours(models),
            "batch": a.batch, "mini_batch": a.mini_batch, "iterations": a.iterations,
            "response_length": a.response_length, "epochs": a.epochs, "lr": a.lr, "out": str(OUT / "trl-run")}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_DISABLED="true")
    r = subprocess.run([str(py), "-c", TRL_SIDE, json.dumps(args)], capture_output=True, text=True, env=env,
                       cwd=str(OUT))
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("BENCH ")]
    if r.returncode or not lines:
        return None, f"TRL {TRL_VERSION}: FAILED (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}"
    return json.loads(lines[-1][6:]), ""


def prompt_ids_like_ours(models: dict) -> list[list[int]]:
    from llama2_align.chat import encode_prompt
    from llama2_align.data import read_records
    from llama2_align.tokenizer import load_tokenizer

    tok = load_tokenizer(models["policy"])
    return [encode_prompt(tok, r.context_messages()) for r in read_records(models["prompts"], "prompts")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="model preset for policy/value/reward (random init)")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32, help="rollouts per iteration")
    ap.add_argument("--mini-batch", type=int, default=16)
    ap.add_argument("--response-length", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--repeat", type=int, default=3, help="runs per side (alternating; medians reported)")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--_ours-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from _common import print_table

    models = build_models(a.preset, 0)
    if a._ours_child:
        print("BENCH " + json.dumps(run_ours(models, a)))
        return
    print(f"models: {models['policy']} / {models['reward']} ({a.preset}); {a.iterations} iterations x {a.batch} "
          f"rollouts, response <= {a.response_length} tokens, {a.epochs} PPO epoch(s), mini-batch {a.mini_batch}; "
          f"{a.repeat} run(s) per side, alternating, each in a fresh process; medians")
    py, why = (None, "skipped (--skip-trl)") if a.skip_trl else ensure_trl_venv()
    ours_runs, trl_runs, trl_note = [], [], "" if py else f"TRL {TRL_VERSION}: NOT RUN: {why}"
    for _ in range(a.repeat):
        ours_runs.append(run_ours_fresh(a))
        if py is not None and not trl_note:
            res, trl_note = run_trl(py, models, a)
            if res is not None:
                trl_runs.append(res)
    med = statistics.median
    it_s, call_s = med(r["iteration_seconds"] for r in ours_runs), med(r["seconds"] for r in ours_runs)
    samples = ours_runs[0]["samples"]
    rows = [["llama2_align run_ppo (iterations only)", it_s, samples / it_s],
            ["llama2_align run_ppo (whole call: loads 5 models, saves)", call_s, samples / call_s]]
    if trl_runs:
        trl_s = med(r["seconds"] for r in trl_runs)
        rows.append([f"TRL {trl_runs[0]['trl']} PPOTrainer.train()", trl_s, trl_runs[0]["samples"] / trl_s])
        rows.append(["ratio, iterations (ours / TRL, samples/s)", "", f"{rows[0][2] / rows[2][2]:.2f}x"])
        rows.append(["ratio, whole call (ours / TRL, samples/s)", "", f"{rows[1][2] / rows[2][2]:.2f}x"])
    print_table("PPO on CPU: wall time, median of the runs (ours: the PPO iterations, and the whole run_ppo call; "
                "TRL: trainer.train(); the ratios compare both with train())", ["run", "seconds", "samples/s"], rows)
    print("\nevery run (s): ours iterations " + ", ".join(f"{r['iteration_seconds']:.2f}" for r in ours_runs)
          + "; ours whole call " + ", ".join(f"{r['seconds']:.2f}" for r in ours_runs)
          + ("; TRL train() " + ", ".join(f"{r['seconds']:.2f}" for r in trl_runs) if trl_runs else ""))
    if trl_note:
        print("\n" + trl_note)


if __name__ == "__main__":
    main()

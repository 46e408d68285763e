"""The GPU benchmark in one script: rollout, training steps and RM scoring on Llama-2-7B shapes, against the goals.

Runs, one after the other, each in its own process (so each starts with the whole GPU) and under its own time limit:
1. ``bench/rollout.py --device cuda --preset llama2-7b --batch 1 8 32``: the rollout engine (static KV cache, CUDA-graph
   decode step) against transformers' eager ``generate``, bf16 random weights, beside the memory-bandwidth floor;
2. ``bench/train.py --device cuda --preset llama2-7b --lora``: the SFT, RM and PPO-update steps with LoRA (MFU at
   4N FLOPs per token) and RM scoring (MFU at 2N).
Then prints the issue's goals next to the figures reached:
- rollout at batch 32: >= 5,000 tokens/s (stock eager generate: ~394 on an H200);
- LoRA training step: >= 40% MFU; RM scoring: >= 60% MFU.
The whole script is sized to finish within 8 minutes on one H100/H200 (``--budget-s``, default 450 s, split 55/45
between the two parts). ``--device cpu --preset tiny`` runs the same code paths on a CPU (no MFU there).

    python bench/gpu.py                 # on a GPU machine
    python bench/gpu.py --device cpu --preset tiny --quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

GOAL_ROLLOUT_TPS = 5000.0
GOAL_TRAIN_MFU = 0.40
GOAL_SCORE_MFU = 0.60


def _part(name: str, argv: list[str], timeout_s: float) -> tuple[list[dict], str]:
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        out = Path(tmp) / "figures.json"
        t = time.perf_counter()
        print(f"\n=== {name}: {' '.join(argv)} (limit {timeout_s:.0f} s)", flush=True)
        try:
            proc = subprocess.run([sys.executable, *argv, "--json", str(out)], cwd=HERE.parent, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return [], f"{name}: stopped at its {timeout_s:.0f} s limit"
        note = f"{name}: {time.perf_counter() - t:.0f} s"
        if proc.returncode != 0:
            return [], f"{name}: FAILED (exit {proc.returncode}); see its output above"
        return (json.loads(out.read_text()) if out.exists() else []), note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--preset", default=None, help="default llama2-7b (cuda), tiny (cpu)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="time for both parts together")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and steps (a smoke run)")
    a = ap.parse_args()
    preset = a.preset or ("llama2-7b" if a.device == "cuda" else "tiny")
    sys.path.insert(0, str(HERE))
    from _common import print_table

    rollout_argv = ["bench/rollout.py", "--device", a.device, "--preset", preset, "--batch", "1", "8", "32"]
    train_argv = ["bench/train.py", "--device", a.device, "--preset", preset,
                  "--stages", "sft", "rm", "ppo", "score"]
    if a.device == "cuda":
        # PPO holds two 7B models (policy, value) and their activations: micro-batch 1 at 2048 tokens fits an H100
        train_argv += ["--lora", "--seq-len", "2048", "--micro-batch", "1"]
    if a.quick:
        rollout_argv += ["--new-tokens", "16", "--repeat", "1"]
        train_argv += ["--steps", "1"]
    rollout, note_r = _part("rollout", rollout_argv, a.budget_s * 0.55)
    train, note_t = _part("training and scoring", train_argv, a.budget_s * 0.45)

    def pick(records, **match):
        return next((r for r in records if all(r.get(k) == v for k, v in match.items())), None)

    rows = []
    eng, stock = pick(rollout, decoder="engine", batch=32), pick(rollout, decoder="generate", batch=32)
    if eng:
        floor = eng.get("floor_ms_per_step")
        rows.append(["rollout tokens/s, batch 32", f"{eng['tokens_per_s']:,.0f}", f">= {GOAL_ROLLOUT_TPS:,.0f}",
                     ("met" if eng["tokens_per_s"] >= GOAL_ROLLOUT_TPS else "NOT met") if a.device == "cuda" else "-",
                     (f"generate {stock['tokens_per_s']:,.0f} tok/s; " if stock else "")
                     + f"{eng['ms_per_step']:.2f} ms/step" + (f" (floor {floor:.2f})" if floor else "")])
    for stage, goal in (("SFT", GOAL_TRAIN_MFU), ("RM", GOAL_TRAIN_MFU), ("PPO update", GOAL_TRAIN_MFU),
                        ("RM scoring", GOAL_SCORE_MFU)):
        r = pick(train, stage=stage)
        if r is None:
            continue
        mfu = r.get("mfu")
        rows.append([f"{stage} MFU ({'LoRA, ' if r['lora'] and stage != 'RM scoring' else ''}"
                     f"{r['flops_per_token']} FLOPs/token)", f"{100 * mfu:.1f}%" if mfu is not None else "n/a",
                     f">= {100 * goal:.0f}%", ("met" if mfu >= goal else "NOT met") if mfu is not None else "-",
                     f"{r['tokens_per_s']:,.0f} tokens/s"])
    device = (rollout or train or [{}])[0].get("device", a.device)
    print_table(f"goals on {device} ({preset})", ["figure", "reached", "goal", "verdict", "detail"], rows)
    print("\n" + "; ".join(n for n in (note_r, note_t) if n))
    if not rollout or not train:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""The GPU check in one script, on Llama-2-7B shapes, against the goals. Sized to finish within 10 minutes on one
H100/H200 (``--budget-s``, default 560 s, shared among the parts).

Each part runs in its own process (so each starts with the whole GPU) under its own time limit:
1. rollout: ``bench/rollout.py --preset llama2-7b --batch 32``: the rollout engine (static KV cache, CUDA-graph decode
   step) beside transformers' eager ``generate``, bf16 random weights; goal: ms per decode step <= 1.25x the
   memory-bandwidth floor it prints (weight bytes / HBM bandwidth);
2. training and scoring: ``bench/train.py --preset llama2-7b --lora --stages sft rm score``: the SFT and RM steps
   with LoRA (goal >= 40% MFU at 4N FLOPs per token) and RM scoring (goal >= 60% MFU at 2N);
3. PPO: ``bench/ppo_run.py --preset llama2-7b --lora``: the real PPO stage (``run_ppo``) for 2 iterations of 32
   rollouts x 64 tokens, LoRA, bf16, the CUDA-graph decode, five roles of 7B shapes on one GPU; goal: it runs, with
   the CUDA-graph decode;
4. FSDP: ``bench/ppo_run.py --preset small --lora --launch 1 --sharding fsdp --resume-check``: the PPO stage under
   torchrun with NCCL at world size 1, FSDP2 (bf16 base, float32 adapters), its DCP checkpoint, the final model
   gathered, then a resume from the checkpoint; goal: it runs.
Then it prints the goals beside the figures reached (``--out FILE`` also writes every figure as JSON).

On the GPU machine (its image has torch, transformers, peft, accelerate, sentencepiece, safetensors, matplotlib, but
no pydantic): carry pydantic's wheels (``bench/gpu_wheels.sh`` downloads them into ``.whl/``; bench/README.md says
how), then ``python3 bench/gpu.py``. ``--device cpu --preset micro --quick`` runs every part's code on a CPU (the CI
smoke test; no MFU, no goal verdicts there).
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

GOAL_FLOOR_RATIO = 1.25  # rollout ms/step at batch 32 over the memory-bandwidth floor
GOAL_TRAIN_MFU = 0.40
GOAL_SCORE_MFU = 0.60
# of --budget-s; the PPO part loads five 7B roles (and writes the one checkpoint they come from) before it compiles
SHARES = {"rollout": 0.24, "training and scoring": 0.20, "ppo": 0.42, "fsdp": 0.14}


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
        figures = json.loads(out.read_text()) if out.exists() else []
        if proc.returncode != 0:
            return figures, f"{name}: FAILED (exit {proc.returncode}); see its output above"
        return figures, note


def commands(device: str, preset: str, quick: bool) -> dict[str, list[str]]:
    cuda = device == "cuda"
    cmds = {
        "rollout": ["bench/rollout.py", "--device", device, "--preset", preset, "--batch", "32"],
        "training and scoring": ["bench/train.py", "--device", device, "--preset", preset,
                                 "--stages", "sft", "rm", "score"],
        "ppo": ["bench/ppo_run.py", "--device", device, "--preset", preset, "--lora", "--iterations", "2"],
        "fsdp": ["bench/ppo_run.py", "--device", device, "--preset", "small" if cuda else preset, "--lora",
                 "--iterations", "2", "--batch", "8", "--new-tokens", "16", "--launch", "1", "--sharding", "fsdp"],
    }
    if cuda:
        cmds["training and scoring"] += ["--lora", "--seq-len", "2048", "--micro-batch", "2"]
    if quick:
        cmds["rollout"] += ["--new-tokens", "16", "--repeat", "1"]
        cmds["training and scoring"] += ["--steps", "1"]
        cmds["ppo"] += ["--batch", "8", "--new-tokens", "8"]
    else:
        cmds["fsdp"] += ["--resume-check"]
    return cmds


def goal_rows(results: dict[str, list[dict]], cuda: bool) -> list[list[str]]:
    def pick(part, **match):
        return next((r for r in results.get(part, []) if all(r.get(k) == v for k, v in match.items())), None)

    def verdict(ok: bool) -> str:
        return ("met" if ok else "NOT met") if cuda else "-"

    rows = []
    eng, stock = pick("rollout", decoder="engine", batch=32), pick("rollout", decoder="generate", batch=32)
    if eng:
        floor = eng.get("floor_ms_per_step")
        ratio = eng["ms_per_step"] / floor if floor else None
        rows.append(["rollout ms/step, batch 32", f"{eng['ms_per_step']:.2f}" + (f" ({ratio:.2f}x floor)" if ratio
                                                                                 else ""),
                     f"<= {GOAL_FLOOR_RATIO}x floor" + (f" ({GOAL_FLOOR_RATIO * floor:.2f})" if floor else ""),
                     verdict(ratio is not None and ratio <= GOAL_FLOOR_RATIO),
                     f"{eng['tokens_per_s']:,.0f} tok/s" + (f"; generate {stock['tokens_per_s']:,.0f} tok/s, "
                                                            f"{stock['ms_per_step']:.2f} ms/step" if stock else "")])
    for stage, goal in (("SFT", GOAL_TRAIN_MFU), ("RM", GOAL_TRAIN_MFU), ("RM scoring", GOAL_SCORE_MFU)):
        r = pick("training and scoring", stage=stage)
        if r is None:
            continue
        mfu = r.get("mfu")
        rows.append([f"{stage} MFU ({'LoRA, ' if r['lora'] and stage != 'RM scoring' else ''}"
                     f"{r['flops_per_token']} FLOPs/token)", f"{100 * mfu:.1f}%" if mfu is not None else "n/a",
                     f">= {100 * goal:.0f}%", verdict(mfu is not None and mfu >= goal),
                     f"{r['tokens_per_s']:,.0f} tokens/s"])
    ppo = pick("ppo")
    if ppo:
        its = ppo.get("iteration_s") or []
        rows.append([f"PPO, {ppo['iterations']} iterations ({'LoRA, ' if ppo['lora'] else ''}{ppo['dtype']})",
                     ("ran, " + (f"{its[-1]:.1f} s/iteration" if its else "")) if ppo["ok"] else "FAILED",
                     "runs, CUDA-graph decode", verdict(ppo["ok"] and ppo.get("decode") == "cuda-graph"),
                     f"decode {ppo.get('decode', '?')}; rollout {ppo.get('rollout_tokens_per_s', 0):,.0f} tok/s"
                     + (f"; peak {ppo['peak_gib']} GiB" if "peak_gib" in ppo else "")])
    fs = pick("fsdp")
    if fs:
        rows.append([f"FSDP step, world size {fs.get('world_size', 1)}, torchrun ({fs['preset']})",
                     "ran" + (f", resumed from {fs['resumed_from']}" if fs.get("resumed_from") else "")
                     if fs["ok"] else "FAILED", "runs (DCP checkpoint, gathered final)", verdict(fs["ok"]),
                     f"{fs.get('sharded', '?')}; DCP files {', '.join(fs.get('checkpoint_files', []))}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--preset", default=None, help="default llama2-7b (cuda), micro (cpu)")
    ap.add_argument("--budget-s", type=float, default=560.0, help="time for all parts together")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and steps, no resume check (a smoke run)")
    ap.add_argument("--parts", nargs="+", default=list(SHARES), choices=list(SHARES))
    ap.add_argument("--out", default=None, help="also write every part's figures to this JSON file")
    a = ap.parse_args()
    preset = a.preset or ("llama2-7b" if a.device == "cuda" else "micro")
    sys.path.insert(0, str(HERE))
    from _common import print_table

    cmds = commands(a.device, preset, a.quick)
    results: dict[str, list[dict]] = {}
    notes = []
    for name in a.parts:
        results[name], note = _part(name, cmds[name], a.budget_s * SHARES[name])
        notes.append(note)
    rows = goal_rows(results, a.device == "cuda")
    device = next((r[0]["device"] for r in results.values() if r), a.device)
    print_table(f"goals on {device} ({preset})", ["figure", "reached", "goal", "verdict", "detail"], rows)
    print("\n" + "; ".join(notes))
    if a.out:
        Path(a.out).write_text(json.dumps({"preset": preset, "device": device, "notes": notes, "results": results},
                                          indent=1))
    if not all(results.get(name) for name in a.parts) or any("FAILED" in n or "limit" in n for n in notes):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""The memory plan's estimates (``llama2_align.plan``) against measured peaks on the CPU, for the small presets.

Each measurement runs in a fresh subprocess: it builds the stage's models as the stage does (``build_model``, float32
on the CPU), then runs one SFT step, one reward-model step (chosen + rejected), or one PPO iteration (a rollout with
the static KV cache, the no-grad scoring of policy, reference, value and both reward models, and one policy + value
update), under torch's profiler with ``profile_memory``. Two figures come back:

- tensor peak: the highest total of live CPU tensor bytes that torch's allocator reported during the run (models
  built inside the profiled region, so weights, gradients and AdamW state are in it);
- RSS growth: ``ru_maxrss`` at the end minus ``ru_maxrss`` after the imports, in a second run of the same step
  without the profiler (what the OS saw: tensors plus the allocator's slack, Python objects and thread buffers).

The estimate is the plan's total for the same shapes and batch (no reserve). Ratio = estimate / measured.

With ``--device cuda`` (a GPU; bf16) the measured figure is ``torch.cuda.max_memory_allocated`` over the same run
(the caching allocator's peak of live tensors) and the RSS column is the allocator's peak reserved memory.

    .venv/bin/python bench/plan_check.py [--presets micro,tiny,small] [--stages sft,reward,ppo] [--lora]
                                         [--device cpu|cuda] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (micro-batch, sequence length) per preset for SFT/RM; PPO: (rollouts, prompt, new tokens, micro-batch)
SIZES = {"micro": dict(b=16, s=128, ppo=(32, 64, 24, 16)),
         "tiny": dict(b=16, s=256, ppo=(32, 96, 32, 16)),
         "small": dict(b=8, s=512, ppo=(16, 128, 48, 8))}


def _configs(preset: str, stage: str, lora: bool | str, dtype: str = "fp32"):
    from llama2_align.model import LoraSettings
    from llama2_align.stages.ppo import PPOConfig
    from llama2_align.stages.reward import RewardConfig
    from llama2_align.stages.sft import SFTConfig

    sz = SIZES[preset]
    lo = LoraSettings(enabled=bool(lora), r=8, alpha=16, dropout=0.0, quantize="nf4" if lora == "qlora" else "none")
    if stage == "sft":
        return SFTConfig(micro_batch_size=sz["b"], batch_size=sz["b"], max_length=sz["s"], dtype=dtype, lora=lo)
    if stage == "reward":
        return RewardConfig(micro_batch_size=sz["b"], batch_size=sz["b"], max_length=sz["s"], dtype=dtype, lora=lo)
    n, prompt, new, micro = sz["ppo"]
    return PPOConfig(prompts_per_iteration=n, mini_batch_size=n, micro_batch_size=micro, generation_batch_size=n,
                     score_batch_size=n, max_new_tokens=new, dtype=dtype, lora=lo), prompt


def child(preset: str, stage: str, lora: bool | str, profiled: bool, device: str = "cpu") -> dict:
    import contextlib
    import resource

    import torch
    from torch.profiler import ProfilerActivity, profile

    from llama2_align import ppo_core as core
    from llama2_align.generation import generate_ids
    from llama2_align.model import build_model, build_reference
    from llama2_align.stages.ppo import Batch, _sub, policy_forward, value_forward

    torch.manual_seed(0)
    torch.set_num_threads(1)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cuda = device == "cuda"
    dtype = "bf16" if cuda else "fp32"
    cfg = _configs(preset, stage, lora, dtype)
    if cuda:  # pragma: no cover - GPU only
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
        alloc0 = torch.cuda.memory_allocated()
        profiled = False
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True) if profiled else contextlib.nullcontext()
    with prof:
        if stage in ("sft", "reward"):
            role = "policy" if stage == "sft" else "reward"
            model = build_model(preset, role, lora=cfg.lora, dtype=dtype, device=device)
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            vocab = model.config.vocab_size
            rows = cfg.micro_batch_size * (2 if stage == "reward" else 1)
            ids = torch.randint(3, vocab, (rows, cfg.max_length), device=device)
            mask = torch.ones_like(ids)
            if stage == "sft":
                loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            else:
                r = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
                c, j = r.chunk(2)
                loss = -torch.nn.functional.logsigmoid(c - j).mean()
            loss.backward()
            opt.step()
        else:
            cfg, prompt = cfg
            policy = build_model(preset, "policy", lora=cfg.lora, dtype=dtype, device=device)
            reference = build_reference(policy, preset, dtype=dtype, device=device)
            value = build_model(preset, "value", lora=cfg.lora, dtype=dtype, device=device)
            rms = [build_model(preset, "reward", dtype=dtype, device=device) for _ in range(2)]
            opt_p = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
            opt_v = torch.optim.AdamW([p for p in value.parameters() if p.requires_grad], lr=1e-5)
            vocab = policy.config.vocab_size
            prompts = torch.randint(3, vocab, (cfg.prompts_per_iteration, prompt)).tolist()
            responses = generate_ids(policy, prompts, eos_token_id=vocab + 7, pad_token_id=0,  # no EOS: full length
                                     max_new_tokens=cfg.max_new_tokens,
                                     generator=torch.Generator(device=device).manual_seed(0))
            batch = Batch(prompts, responses, 0, torch.device(device))
            with torch.no_grad():
                old_lp, _, _ = policy_forward(policy, batch)
                with reference.model() as ref:
                    ref_lp, _, _ = policy_forward(ref, batch)
                old_v = value_forward(value, batch)
                for rm in rms:
                    rm(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            policy.train()
            value.train()
            rows = torch.arange(cfg.micro_batch_size, device=device)
            sub = _sub(batch, rows)
            lp, _, _ = policy_forward(policy, sub, with_entropy=True)
            adv = torch.randn_like(lp)
            pl, _ = core.policy_loss(lp, old_lp[rows], adv, sub.mask, cfg.clip_range)
            v = value_forward(value, sub)
            vl, _ = core.value_loss(v, old_v[rows], torch.randn_like(v), sub.mask, cfg.value_clip_range)
            pl.backward()
            vl.backward()
            opt_p.step()
            opt_v.step()
    if cuda:  # pragma: no cover - GPU only
        torch.cuda.synchronize()
        return {"tensor_peak": torch.cuda.max_memory_allocated() - alloc0,
                "rss_growth": torch.cuda.max_memory_reserved()}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    if not profiled:
        return {"rss_growth": rss}
    allocs = []

    def walk(node):
        ef = node.extra_fields
        if type(ef).__name__ == "_ExtraFields_Allocation":  # CPU only here
            allocs.append((node.start_time_ns, ef.alloc_size, ef.total_allocated))
        for c in node.children:
            walk(c)
    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    allocs.sort()
    base = allocs[0][2] - allocs[0][1] if allocs else 0
    peak = max(a[2] for a in allocs) - base if allocs else 0
    return {"tensor_peak": peak}


def estimate(preset: str, stage: str, lora: bool | str, device: str = "cpu") -> dict:
    from llama2_align.plan import estimate as plan_estimate
    from llama2_align.plan import model_shape

    cfg = _configs(preset, stage, lora, "bf16" if device == "cuda" else "fp32")
    shape = model_shape(preset)
    if stage == "ppo":
        cfg, prompt = cfg
        est = plan_estimate("ppo", shape, cfg, prompt_tokens=prompt, device=device)
    else:
        est = plan_estimate(stage, shape, cfg, device=device)
    return {"estimate": est.total, "weights": est.weights, "grads": est.grads, "optim": est.optim,
            "activations": est.activations, "kv_cache": est.kv_cache}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="micro,tiny,small")
    ap.add_argument("--stages", default="sft,reward,ppo")
    ap.add_argument("--lora", action="store_true", help="LoRA (r 8, no dropout) instead of full fine-tuning")
    ap.add_argument("--qlora", action="store_true", help="QLoRA: LoRA over a 4-bit NF4 base (bitsandbytes)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", help="write the rows here too")
    ap.add_argument("--child", nargs=5, metavar=("PRESET", "STAGE", "LORA", "PROFILED", "DEVICE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind = {"0": False, "1": True, "q": "qlora"}[args.child[2]]
        print(json.dumps(child(args.child[0], args.child[1], kind, args.child[3] == "1", args.child[4])))
        return
    lora = "qlora" if args.qlora else args.lora
    rows = []
    mib = 2**20
    print(f"{'preset':<7}{'stage':<8}{'lora':<6}{'estimate':>11}{'tensor peak':>13}{'ratio':>7}{'RSS growth':>12}"
          f"{'ratio':>7}   estimate = weights + grads + optim + activations/logits + kv (MiB)")
    for preset in args.presets.split(","):
        for stage in args.stages.split(","):
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            measured = {}
            # CPU: the tensor peak under the profiler, RSS in a run without it (the profiler's own buffers); CUDA: one
            for profiled in ("1", "0") if args.device == "cpu" else ("0",):
                flag = "q" if lora == "qlora" else "1" if lora else "0"
                out = subprocess.run([sys.executable, __file__, "--child", preset, stage, flag, profiled, args.device],
                                     capture_output=True, text=True, env=env, check=True)
                measured.update(json.loads(out.stdout.strip().splitlines()[-1]))
            est = estimate(preset, stage, lora, args.device)
            row = {"preset": preset, "stage": stage, "lora": lora, **est, **measured,
                   "ratio_tensor": est["estimate"] / measured["tensor_peak"],
                   "ratio_rss": est["estimate"] / measured["rss_growth"]}
            rows.append(row)
            parts = " + ".join(f"{est[k] / mib:.1f}" for k in ("weights", "grads", "optim", "activations",
                                                                "kv_cache"))
            kind = "q" if lora == "qlora" else "yes" if lora else "no"
            print(f"{preset:<7}{stage:<8}{kind:<6}{est['estimate'] / mib:>9.1f}Mi"
                  f"{measured['tensor_peak'] / mib:>11.1f}Mi{row['ratio_tensor']:>7.2f}"
                  f"{measured['rss_growth'] / mib:>10.1f}Mi{row['ratio_rss']:>7.2f}   {parts}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

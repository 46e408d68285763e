"""Training-step throughput: tokens/s and MFU of the SFT, reward-model and PPO update steps.

Each step is the stage's own computation on random tokens (no data loading, no evaluation, no checkpoints):
- SFT: causal-LM forward + loss + backward + AdamW step (``build_model(.., "policy")``);
- RM: chosen and rejected sequences through the scalar-head model, the pairwise loss -log sigmoid(r_c - r_r - m),
  backward, AdamW step (``build_model(.., "reward")``); tokens counted = chosen + rejected tokens;
- RM scoring (``score``): the frozen reward model scoring sequences of mixed lengths with the stage's own
  ``RewardScorer.score_ids`` (sorted by length, batched, no graph); tokens counted = real (unpadded) tokens;
- PPO update: the PPO stage's ``policy_forward`` + clipped policy loss and ``value_forward`` + clipped value loss,
  backward through both models, both optimizer steps (``llama2_align.stages.ppo``/``ppo_core``); tokens counted =
  sequence tokens of the policy batch (the value model's pass on the same tokens is in the FLOP count below).

FLOPs per token (N = parameters of one model, attention FLOPs left out):
- LoRA (frozen base): 4N — forward 2N + backward through the activations 2N; the weight gradients of the frozen
  base are never formed (the adapters add < 1%). This is the issue's "4N FLOPs per token" rule.
- full fine-tuning: 6N — forward 2N + backward 4N (activation and weight gradients).
- PPO update: two models (policy and value) on every token: (4 or 6) x (N_policy + N_value).
- RM scoring: forward only, 2N.
MFU = tokens/s x FLOPs per token / peak dense bf16 FLOP/s of the card (table: H100/H200 989 TFLOP/s, A100 312).

    python bench/train.py                                  # CPU, tiny preset, full fine-tuning, tokens/s
    python bench/train.py --device cuda --preset llama2-7b --lora --seq-len 4096 --micro-batch 1
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _common import PEAK_BF16, device_name, lookup, print_table, random_model, sync, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default=None, help="default: tiny (cpu), llama2-7b (cuda)")
    ap.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                    help="LoRA on all projections (default: on for cuda, off for cpu)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 128 (cpu), 2048 (cuda)")
    ap.add_argument("--micro-batch", type=int, default=None, help="default 8 (cpu), 2 (cuda)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per stage (after one warm-up)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--stages", nargs="+", default=["sft", "rm", "ppo", "score"],
                    choices=["sft", "rm", "ppo", "score"])
    ap.add_argument("--score-batch", type=int, default=None, help="RM scoring batch (default 32 cpu, 16 cuda)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file (bench/gpu.py reads it)")
    args = ap.parse_args()
    records: list[dict] = []

    from llama2_align import ppo_core as core
    from llama2_align.model import LoraSettings, trainable_parameters
    from llama2_align.stages.ppo import Batch, policy_forward, value_forward

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = args.preset or ("llama2-7b" if cuda else "tiny")
    lora_on = args.lora if args.lora is not None else cuda
    seq = args.seq_len or (2048 if cuda else 128)
    mb = args.micro_batch or (2 if cuda else 8)
    dtype = torch.bfloat16 if cuda else torch.float32
    lora = LoraSettings(enabled=True, r=16, alpha=32, dropout=0.0) if lora_on else None
    peak = lookup(PEAK_BF16, torch.cuda.get_device_name(device)) if cuda else None
    flops_rule = 4 if lora_on else 6
    print(f"device: {device_name(device)}; preset {preset}; {'LoRA r=16' if lora_on else 'full fine-tuning'}; "
          f"seq {seq}, micro-batch {mb}; {dtype}; FLOPs/token = {flops_rule}N per model"
          + (f"; peak {peak / 1e12:.0f} TFLOP/s" if peak else ""))

    def build(role):
        m = random_model(preset, device, dtype, role=role, lora=lora)
        if args.gradient_checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(m, "enable_input_require_grads"):
                m.enable_input_require_grads()
        m.train()
        return m

    def opt_for(m):
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5,
                                 fused=True if cuda else None)

    g = torch.Generator().manual_seed(0)
    rows = []

    def report(stage, n_models, n_params, tokens_per_step, seconds, flops_per_param=None):
        tps = tokens_per_step / seconds
        rule = flops_per_param or flops_rule
        mfu = tps * rule * n_params / peak if peak else None
        rows.append([stage, n_models, f"{n_params / 1e6:,.1f} M", tokens_per_step, seconds * 1e3, tps,
                     f"{100 * mfu:.1f}%" if mfu is not None else "n/a"])
        records.append({"stage": stage, "tokens_per_s": tps, "mfu": mfu, "flops_per_token": f"{rule}N",
                        "lora": bool(lora_on), "preset": preset, "device": device_name(device)})

    if "sft" in args.stages:
        model = build("policy")
        vocab = model.config.vocab_size
        opt = opt_for(model)
        ids = torch.randint(3, vocab, (mb, seq), generator=g).to(device)

        def sft_step():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        sft_step()
        t = sum(timed(sft_step, device) for _ in range(args.steps)) / args.steps
        report("SFT", 1, trainable_parameters(model)[1], mb * seq, t)
        del model, opt
        if cuda:  # pragma: no cover
            torch.cuda.empty_cache()

    if "rm" in args.stages:
        model = build("reward")
        vocab = model.config.vocab_size
        opt = opt_for(model)
        chosen = torch.randint(3, vocab, (mb, seq), generator=g).to(device)
        rejected = torch.randint(3, vocab, (mb, seq), generator=g).to(device)
        margin = torch.full((mb,), 0.5, device=device)

        def rm_step():
            r = model(input_ids=torch.cat([chosen, rejected]), use_cache=False).logits.squeeze(-1).float()
            loss = -F.logsigmoid(r[:mb] - r[mb:] - margin).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        rm_step()
        t = sum(timed(rm_step, device) for _ in range(args.steps)) / args.steps
        report("RM", 1, trainable_parameters(model)[1], 2 * mb * seq, t)
        del model, opt
        if cuda:  # pragma: no cover
            torch.cuda.empty_cache()

    if "ppo" in args.stages:
        policy, value = build("policy"), build("value")
        vocab = policy.config.vocab_size
        opt_p, opt_v = opt_for(policy), opt_for(value)
        p_len = seq // 2
        prompts = torch.randint(3, vocab, (mb, p_len), generator=g).tolist()
        responses = torch.randint(3, vocab, (mb, seq - p_len), generator=g).tolist()
        batch = Batch(prompts, responses, 0, device)
        with torch.no_grad():
            old_logp, _, _ = policy_forward(policy, batch)
            old_values = value_forward(value, batch)
        adv = torch.randn_like(old_logp)
        returns = old_values + torch.randn_like(old_values)

        def ppo_step():
            lp, _, _ = policy_forward(policy, batch)
            pl, _ = core.policy_loss(lp, old_logp, adv, batch.mask, 0.2)
            v = value_forward(value, batch)
            vl, _ = core.value_loss(v, old_values, returns, batch.mask, 0.2)
            pl.backward()
            vl.backward()
            opt_p.step()
            opt_v.step()
            opt_p.zero_grad(set_to_none=True)
            opt_v.zero_grad(set_to_none=True)

        ppo_step()
        t = sum(timed(ppo_step, device) for _ in range(args.steps)) / args.steps
        report("PPO update", 2, trainable_parameters(policy)[1] + trainable_parameters(value)[1], mb * seq, t)
        sync(device)
        del policy, value, opt_p, opt_v, batch
        if cuda:  # pragma: no cover
            torch.cuda.empty_cache()

    if "score" in args.stages:
        from types import SimpleNamespace

        from llama2_align.model import freeze
        from llama2_align.stages.reward import RewardScorer

        model = freeze(random_model(preset, device, dtype, role="reward"))
        vocab = model.config.vocab_size
        n_seq = 4 * (args.score_batch or (16 if cuda else 32))
        lengths = torch.randint(seq // 2, seq + 1, (n_seq,), generator=g).tolist()  # mixed lengths, as rollouts
        seqs = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
        scorer = RewardScorer("random", model=model, tokenizer=SimpleNamespace(pad_token_id=0),
                              batch_size=args.score_batch or (16 if cuda else 32))

        def score_all():
            scorer.score_ids(seqs)

        score_all()
        t = sum(timed(score_all, device) for _ in range(args.steps)) / args.steps
        report("RM scoring", 1, sum(p.numel() for p in model.parameters()), sum(lengths), t, flops_per_param=2)
        del model, scorer

    print_table(f"training steps on {device_name(device)}",
                ["stage", "models", "params (all models)", "tokens/step", "ms/step", "tokens/s", "MFU"], rows)
    if not peak:
        print("MFU: n/a (no peak FLOP figure for this device; on CPU only tokens/s is reported)")
    if args.json:
        import json
        from pathlib import Path

        Path(args.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()

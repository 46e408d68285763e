"""Training-step throughput: tokens/s and MFU of the SFT, reward-model and PPO update steps.

Each step is the stage's own computation on random tokens (no data loading, no evaluation, no checkpoints):
- SFT: causal-LM forward + loss + backward + AdamW step (``build_model(.., "policy")``);
- RM: chosen and rejected sequences through the scalar-head model, the pairwise loss -log sigmoid(r_c - r_r - m),
  backward, AdamW step (``build_model(.., "reward")``); tokens counted = chosen + rejected tokens;
- PPO update: the PPO stage's ``policy_forward`` + clipped policy loss and ``value_forward`` + clipped value loss,
  backward through both models, both optimizer steps (``llama2_align.stages.ppo``/``ppo_core``); tokens counted =
  sequence tokens of the policy batch (the value model's pass on the same tokens is in the FLOP count below).

FLOPs per token (N = parameters of one model, attention FLOPs left out):
- LoRA (frozen base): 4N — forward 2N + backward through the activations 2N; the weight gradients of the frozen
  base are never formed (the adapters add < 1%). This is the issue's "4N FLOPs per token" rule.
- full fine-tuning: 6N — forward 2N + backward 4N (activation and weight gradients).
- PPO update: two models (policy and value) on every token: (4 or 6) x (N_policy + N_value).
MFU = tokens/s x FLOPs per token / peak dense bf16 FLOP/s of the card (table: H100/H200 989 TFLOP/s, A100 312).

    python bench/train.py                                  # CPU, tiny preset, full fine-tuning, tokens/s
    python bench/train.py --device cuda --preset llama2-7b --lora --seq-len 4096 --micro-batch 1
"""

from __future__ import annotations

import argparse

from _common import PEAK_BF16, device_name, lookup, print_table, random_model, sync, timed

import torch
import torch.nn.functional as F


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
    ap.add_argument("--stages", nargs="+", default=["sft", "rm", "ppo"], choices=["sft", "rm", "ppo"])
    args = ap.parse_args()

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

    def report(stage, n_models, n_params, tokens_per_step, seconds):
        tps = tokens_per_step / seconds
        mfu = ""
        if peak:  # pragma: no cover - GPU only
            mfu = f"{100 * tps * flops_rule * n_params / peak:.1f}%"
        rows.append([stage, n_models, f"{n_params / 1e6:,.1f} M", tokens_per_step, seconds * 1e3, tps, mfu or "n/a"])

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

    print_table(f"training steps on {device_name(device)}",
                ["stage", "models", "params (all models)", "tokens/step", "ms/step", "tokens/s", "MFU"], rows)
    if not peak:
        print("MFU: n/a (no peak FLOP figure for this device; on CPU only tokens/s is reported)")


if __name__ == "__main__":
    main()

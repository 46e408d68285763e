"""Rollout throughput: this project's engine (llama2_align.generation.generate_ids) against transformers'
``model.generate`` (eager, dynamic cache) in the same run.

Random weights, left-padded prompts of a fixed length, a fixed number of new tokens with no early EOS (the EOS id is
one the model never produces: min_new_tokens on the transformers side, an out-of-vocabulary id on ours), greedy.
Figures: tokens/s (batch x new tokens / wall time, prefill included) and ms per decode step.

    python bench/rollout.py                       # CPU: tiny and small presets, batch 1, 8, 32
    python bench/rollout.py --device cuda --preset llama2-7b   # bf16 random weights + the memory-bandwidth floor
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import HBM_BANDWIDTH, device_name, lookup, measure_bandwidth, print_table, random_model, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", nargs="+", default=None, help="default: tiny small (cpu), llama2-7b (cuda)")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2, help="best of N timed runs (after one warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-baseline", action="store_true", help="skip transformers' generate")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file (bench/gpu.py reads it)")
    args = ap.parse_args()
    records: list[dict] = []

    from llama2_align.generation import generate_ids

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = args.preset or (["llama2-7b"] if device.type == "cuda" else ["tiny", "small"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device: {device_name(device)}; dtype {dtype}; prompt {args.prompt_len} tokens, {args.new_tokens} new "
          f"tokens, greedy, no early EOS; best of {args.repeat}")

    for preset in presets:
        model = random_model(preset, device, dtype)
        model.eval()
        vocab = model.config.vocab_size
        n_params = sum(p.numel() for p in model.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        floor_ms = None
        if device.type == "cuda":  # pragma: no cover - GPU only
            name = torch.cuda.get_device_name(device)
            bw = lookup(HBM_BANDWIDTH, name)
            how = "table"
            if bw is None:
                bw, how = measure_bandwidth(device), "measured copy"
            floor_ms = weight_bytes / bw * 1e3
            print(f"\n{preset}: {n_params / 1e9:.2f} B params, {weight_bytes / 2**30:.1f} GiB weights; "
                  f"HBM {bw / 1e12:.2f} TB/s ({how}) -> memory-bandwidth floor {floor_ms:.2f} ms per decode step "
                  f"(weights read once per step; KV cache reads not counted)")
        g = torch.Generator().manual_seed(0)
        rows = []
        for batch in args.batch:
            prompts = torch.randint(3, vocab, (batch, args.prompt_len), generator=g)
            prompts[:, 0] = 1
            plist = prompts.tolist()
            never = vocab + 7  # an id outside the vocabulary: no early EOS

            def ours():
                generate_ids(model, plist, eos_token_id=never, pad_token_id=0, max_new_tokens=args.new_tokens,
                             temperature=0.0)

            ids = prompts.to(device)
            att = torch.ones_like(ids)

            def stock():
                with torch.no_grad():
                    model.generate(input_ids=ids, attention_mask=att, do_sample=False,
                                   max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   eos_token_id=2, pad_token_id=0)

            # prefill alone, to separate it from the per-step figure
            def prefill():
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=att, logits_to_keep=1)

            candidates = [("engine (static cache" + (", CUDA graph" if device.type == "cuda" else ", eager") + ")",
                           ours)]
            if not args.no_baseline:
                candidates.append(("transformers generate (dynamic cache, eager)", stock))
            pre = timed(prefill, device, repeat=args.repeat)
            results = {}
            for label, fn in candidates:
                fn()  # warm-up (and, on CUDA, the graph capture)
                t = timed(fn, device, repeat=args.repeat)
                results[label] = t
                step_ms = max(t - pre, 0.0) / max(args.new_tokens - 1, 1) * 1e3
                records.append({"preset": preset, "decoder": "engine" if fn is ours else "generate", "batch": batch,
                                "tokens_per_s": batch * args.new_tokens / t, "ms_per_step": step_ms,
                                "floor_ms_per_step": floor_ms, "device": device_name(device)})
                row = [label, batch, batch * args.new_tokens / t, step_ms]
                if floor_ms is not None:  # pragma: no cover - GPU only
                    row.append(f"{floor_ms:.2f}")
                rows.append(row)
            if len(results) == 2:
                (a, ta), (b, tb) = results.items()
                rows.append(["  speed-up vs transformers", batch, f"{tb / ta:.2f}x", "", *([""] if floor_ms else [])])
        headers = ["decoder", "batch", "tokens/s", "ms/step"] + (["floor ms/step"] if floor_ms is not None else [])
        print_table(f"{preset} ({n_params / 1e6:.1f} M params) on {device_name(device)}", headers, rows)
        model = None  # freed before the next preset
        if device.type == "cuda":  # pragma: no cover - GPU only
            torch.cuda.empty_cache()
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()

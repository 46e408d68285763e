"""The export round trip's token agreement: a demo model trained by SFT, exported to HF and to GGUF (f16, q8_0),
then llama.cpp (llama-cpp-python) against transformers on the same prompts.

Figures: tokenizer ids identical (dialogues in the Llama 2 chat format, answers included), the chat template's
rendering, greedy decoding (prompts whose whole continuation is identical, tokens before the first difference),
teacher-forced top-1 agreement on transformers' greedy continuation, and the largest |logit| difference. Baseline:
transformers on the HF export, in the same run.

    .venv/bin/python bench/export_roundtrip.py                       # micro, 150 SFT steps (the test's model)
    .venv/bin/python bench/export_roundtrip.py --preset tiny --sft-steps 400 --prompts 64
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT  # noqa: E402,F401  (puts the repository on sys.path)

import torch  # noqa: E402


def train_demo_model(root: Path, preset: str, steps: int) -> Path:
    from llama2_align.demo_world import DemoSizes, generate_demo_world, write_demo_datasets
    from llama2_align.pipeline import preset_config
    from llama2_align.stages.sft import SFTConfig, SFTInputs, run_sft
    from llama2_align.tokenizer import train_tokenizer

    sizes = DemoSizes.micro() if preset == "micro" else DemoSizes()
    vocab = 512 if preset == "micro" else 1024
    write_demo_datasets(root / "data", seed=0, sizes=sizes)
    train_tokenizer(generate_demo_world(0, sizes).corpus_texts(), root / "tokenizer", vocab_size=vocab)
    cfg = SFTConfig.model_validate({**preset_config("demo-tiny").sft.model_dump(), "max_steps": steps, "batch_size": 16,
                                    "micro_batch_size": 16, "logging_steps": 50, "eval_steps": 100000,
                                    "save_steps": 100000, "num_samples": 0, "progress_bar": False})
    run_sft(cfg, SFTInputs(base=preset, data=str(root / "data" / "sft.jsonl"), tokenizer=str(root / "tokenizer")),
            root / "sft")
    return root / "sft" / "final"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="micro", choices=["micro", "tiny"])
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--checkpoint", default=None, help="export this policy checkpoint instead of training one "
                                                       "(prompts then come from --prompts-file)")
    ap.add_argument("--prompts-file", default=None, help="eval/prompts JSONL (default: the demo world's eval set)")
    ap.add_argument("--prompts", type=int, default=32, help="greedy prompts (half of them with a system prompt)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    from llama2_align.chat import render_text
    from llama2_align.export import export_checkpoint
    from llama2_align.export_check import compare_with_llamacpp, llamacpp_chat_prompt, open_gguf, tokenizer_mismatches
    from llama2_align.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="export-roundtrip-"))
    t0 = time.perf_counter()
    checkpoint = Path(args.checkpoint) if args.checkpoint else train_demo_model(work, args.preset, args.sft_steps)
    train_s = time.perf_counter() - t0
    prompts_file = Path(args.prompts_file) if args.prompts_file else work / "data" / "eval.jsonl"
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines() if line.strip()]
    system = "You are a careful assistant. Answer briefly."
    n = min(args.prompts, len(prompts))
    dialogs = ([[{"role": "user", "content": p}] for p in prompts[:n // 2]]
               + [[{"role": "system", "content": system}, {"role": "user", "content": p}] for p in prompts[n // 2:n]])

    figures: dict = {"checkpoint": str(checkpoint), "preset": None if args.checkpoint else args.preset,
                     "sft_steps": None if args.checkpoint else args.sft_steps, "train_s": round(train_s, 1),
                     "prompts": n, "max_new_tokens": args.max_new_tokens, "llama_cpp_python": None, "exports": {}}
    import llama_cpp

    figures["llama_cpp_python"] = llama_cpp.__version__
    hf, meta = export_checkpoint(checkpoint, work / "hf", "hf")
    figures["exports"]["hf"] = {"seconds": meta["seconds"], "bytes": meta["bytes"], "parameters": meta["parameters"]}
    tok = load_tokenizer(hf)
    all_dialogs = dialogs + [[{"role": "user", "content": p}] for p in prompts]
    for gguf_type in ("f16", "q8_0"):
        path, meta = export_checkpoint(checkpoint, work / f"model-{gguf_type}.gguf", "gguf", gguf_type)
        bad_tok = tokenizer_mismatches(tok, path, all_dialogs)
        with open_gguf(path, vocab_only=True) as llm:
            template_ok = sum(llamacpp_chat_prompt(llm, d)[0] == render_text(d) for d in dialogs)
        t = time.perf_counter()
        result = compare_with_llamacpp(hf, path, dialogs, args.max_new_tokens)
        result.pop("rows")
        figures["exports"][gguf_type] = {
            "seconds": meta["seconds"], "bytes": meta["bytes"], "tensor_types": meta["tensor_types"],
            "tokenizer_identical": f"{len(all_dialogs) - len(bad_tok)}/{len(all_dialogs)}",
            "chat_template_identical": f"{template_ok}/{len(dialogs)}", "compare_s": round(time.perf_counter() - t, 1),
            **result}

    print(f"checkpoint {checkpoint} ({figures['preset'] or 'given'}, {figures['exports']['hf']['parameters']:,} "
          f"parameters); llama-cpp-python {figures['llama_cpp_python']}; {n} prompts, <= {args.max_new_tokens} "
          "new tokens, greedy")
    head = ("type", "tokenizer ids", "template", "greedy identical", "common prefix", "teacher-forced top-1",
            "max |dlogit|", "size")
    print(" | ".join(head))
    for gguf_type in ("f16", "q8_0"):
        f = figures["exports"][gguf_type]
        print(" | ".join([gguf_type, f["tokenizer_identical"], f["chat_template_identical"],
                          f"{f['greedy_identical']}/{f['prompts']}",
                          f"{f['common_prefix_tokens']}/{f['generated_tokens']}",
                          f"{f['teacher_forced_top1']:.4f}", f"{f['max_abs_logit_diff']:.3g}",
                          f"{f['bytes'] / 2**20:.2f} MiB"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

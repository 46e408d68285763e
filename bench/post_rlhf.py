"""Figures of context distillation and Ghost Attention from a pipeline run, and what they cost.

    .venv/bin/python bench/post_rlhf.py figures runs/demo-post     # tables from <run>/report.json
    .venv/bin/python bench/post_rlhf.py sft-cost [--steps 40]      # SFT time per step, world's SFT set vs extended
    .venv/bin/python bench/post_rlhf.py gatt-cost runs/demo-post   # GAtt's fine-tune: per turn vs per dialogue

``figures`` prints, for a run made with ``--gatt --context-distillation --set
context_distillation.compare_untargeted=true``: adherence to the system instruction by turn with and without GAtt,
the late-turn adherence and helpfulness with paired-bootstrap intervals against the policy GAtt started from,
helpfulness per turn with its interval; context distillation (targeted and untargeted) against the policy before
it (violation rate, borderline false refusals, helpfulness); and each stage's wall time.

``sft-cost`` times the demo-tiny SFT on the world's SFT set and on the extended one (GAtt's and context
distillation's extra demonstrations), the two alternating, and scales the time per step to the planned steps of
each: what the extra data adds to a demo run's SFT. It prints the machine's load average beside the figures.

``gatt-cost`` takes a run's GAtt samples (``<run>/gatt/gatt_samples.json``) and builds GAtt's training data both ways,
``train_on: every_turn`` (one example per sampled turn, the baseline) and ``train_on: dialogue`` (one example per
dialogue, the untrained answers weighted 0): examples, tokens, trained tokens (the same answers, so the same count),
then times one fine-tune epoch of each from GAtt's start policy at one batch size (``--batch-size``, default the
run's ``gatt.sft.batch_size``), the two alternating, medians of ``--repeat``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _f(v, fmt="{:.3f}"):
    return "n/a" if v is None else fmt.format(v)


def _ci(ci):
    return "" if not ci else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def figures(run_dir: str) -> None:
    report = json.loads((Path(run_dir) / "report.json").read_text())
    mt = report.get("multiturn")
    if mt:
        base, order = mt["baseline"], mt["order"]
        cps = mt["checkpoints"]
        print(f"## Multi-turn adherence (baseline {base})\n")
        print("| turn | " + " | ".join(order) + " |\n|" + "---|" * (len(order) + 1))
        for t in range(max(len(cps[n]["adherence_by_turn"]) for n in order)):
            print(f"| {t + 1} | " + " | ".join(_f(cps[n]["adherence_by_turn"][t]) for n in order) + " |")
        late = cps[order[0]]["late_turn"]
        print(f"\n| checkpoint | adherence turn >= {late} | vs {base} (95% CI) | helpfulness turn >= {late} | "
              f"vs {base} (95% CI) |\n|---|---|---|---|---|")
        for n in order:
            ci = cps[n].get("ci") or {}
            print(f"| {n} | {_f(cps[n]['adherence_late'])} | {_ci(ci.get('adherence_late'))} | "
                  f"{_f(cps[n]['helpfulness_late'])} | {_ci(ci.get('helpfulness_late'))} |")
        if "gatt" in cps:
            g = cps["gatt"]
            print(f"\nHelpfulness per turn, gatt vs {base} (difference, 95% CI):\n\n| turn | {base} | gatt | "
                  f"difference CI |\n|---|---|---|---|")
            for t, (b, c) in enumerate(zip(cps[base]["helpfulness_by_turn"], g["helpfulness_by_turn"])):
                print(f"| {t + 1} | {_f(b)} | {_f(c)} | {_ci((g.get('ci') or {}).get('helpfulness_by_turn', [])[t])} |")
            print("\nBy constraint (turn 1 / late):", {n: cps[n]["by_constraint"] for n in (base, "gatt")})
    added = report.get("added_stages") or {}
    cd = [s for s in ("cd", "cd-untargeted") if s in added]
    if cd:
        ref = added[cd[0]]["vs"]
        ev = report["eval"]
        print(f"\n## Context distillation against {ref}\n")
        keys = ("violation_rate", "false_refusal_borderline", "false_refusal_rate", "helpfulness_accuracy",
                "borderline_accuracy", "malformed_rate")
        print("| metric | " + ref + " | " + " | ".join(f"{s} | {s} - {ref} (95% CI)" for s in cd) + " |")
        print("|" + "---|" * (2 + 2 * len(cd)))
        for k in keys:
            cells = [f"{_f(ev[s].get(k))} | {_ci((added[s].get('ci') or {}).get(k))}" for s in cd]
            print(f"| {k} | {_f(ev[ref].get(k))} | " + " | ".join(cells) + " |")
    print("\n## Stage wall times (s)\n")
    for name, s in report["stages"].items():
        print(f"- {name}: {_f(s.get('duration_s'), '{:.1f}')}")


def sft_cost(steps: int, repeat: int) -> None:
    import torch

    from llama2_align.demo_dialogues import corpus_texts, write_extended_sft
    from llama2_align.demo_world import generate_demo_world, write_demo_datasets
    from llama2_align.pipeline import PipelineConfig, resolve
    from llama2_align.stages.sft import SFTInputs, run_sft
    from llama2_align.tokenizer import train_tokenizer

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    work = Path(tempfile.mkdtemp(prefix="sft-cost-"))
    plain = write_demo_datasets(work / "data")["sft"]
    extended, extra = write_extended_sft(work / "data")
    tok = train_tokenizer(list(dict.fromkeys(generate_demo_world(0).corpus_texts() + corpus_texts(extra))),
                          work / "tok", 1024)
    sides = {"world's SFT set": (plain, False), "extended (GAtt + CD demonstrations)": (extended, True)}
    times: dict[str, list[float]] = {k: [] for k in sides}
    planned = {}
    for r in range(repeat):
        for name, (data, group) in sides.items():
            cfg = resolve(PipelineConfig(preset="demo-tiny", gatt=group, context_distillation=group)).sft
            planned[name] = cfg.planned_steps(round(sum(1 for _ in open(data)) * (1 - cfg.val_fraction)))
            cfg = cfg.model_copy(update={"max_steps": steps, "val_fraction": 0.0, "num_samples": 0,
                                         "save_steps": 10_000, "eval_steps": 10_000})
            t = time.perf_counter()
            run_sft(cfg, SFTInputs(base="tiny", data=str(data), tokenizer=str(tok)), work / f"sft-{r}-{group}")
            times[name].append((time.perf_counter() - t) / steps)
    print(f"load average before/after: {os.getloadavg()}")
    for name in sides:
        per = sorted(times[name])[len(times[name]) // 2]
        print(f"{name}: {per:.3f} s/step (median of {repeat}, {steps} steps, includes set-up), planned steps "
              f"{planned[name]} -> {per * planned[name] / 60:.1f} min")


def gatt_cost(run_dir: str, repeat: int, batch_size: int | None, epochs: float) -> None:
    import torch

    from llama2_align.data import read_records, write_jsonl
    from llama2_align.stages.gatt import GAttConfig, sft_config, training_records
    from llama2_align.stages.sft import SFTInputs, run_sft, tokenize_dialogues
    from llama2_align.tokenizer import load_tokenizer

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    stage = Path(run_dir) / "gatt"
    result = json.loads((stage / "result.json").read_text())
    config = GAttConfig(**{k: v for k, v in result["config"].items() if k in GAttConfig.model_fields})
    policy = result["inputs"]["policy"]["path"]
    doc = json.loads((stage / "gatt_samples.json").read_text())
    tok = load_tokenizer(policy)
    bs = batch_size or config.sft.batch_size
    work = Path(tempfile.mkdtemp(prefix="gatt-cost-"))
    sides = {}
    for mode in ("every_turn", "dialogue"):
        cfg = config.model_copy(update={"train_on": mode})
        kept, _ = training_records(doc, cfg, tok)
        data = write_jsonl(kept, work / f"{mode}.jsonl")
        sft = sft_config(cfg)
        rows = tokenize_dialogues(tok, read_records(data, "sft"), last_answer_only=sft.loss_on == "last_answer")
        sides[mode] = (data, sft.model_copy(update={
            "epochs": epochs, "batch_size": bs, "micro_batch_size": bs, "val_fraction": 0.0, "num_samples": 0,
            "save_steps": 10**6, "eval_steps": 10**6, "progress_bar": False}))
        print(f"{mode}: {len(rows)} examples, {sum(len(r['input_ids']) for r in rows)} tokens, "
              f"{sum(sum(r['assistant_masks']) for r in rows)} trained tokens, "
              f"{sides[mode][1].planned_steps(len(rows))} steps at {bs} a batch")
    times: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(repeat):
        for mode, (data, sft) in sides.items():
            t = time.perf_counter()
            run_sft(sft, SFTInputs(base=policy, data=str(data), tokenizer=policy), work / f"sft-{r}-{mode}")
            times[mode].append(time.perf_counter() - t)
    print(f"load average after: {os.getloadavg()}")
    base = sorted(times["every_turn"])[repeat // 2]
    for mode in sides:
        med = sorted(times[mode])[repeat // 2]
        print(f"{mode}: {med:.1f} s for {epochs:g} epoch(s) (median of {repeat}, includes set-up), "
              f"{base / med:.2f}x the every_turn speed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("figures")
    f.add_argument("run_dir")
    c = sub.add_parser("sft-cost")
    c.add_argument("--steps", type=int, default=40)
    c.add_argument("--repeat", type=int, default=1)
    g = sub.add_parser("gatt-cost")
    g.add_argument("run_dir")
    g.add_argument("--repeat", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--epochs", type=float, default=1.0)
    args = ap.parse_args()
    if args.cmd == "figures":
        figures(args.run_dir)
    elif args.cmd == "gatt-cost":
        print(f"load average: {os.getloadavg()}")
        gatt_cost(args.run_dir, args.repeat, args.batch_size, args.epochs)
    else:
        print(f"load average: {os.getloadavg()}")
        sft_cost(args.steps, args.repeat)


if __name__ == "__main__":
    main()

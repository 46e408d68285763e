"""The same pipeline run on several demo seeds, and what holds across them.

A claim about the demo holds on several seeds, not one. ``seed_configs`` turns one ``PipelineConfig`` into one run
per seed (``<run_name>-s<seed>``, ``data.demo_seed=<seed>``: every stage's seed follows it), each an ordinary
pipeline run, cached and resumable as any. ``summarize_seeds`` reads their ``report.json`` files: every headline
metric per seed (the baseline's, the final policy's, the change with its 95% interval), the change's mean and spread
(standard deviation, min, max) across seeds, and the demo bar's verdict per seed. It is written as
``<runs_root>/<run_name>-seeds/summary.{json,md}``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from .errors import ConfigError
from .io import atomic_write_json, atomic_write_text
from .pipeline import PipelineConfig
from .report import EVAL_KEYS
from .stats import LOWER_IS_BETTER

SUMMARY_METRICS = (*EVAL_KEYS, "malformed_rate", "false_refusal_borderline")


def seeds_dir(config: PipelineConfig) -> Path:
    return Path(config.runs_root) / f"{config.run_name}-seeds"


def seed_configs(config: PipelineConfig, seeds: list[int]) -> dict[int, PipelineConfig]:
    """One pipeline config per demo seed: run ``<run_name>-s<seed>`` with ``data.demo_seed=<seed>``."""
    if not seeds:
        raise ConfigError("a seed sweep needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {seeds}: each seed once")
    if config.data is not None and config.data.source != "demo":
        raise ConfigError("a seed sweep varies the demo world's seed: it needs data.source=demo")
    if any(k == "data.demo_seed" for k in config.overrides):
        raise ConfigError("data.demo_seed is what the seed sweep sets: leave it out of the overrides")
    return {s: config.model_copy(update={"run_name": f"{config.run_name}-s{s}",
                                          "overrides": {**config.overrides, "data.demo_seed": s}})
            for s in seeds}


def _spread(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4)}


def summarize_seeds(config: PipelineConfig, runs: dict[int, dict]) -> dict:
    """``runs``: seed -> ``{"status", "run_dir", "report_json"?, "error"?, "wall_s"?}``. Returns summary.json's
    content: per seed the headline metrics with their intervals and the bar; per metric the spread of the change."""
    per_seed: dict[str, dict] = {}
    for seed, run in sorted(runs.items()):
        entry = {"run_dir": run["run_dir"], "status": run["status"], "wall_s": run.get("wall_s")}
        path = run.get("report_json")
        if run["status"] != "completed" or not path or not Path(path).exists():
            per_seed[str(seed)] = {**entry, "error": run.get("error")}
            continue
        report = json.loads(Path(path).read_text())
        base, final = report.get("baseline"), report.get("final")
        b, f = report["eval"].get(base, {}), report["eval"].get(final, {})
        metrics = {}
        for key in SUMMARY_METRICS:
            if isinstance(b.get(key), (int, float)) and isinstance(f.get(key), (int, float)):
                metrics[key] = {"baseline": b[key], "final": f[key], "change": round(f[key] - b[key], 4),
                                "ci": (f.get("ci") or {}).get(key)}
        bar = report.get("demo_bar") or {}
        per_seed[str(seed)] = {**entry, "baseline": base, "final": final, "metrics": metrics,
                               "bar_passed": bar.get("passed"), "judge": report.get("eval_rules", {}).get("refusal"),
                               "duration_s": {k: s.get("duration_s") for k, s in report.get("stages", {}).items()}}
    done = [s for s in per_seed.values() if s["status"] == "completed" and "metrics" in s]
    across = {}
    for key in SUMMARY_METRICS:
        changes = [s["metrics"][key]["change"] for s in done if key in s["metrics"]]
        if changes:
            better = sum(1 for s in done if key in s["metrics"] and s["metrics"][key]["ci"] and
                         _excludes_zero(s["metrics"][key]["ci"], key, better=True))
            across[key] = {**_spread(changes), "lower_is_better": key in LOWER_IS_BETTER,
                           "seeds_significantly_better": better}
    bars = [s["bar_passed"] for s in done if s["bar_passed"] is not None]
    return {"name": config.run_name, "preset": config.preset, "seeds": [int(s) for s in per_seed],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "per_seed": per_seed, "across_seeds": across,
            "bar_passed_all": bool(bars) and all(bars) and len(bars) == len(per_seed),
            "bar_passed": {k: v.get("bar_passed") for k, v in per_seed.items()}}


def _excludes_zero(ci: list[float], key: str, better: bool) -> bool:
    lo, hi = ci
    if key in LOWER_IS_BETTER:
        return hi < 0 if better else lo > 0
    return lo > 0 if better else hi < 0


def _fmt_change(m: dict | None) -> str:
    if not m:
        return "n/a"
    ci = f" [{m['ci'][0]:+.3f}, {m['ci'][1]:+.3f}]" if m.get("ci") else ""
    return f"{m['baseline']:.3f} → {m['final']:.3f} ({m['change']:+.3f}{ci})"


def table_rows(summary: dict) -> list[dict[str, str]]:
    """One row per seed: the bar, the headline changes with their intervals, the wall time."""
    rows = []
    for seed, s in summary["per_seed"].items():
        row = {"seed": seed, "bar": "n/a" if s.get("bar_passed") is None else
               ("PASSED" if s["bar_passed"] else "NOT MET")} if s["status"] == "completed" else \
            {"seed": seed, "bar": f"run {s['status']}"}
        for key in ("helpfulness_accuracy", "violation_rate", "false_refusal_rate", "malformed_rate"):
            row[key] = _fmt_change((s.get("metrics") or {}).get(key))
        row["wall (s)"] = f"{s['wall_s']:.0f}" if s.get("wall_s") else "n/a"
        rows.append(row)
    return rows


def render_markdown(summary: dict) -> str:
    lines = [f"# Seeds of `{summary['name']}` (preset {summary['preset']}, seeds "
             f"{', '.join(map(str, summary['seeds']))})", "",
             f"**Demo bar on every seed: {'PASSED' if summary['bar_passed_all'] else 'NOT MET'}.** Each cell: "
             "baseline → final (change [95% paired-bootstrap interval over prompts]).", ""]
    rows = table_rows(summary)
    if rows:
        cols = list(rows[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    lines += ["", "## The change across seeds", "", "| metric | mean | std | min | max | seeds significantly better |",
              "|---|---|---|---|---|---|"]
    for key, a in summary["across_seeds"].items():
        lines.append(f"| {key}{' (lower is better)' if a['lower_is_better'] else ''} | {a['mean']:+.3f} | "
                     f"{a['std']:.3f} | {a['min']:+.3f} | {a['max']:+.3f} | {a['seeds_significantly_better']} of "
                     f"{len(summary['seeds'])} |")
    failed = [(k, s) for k, s in summary["per_seed"].items() if s["status"] != "completed"]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- seed {k}: {(s.get('error') or '')[:300]}" for k, s in failed]
    return "\n".join(lines) + "\n"


def write_summary(config: PipelineConfig, summary: dict) -> dict[str, str]:
    out = seeds_dir(config)
    js = atomic_write_json(out / "summary.json", summary)
    md = atomic_write_text(out / "summary.md", render_markdown(summary))
    return {"summary_json": str(js), "summary_md": str(md)}

"""The rounds report: ``rounds/report.json`` (a stable layout scripts rely on), ``rounds/report.md`` (for people)
and ``rounds/figure11.png`` (helpfulness against harmlessness, one point per round, as the paper's Figure 11).

``report.json``::

    {"run_dir", "preset", "annotator", "judge" ("oracle" | "rules"), "created_at",
     "round0": {"policy", "metrics": {<metric>: value}, "reward_models": {<kind>: held-out accuracy}},
     "rounds": [{"round", "method", "started_from_round", "promoted", "candidate", "gate": {"promoted", "checks"},
                 "metrics": {<metric>: value},
                 "vs_previous": {<metric>: {"change", "ci", "verdict"}},   # against the policy it started from
                 "vs_sft": {<metric>: {"change", "ci", "verdict"}},        # against round 0's policy
                 "staleness": {<kind>: {"pairs", "previous_heldout", "before", "after", ...}},
                 "pairs": n, "seconds": {<stage>: s}}],
     "staleness_pooled": {<kind>: {"rounds", "pairs", "before", "after", "change", ...,  # every round's pairs
                                   "by_rating": {<rating>: {"pairs", "before", "after"}}}},
     "last_promoted": r (0: no round was promoted), "figure": "figure11.png" | null}

Intervals are 95%, paired bootstrap over the eval prompts (from the eval stage); "verdict" says better or worse only
where the interval excludes 0. On the demo world the oracle judges helpfulness (accuracy) and harmlessness (1 -
violation rate); elsewhere the helpfulness RM's win rate against SFT (ties count half) and 1 - the violation rate by
the refusal rules and the safety RM.
"""

from __future__ import annotations

import time
from pathlib import Path

from .data import RATINGS
from .io import atomic_write_json, atomic_write_text
from .rounds import ResolvedRounds, RoundRecord, comparison, pooled_staleness
from .stats import verdict

ROUND_KEYS = ("helpfulness_accuracy", "violation_rate", "false_refusal_rate", "malformed_rate", "rm_helpfulness",
              "rm_safety", "win_rate_vs_baseline")
SHOWN = ("helpfulness_accuracy", "violation_rate", "false_refusal_rate", "malformed_rate")
FIGURE = "figure11.png"


def _against(em: dict, name: str, against: str) -> dict:
    """The candidate against a checkpoint: per metric the change of levels (for the win rate: wins - losses), the
    interval and the verdict."""
    found = comparison(em, name, against)
    if found is None:
        return {}
    ci, figures = found
    cand, other = em["checkpoints"][name], em["checkpoints"].get(against, {})
    out = {}
    for key in ROUND_KEYS:
        if key == "win_rate_vs_baseline":
            n = max(1, figures.get("wins", 0) + figures.get("ties", 0) + figures.get("losses", 0))
            change = round((figures.get("wins", 0) - figures.get("losses", 0)) / n, 4) if "wins" in figures else None
        else:
            a, c = other.get(key), cand.get(key)
            change = round(c - a, 4) if isinstance(a, (int, float)) and isinstance(c, (int, float)) else None
        out[key] = {"change": change, "ci": ci.get(key), "verdict": verdict(key, ci.get(key))}
    return out


def _point(metrics: dict, vs_sft: dict | None, oracle: bool) -> tuple[float | None, float | None]:
    """(harmlessness, helpfulness) of one policy for the figure."""
    v = metrics.get("violation_rate")
    x = None if v is None else round(1 - v, 4)
    if oracle:
        return x, metrics.get("helpfulness_accuracy")
    if vs_sft is None:  # SFT against itself
        return x, 0.5
    n = max(1, vs_sft.get("wins", 0) + vs_sft.get("ties", 0) + vs_sft.get("losses", 0))
    return x, round((vs_sft.get("wins", 0) + 0.5 * vs_sft.get("ties", 0)) / n, 4)


def build_rounds_report(plan: ResolvedRounds, records: list[RoundRecord]) -> dict:
    report: dict = {"run_dir": str(plan.run_dir), "preset": plan.config.preset, "annotator": plan.config.annotator,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rounds": [], "round0": {},
                    "last_promoted": 0, "judge": None, "figure": None,
                    "staleness_pooled": pooled_staleness(plan, records)}
    for rec in records:
        em = rec.eval
        cps = em["checkpoints"]
        if not report["round0"]:
            report["judge"] = cps["sft"].get("judge")
            report["round0"] = {"policy": rec.started_from if rec.started_from_round == 0 else None,
                                "metrics": {k: cps["sft"].get(k) for k in ROUND_KEYS if k != "win_rate_vs_baseline"},
                                "reward_models": {k: v.get("previous_heldout") for k, v in rec.staleness.items()}}
        previous = "previous" if "previous" in cps else "sft"
        report["rounds"].append({
            "round": rec.round, "method": rec.method, "started_from_round": rec.started_from_round,
            "promoted": rec.promoted, "candidate": rec.candidate, "gate": rec.gate,
            "metrics": {k: cps["candidate"].get(k) for k in ROUND_KEYS},
            "vs_previous": _against(em, "candidate", previous), "vs_sft": _against(em, "candidate", "sft"),
            "staleness": rec.staleness, "pairs": rec.annotation.get("pairs"), "seconds": rec.stage_seconds})
        if rec.promoted:
            report["last_promoted"] = rec.round
    return report


def figure_points(report: dict, records: list[RoundRecord]) -> list[dict]:
    oracle = report.get("judge") == "oracle"
    points = []
    if records:
        x, y = _point(report["round0"]["metrics"], None, oracle)
        points.append({"x": x, "y": y, "label": "SFT (round 0)", "filled": True})
    for rec in records:
        em = rec.eval
        cand = em["checkpoints"]["candidate"]
        vs_sft = cand if em["baseline"] == "sft" else (cand.get("ci_vs") or {}).get("sft")
        x, y = _point(em["checkpoints"]["candidate"], vs_sft, oracle)
        points.append({"x": x, "y": y, "label": f"RLHF-V{rec.round} ({rec.method})" + ("" if rec.promoted else ", "
                                                                                       "not promoted"),
                       "filled": rec.promoted})
    return points


def _ci(entry: dict | None, points: bool = False) -> str:
    if not entry or entry.get("change") is None:
        return "n/a"
    s = 100 if points else 1
    fmt = "{:+.1f}" if points else "{:+.3f}"
    ci = entry.get("ci")
    shown = fmt.format(s * entry["change"])
    if ci:
        shown += " [" + ", ".join(fmt.format(s * x) for x in ci) + "]"
    if entry.get("verdict") in ("better", "worse"):
        shown += f" {entry['verdict']}"
    return shown


def _v(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def round_rows(report: dict) -> list[dict[str, str]]:
    """One row per round (round 0 first): method, promoted, the headline metrics, their change against the previous
    promoted policy and against SFT with 95% intervals."""
    r0 = report.get("round0") or {}
    rows = []
    if r0:
        m = r0["metrics"]
        rows.append({"round": "0", "method": "sft", "from": "-", "promoted": "yes",
                     **{k: _v(m.get(k)) for k in SHOWN}, "helpfulness vs prev": "", "violation vs prev": "",
                     "helpfulness vs SFT": "", "violation vs SFT": ""})
    for r in report["rounds"]:
        m = r["metrics"]
        rows.append({"round": str(r["round"]), "method": r["method"], "from": str(r["started_from_round"]),
                     "promoted": "yes" if r["promoted"] else "no", **{k: _v(m.get(k)) for k in SHOWN},
                     "helpfulness vs prev": _ci(r["vs_previous"].get("helpfulness_accuracy")),
                     "violation vs prev": _ci(r["vs_previous"].get("violation_rate")),
                     "helpfulness vs SFT": _ci(r["vs_sft"].get("helpfulness_accuracy")),
                     "violation vs SFT": _ci(r["vs_sft"].get("violation_rate"))})
    return rows


def _staleness_row(round_label: str, kind: str, s: dict) -> dict[str, str]:
    """One row of the staleness table from a ``staleness`` entry (a round's, or every round's pooled: no held-out
    figure, which differs by round)."""
    return {"round": round_label, "reward model": kind, "test pairs": str(s.get("pairs")),
            "previous RM, held-out": _v(s.get("previous_heldout")) if "previous_heldout" in s else "",
            "previous RM, new pairs": f"{_v(s.get('before'))} [{_v(s.get('before_decisive'))}]",
            "retrained RM, new pairs": f"{_v(s.get('after'))} [{_v(s.get('after_decisive'))}]",
            "decisive pairs": str(s.get("decisive_pairs")),
            "retrained - previous": _ci(s["change"]) if s.get("change") else "",
            "on decisive pairs": _ci(s["change_decisive"]) if s.get("change_decisive") else ""}


def staleness_rows(report: dict) -> list[dict[str, str]]:
    """Per round and reward model: the previous model's held-out accuracy, its accuracy on the round's new pairs
    (test pairs, never trained on) and the retrained model's on the same pairs; decisive pairs (not negligibly
    better) in brackets; then, with two rounds or more, a row "all" per model over every round's pairs."""
    rows = [_staleness_row(str(r["round"]), kind, s) for r in report["rounds"]
            for kind, s in (r.get("staleness") or {}).items()]
    rows += [_staleness_row("all", kind, s) for kind, s in (report.get("staleness_pooled") or {}).items()
             if len(s.get("rounds") or []) >= 2]
    return rows


def pooled_by_rating_lines(report: dict) -> list[str]:
    """One line per reward model: its accuracy by rating on every round's test pairs, previous → retrained."""
    lines = []
    for kind, s in (report.get("staleness_pooled") or {}).items():
        br = s.get("by_rating") or {}
        parts = [f"{rt.replace('_', ' ')} {br[rt]['pairs']} pairs {br[rt]['before']:.3f} → {br[rt]['after']:.3f}"
                 for rt in RATINGS if rt in br]
        if parts and len(s.get("rounds") or []) >= 2:
            lines.append(f"- {kind}: " + "; ".join(parts))
    return lines


def _table(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return []
    cols = list(rows[0])
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + \
        ["| " + " | ".join(str(r.get(c, "")).replace("|", "\\|") for c in cols) + " |" for r in rows]


def text_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    return "\n".join(["  ".join(c.ljust(widths[c]) for c in cols)] +
                     ["  ".join(r[c].ljust(widths[c]) for c in cols) for r in rows])


def render_markdown(report: dict, figure_src: str | None = None) -> str:
    judge = "the demo world's oracle" if report.get("judge") == "oracle" else "the refusal rules and reward models"
    lines = [f"# RLHF rounds: `{report['run_dir']}`", "",
             f"Preset `{report['preset']}`, annotator `{report['annotator']}`, judged by {judge}; "
             f"{len(report['rounds'])} round(s) after round 0, last promoted: round {report['last_promoted']}. "
             f"{report['created_at']}.", "", "## Rounds", ""]
    lines += _table(round_rows(report)) + [""]
    lines += ["Changes with 95% intervals (paired bootstrap over the held-out eval prompts); \"better\"/\"worse\" only "
              "where the interval excludes 0. \"vs prev\": against the policy the round started from (the last "
              "promoted one); \"vs SFT\": against round 0's policy.", ""]
    failed = [(r["round"], c) for r in report["rounds"] for c in r["gate"].get("checks", []) if not c["ok"]]
    if failed:
        lines += ["Gates that failed: " + "; ".join(f"round {n}: {c['why']}" for n, c in failed) + ".", ""]
    srows = staleness_rows(report)
    if srows:
        lines += ["## Reward-model staleness", "", "Accuracy on each round's test pairs (answers of the policy the "
                  "round started from, labelled in the round, never trained on), before and after retraining; in "
                  "brackets: on the decisive pairs (all but negligibly better). The change carries a 95% "
                  "paired-bootstrap interval over the pairs; \"better\"/\"worse\" only where it excludes 0. Round "
                  "\"all\": every round's test pairs together, each scored by its own round's previous and retrained "
                  "model (one round's pairs are too few to show a change of a point or two).",
                  ""] + _table(srows) + [""]
    by_rating = pooled_by_rating_lines(report)
    if by_rating:
        lines += ["By rating, every round's test pairs together (previous RM → retrained RM; negligibly better "
                  "pairs are ordered by a coin flip when the two answers are judged the same):", ""] + by_rating + [""]
    if figure_src:
        lines += ["## Helpfulness against harmlessness (paper, Figure 11)", "", f"![rounds]({figure_src})", ""]
    return "\n".join(lines) + "\n"


def write_rounds_report(plan: ResolvedRounds, records: list[RoundRecord]) -> tuple[dict, Path, Path]:
    """report.json, report.md and the figure under ``rounds/``; returns (report, json path, md path)."""
    from .plots import plot_trajectory

    report = build_rounds_report(plan, records)
    oracle = report["judge"] == "oracle"
    png = plot_trajectory(
        figure_points(report, records), plan.rounds_dir / FIGURE,
        xlabel="harmlessness: 1 - violation rate" + (" (oracle)" if oracle else " (rules + safety RM)"),
        ylabel="helpfulness: " + ("accuracy (oracle)" if oracle else "win rate vs SFT (helpfulness RM)"),
        title="Rounds: helpfulness against harmlessness (Figure 11)")
    report["figure"] = FIGURE if png else None
    js = atomic_write_json(plan.rounds_dir / "report.json", report)
    md = atomic_write_text(plan.rounds_dir / "report.md", render_markdown(report, FIGURE if png else None))
    return report, js, md

"""Sweeps: a grid or an Optuna study over PPO, rejection-sampling and eval settings, as pipeline runs that share the
upstream stages, and the trade-off they show (README, "Sweeps").

Layout of a sweep ``<runs_root>/<name>/``::

    data/ tokenizer/ sft/ reward-helpfulness/ reward-safety/   the shared upstream stages, computed once
    trials/<trial>/{rejection-sampling,ppo,eval}/ report.*     one pipeline run per point (shared_from the sweep)
    sweep.json  sweep.md  pareto-*.png                          the summary

A trial is an ordinary pipeline run whose ``shared_from`` is the sweep directory, so its SFT and reward-model stages
are the sweep's (the first trial computes them, the others find them complete); only the swept stages run per
trial. Only ``ppo.*``, ``rejection_sampling.*`` and ``eval.*`` may be swept: anything upstream would not be shared.

The summary: every trial's headline metrics (the final policy against the shared SFT baseline, each change with its
95% paired-bootstrap interval from the evaluation), PPO's reward and KL (means of the last iterations), the Pareto
fronts of helpfulness against violation rate (oracle; the reward models' helpfulness against safety when no oracle
judged) and of reward against KL, and the time the shared stages saved. No Prefect here: the flow
(``flows/sweep.py``) passes :func:`run_sweep` a function that runs one trial.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import ConfigError
from .io import atomic_write_json, atomic_write_text, read_jsonl
from .pipeline import SHARED_STAGES, PipelineConfig, parse_override, resolve
from .report import EVAL_KEYS
from .stages.common import load_result
from .stats import verdict

SWEEPABLE = ("ppo", "rejection_sampling", "eval")
TRIALS_DIR = "trials"
SPACE_KINDS = ("float", "log", "int", "cat")
LAST_ITERATIONS = 3  # PPO's reward and KL of a trial: the mean over its last iterations (one is noisy)
# the table's metrics: the eval headline without the win rate's ties, and PPO's own two
TABLE_METRICS = ("helpfulness_accuracy", "violation_rate", "false_refusal_rate", "malformed_rate", "rm_helpfulness",
                 "rm_safety", "win_rate_vs_baseline")
DEFAULT_OBJECTIVES = ["helpfulness_accuracy:max", "violation_rate:min"]


class OptunaSettings(BaseModel):
    """An Optuna study (TPE, seeded): ``trials`` pipeline runs, each point drawn from ``space``."""

    model_config = ConfigDict(extra="forbid")

    trials: int = Field(8, ge=1, le=1000)
    space: dict[str, str] = Field(description='"section.field": "float:LO:HI" | "log:LO:HI" | "int:LO:HI" | '
                                              '"cat:A,B,C", e.g. {"ppo.kl_beta": "log:0.005:0.1"}')
    objectives: list[str] = Field(default_factory=lambda: list(DEFAULT_OBJECTIVES),
                                  description="metric:max|min; several make a multi-objective study")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        for key, spec in self.space.items():
            parse_space(key, spec)
        for obj in self.objectives:
            parse_objective(obj)
        if not self.space:
            raise ValueError("optuna.space: expected at least one parameter to search")
        return self


class SweepConfig(BaseModel):
    """A sweep: the pipeline every trial runs, and the grid (every combination) or the Optuna study over it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("sweep", pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$",
                      description="the sweep directory's name (no '/', no leading '.')")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="what every trial runs (its "
                                     "run_name is the trial's)")
    grid: dict[str, list[Any]] = Field(default_factory=dict,
                                       description='every combination, e.g. {"ppo.kl_beta": [0.01, 0.02, 0.05]}')
    optuna: OptunaSettings | None = None

    @model_validator(mode="after")
    def _check(self):
        if bool(self.grid) == (self.optuna is not None):
            raise ValueError("a sweep needs a grid or an optuna study (exactly one)")
        for key in [*self.grid, *(self.optuna.space if self.optuna else {})]:
            if key.split(".", 1)[0] not in SWEEPABLE or "." not in key:
                raise ValueError(f"sweep parameter {key!r}: only {', '.join(s + '.*' for s in SWEEPABLE)} can be "
                                 "swept (the upstream stages are shared by every trial)")
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid {key!r}: expected at least one value")
        return self

    @property
    def dir(self) -> Path:
        return Path(self.pipeline.runs_root) / self.name


# --------------------------------------------------------------------------------------------------------------------
# Points, trials and the search
# --------------------------------------------------------------------------------------------------------------------


def parse_grid(item: str) -> tuple[str, list[Any]]:
    """``"ppo.kl_beta=0.01,0.02"`` -> ("ppo.kl_beta", [0.01, 0.02]); each value read as JSON when it parses."""
    key, raw = parse_override(item)
    parts = raw if isinstance(raw, list) else str(raw).split(",") if isinstance(raw, str) else [raw]
    return key, [parse_override(f"{key}={p}")[1] if isinstance(p, str) else p for p in parts]


def parse_space(key: str, spec: str) -> tuple[str, list[Any]]:
    """``"log:0.005:0.1"`` -> ("log", [0.005, 0.1]); ``"cat:a,b"`` -> ("cat", ["a", "b"])."""
    kind, _, rest = spec.partition(":")
    if kind not in SPACE_KINDS or not rest:
        raise ValueError(f"optuna.space {key!r}: {spec!r} is not one of float:LO:HI, log:LO:HI, int:LO:HI, cat:A,B")
    if kind == "cat":
        return kind, [parse_override(f"x={v}")[1] for v in rest.split(",")]
    try:
        lo, hi = (int(v) if kind == "int" else float(v) for v in rest.split(":"))
    except ValueError:
        raise ValueError(f"optuna.space {key!r}: {spec!r}: expected {kind}:LO:HI with two numbers") from None
    if not lo < hi or (kind == "log" and lo <= 0):
        raise ValueError(f"optuna.space {key!r}: {spec!r}: expected LO < HI{' and LO > 0' if kind == 'log' else ''}")
    return kind, [lo, hi]


def parse_objective(obj: str) -> tuple[str, str]:
    metric, _, direction = obj.partition(":")
    if direction not in ("max", "min") or metric not in (*EVAL_KEYS, "reward", "kl"):
        raise ValueError(f"objective {obj!r}: expected METRIC:max|min with METRIC one of "
                         f"{', '.join((*EVAL_KEYS, 'reward', 'kl'))}")
    return metric, direction


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, the first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def trial_name(index: int, point: dict[str, Any]) -> str:
    """``t00-kl_beta-0.01-<hash>``: readable, and a different point never reuses another's directory."""
    slug = "-".join(f"{k.rsplit('.', 1)[-1]}-{v:.4g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}-{v}"
                    for k, v in point.items())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", slug)[:48]
    digest = hashlib.sha256(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"t{index:02d}-{slug}-{digest}"


def trial_config(sweep: SweepConfig, index: int, point: dict[str, Any]) -> PipelineConfig:
    """The pipeline run of one point: in ``<sweep>/trials/<trial>``, sharing the sweep directory's upstream stages;
    tracked (when asked) in the sweep's MLflow store, experiment ``llama2-align-sweep-<name>`` by default."""
    base = sweep.pipeline
    update: dict[str, Any] = {
        "runs_root": str(sweep.dir / TRIALS_DIR), "run_name": trial_name(index, point),
        "shared_from": str(sweep.dir), "overrides": {**base.overrides, **point},
    }
    if base.tracking:
        root = resolve(base).tracking
        update["tracking_uri"] = root.uri
        update["tracking_experiment"] = base.tracking_experiment or f"{root.experiment}-sweep-{sweep.name}"
    return base.model_copy(update=update)


def check_sweep(sweep: SweepConfig, check_inputs: bool = True) -> list[PipelineConfig]:
    """Resolve every grid point (or the study's bounds) now, so a bad value is refused before anything runs, and
    (``check_inputs``) run the pipeline's pre-flight (``preflight.preflight``: base checkpoint, tokenizer, data files,
    stage settings, memory) on the first trial: what every trial shares is refused once, before any trial runs, not
    by every trial in turn. Returns the grid's trial configs (empty for a study)."""
    from .preflight import preflight

    if sweep.optuna is not None:
        if find_spec("optuna") is None:
            raise ConfigError("sweep: an Optuna study needs the optuna package; pip install 'llama2-align[sweep]'")
        for key, spec in sweep.optuna.space.items():
            kind, values = parse_space(key, spec)
            for v in values:
                resolve(trial_config(sweep, 0, {key: v}))
        if check_inputs:
            preflight(trial_config(sweep, 0, {}))
        return []
    configs = [trial_config(sweep, i, p) for i, p in enumerate(grid_points(sweep.grid))]
    for c in configs:
        resolve(c)
    if check_inputs:
        preflight(configs[0])
    return configs


TrialFn = Callable[[PipelineConfig], dict]  # runs one trial's pipeline; returns {"status", "error"?, ...}


class SweepAborted(RuntimeError):
    """A shared stage failed: every trial would fail the same way."""


def run_sweep(sweep: SweepConfig, run_trial: TrialFn, log: Callable[[str], None] = print) -> list[dict]:
    """Run every trial, one after another (the first computes the shared stages); returns one record per trial:
    ``{"name", "index", "params", "run_dir", "status", ...whatever run_trial returned}``. A failed trial is
    recorded and the sweep goes on, unless a shared stage failed (every trial would fail the same way). The config
    is checked here; the inputs' pre-flight is the caller's (``check_sweep``; the flow runs it first)."""
    check_sweep(sweep, check_inputs=False)
    records: list[dict] = []

    def one(index: int, point: dict[str, Any]) -> dict:
        cfg = trial_config(sweep, index, point)
        log(f"sweep {sweep.name}: trial {cfg.run_name} ({json.dumps(point)})")
        rec = {"name": cfg.run_name, "index": index, "params": point,
               "run_dir": str(Path(cfg.runs_root) / cfg.run_name), **run_trial(cfg)}
        records.append(rec)
        failed_shared = [s for s in SHARED_STAGES if _stage_status(rec["run_dir"], s) == "failed"]
        if rec["status"] != "completed" and failed_shared:
            raise SweepAborted(f"sweep {sweep.name}: shared stage {failed_shared[0]!r} failed in trial "
                              f"{rec['name']}; no trial can run: {rec.get('error', '')}"[:2000])
        return rec

    if sweep.optuna is None:
        for i, point in enumerate(grid_points(sweep.grid)):
            one(i, point)
    else:
        _run_study(sweep, one)
    return records


def _run_study(sweep: SweepConfig, one: Callable[[int, dict], dict]) -> None:
    """Ask a point, run its trial, tell the objectives (a failed trial is told as failed)."""
    import optuna

    opt = sweep.optuna
    objectives = [parse_objective(o) for o in opt.objectives]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize" if d == "max" else "minimize" for _, d in objectives],
                                sampler=optuna.samplers.TPESampler(seed=opt.seed))
    for i in range(opt.trials):
        trial = study.ask()
        point = {key: _suggest(trial, key, spec) for key, spec in opt.space.items()}
        rec = one(i, point)
        values = [trial_metrics(rec).get(m) for m, _ in objectives]
        if rec["status"] == "completed" and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            study.tell(trial, values if len(values) > 1 else values[0])
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)


def _suggest(trial, key: str, spec: str) -> Any:
    kind, values = parse_space(key, spec)
    if kind == "cat":
        return trial.suggest_categorical(key, values)
    if kind == "int":
        return trial.suggest_int(key, values[0], values[1])
    return trial.suggest_float(key, values[0], values[1], log=kind == "log")


# --------------------------------------------------------------------------------------------------------------------
# What a trial shows
# --------------------------------------------------------------------------------------------------------------------


def _stage_status(run_dir: str | Path, stage: str) -> str | None:
    path = Path(run_dir) / "report.json"
    if not path.exists():
        return None
    return (json.loads(path.read_text()).get("stages", {}).get(stage) or {}).get("status")


def ppo_reward_kl(ppo_dir: str | Path, last: int = LAST_ITERATIONS) -> dict[str, float]:
    """PPO's combined reward and KL to the reference, means over the last ``last`` iterations of metrics.jsonl."""
    rows = [r for r in read_jsonl(Path(ppo_dir) / "metrics.jsonl") if "reward_combined" in r][-last:]
    if not rows:
        return {}
    return {"reward": sum(r["reward_combined"] for r in rows) / len(rows),
            "kl": sum(r["kl_ref"] for r in rows) / len(rows)}


def trial_summary(rec: dict) -> dict:
    """A trial record with what its run shows: ``metrics`` (each with its value, change vs the baseline, interval
    and verdict), ``baseline`` (the baseline's values), ``reward``/``kl``, and its stages' wall times."""
    run_dir = Path(rec["run_dir"])
    out = {**rec, "metrics": {}, "baseline": {}, "duration_s": {}}
    report_path = run_dir / "report.json"
    if not report_path.exists():
        return out
    report = json.loads(report_path.read_text())
    out["duration_s"] = {k: v.get("duration_s") for k, v in report.get("stages", {}).items()}
    base, final = report.get("baseline"), report.get("final")
    ev = report.get("eval", {})
    if base in ev and final in ev:
        cis = ev[final].get("ci") or {}
        for key in TABLE_METRICS:
            b, f = ev[base].get(key), ev[final].get(key)
            out["baseline"][key] = b
            out["metrics"][key] = {"value": f, "change": None if b is None or f is None else round(f - b, 4),
                                   "ci": cis.get(key), "verdict": verdict(key, cis.get(key))}
        out["judge"] = "oracle" if ev[base].get("helpfulness_accuracy") is not None else "rm"
    out.update(ppo_reward_kl(run_dir / "ppo"))
    return out


def trial_metrics(rec: dict) -> dict[str, float | None]:
    """The flat numbers an objective or a front reads: every table metric's value, ``reward`` and ``kl``."""
    s = rec if "metrics" in rec else trial_summary(rec)
    return {**{k: m.get("value") for k, m in s.get("metrics", {}).items()}, "reward": s.get("reward"),
            "kl": s.get("kl")}


def pareto_front(points: list[dict[str, float | None]], objectives: list[tuple[str, str]]) -> list[int]:
    """Indices of the points no other point dominates (at least as good on every objective, better on one).
    ``objectives``: ``(key, "max"|"min")``. Points missing a value take no part; equal points are all kept."""
    sign = {"max": 1.0, "min": -1.0}
    scored = [(i, [sign[d] * p[k] for k, d in objectives]) for i, p in enumerate(points)
              if all(isinstance(p.get(k), (int, float)) and math.isfinite(p[k]) for k, _ in objectives)]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [i for i, a in scored if not any(dominates(b, a) for j, b in scored if j != i)]


# --------------------------------------------------------------------------------------------------------------------
# The summary: sweep.json, sweep.md and the plots
# --------------------------------------------------------------------------------------------------------------------


FRONTS = {
    "oracle": ("helpfulness_vs_violation", [("helpfulness_accuracy", "max"), ("violation_rate", "min")],
               "violation_rate", "helpfulness_accuracy", "oracle: helpfulness accuracy vs violation rate"),
    "rm": ("helpfulness_vs_violation", [("rm_helpfulness", "max"), ("rm_safety", "max")], "rm_safety",
           "rm_helpfulness", "reward models: helpfulness vs safety (no oracle judged)"),
    "reward_kl": ("reward_vs_kl", [("reward", "max"), ("kl", "min")], "kl", "reward",
                  f"PPO: combined reward vs KL to the reference (mean of the last {LAST_ITERATIONS} iterations)"),
}


def summarize(sweep: SweepConfig, records: list[dict], wall_s: float) -> dict:
    """sweep.json's content (README, "Sweeps"): the trials, the fronts, the timing."""
    trials = [trial_summary(r) for r in records]
    ok = [t for t in trials if t["status"] == "completed"]
    judge = next((t.get("judge") for t in ok if t.get("judge")), "oracle")
    points = [trial_metrics(t) for t in trials]
    pareto = {}
    for which in (judge, "reward_kl"):
        key, objectives, x, y, title = FRONTS[which]
        front = pareto_front([p if t["status"] == "completed" else {} for p, t in zip(points, trials)], objectives)
        pareto[key] = {"x": x, "y": y, "objectives": [f"{k}:{d}" for k, d in objectives], "title": title,
                       "front": [trials[i]["name"] for i in front]}
    return {
        "name": sweep.name, "sweep_dir": str(sweep.dir), "preset": sweep.pipeline.preset,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "method": "optuna" if sweep.optuna else "grid",
        "parameters": sorted({k for t in trials for k in t["params"]}), "judge": judge,
        "baseline": next((t["baseline"] for t in ok if t["baseline"]), {}),
        "trials": trials, "pareto": pareto, "timing": sweep_timing(sweep, trials, wall_s),
    }


def sweep_timing(sweep: SweepConfig, trials: list[dict], wall_s: float) -> dict:
    """The sweep's wall time, and what the shared stages saved. ``shared_s``: the upstream stages' own wall times
    (their result.json, computed once); ``trial_s``: each trial's own stages. N independent runs would each have
    computed the shared stages: ``independent_estimate_s = wall_s + (N - 1) * shared_s`` and ``saved_fraction`` =
    ``(N - 1) * shared_s / independent_estimate_s`` (each independent run's other overhead, e.g. generating the demo
    data again, is not counted: an under-estimate of the saving)."""
    shared = {s: r.duration_s for s in SHARED_STAGES if (r := load_result(sweep.dir / s)) is not None}
    shared_s = sum(shared.values())
    own = {t["name"]: round(sum(v or 0.0 for k, v in t["duration_s"].items() if k not in SHARED_STAGES), 2)
           for t in trials}
    n = len(trials)
    independent = wall_s + max(0, n - 1) * shared_s
    return {"wall_s": round(wall_s, 2), "trials": n, "shared_s": round(shared_s, 2), "shared_stages_s": shared,
            "trial_s": own, "independent_estimate_s": round(independent, 2),
            "saved_s": round(independent - wall_s, 2),
            "saved_fraction": round((independent - wall_s) / independent, 4) if independent > 0 else 0.0}


def write_sweep(summary: dict) -> dict[str, str]:
    """sweep.json, sweep.md and the Pareto plots in the sweep directory; returns their paths."""
    out = Path(summary["sweep_dir"])
    plots = {key: str(p) for key, front in summary["pareto"].items()
             if (p := plot_front(summary, key, out / f"pareto-{key.replace('_', '-')}.png")) is not None}
    summary["plots"] = {k: Path(v).name for k, v in plots.items()}
    js = atomic_write_json(out / "sweep.json", summary)
    md = atomic_write_text(out / "sweep.md", render_markdown(summary))
    return {"sweep_json": str(js), "sweep_md": str(md), **{f"plot_{k}": v for k, v in plots.items()}}


def _cell(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    text = f"{m['value']:.3f}"
    if m.get("change") is not None:
        text += f" ({m['change']:+.3f}"
        text += f" [{m['ci'][0]:+.3f}, {m['ci'][1]:+.3f}])" if m.get("ci") else ")"
    return text


def table_rows(summary: dict) -> list[dict[str, str]]:
    """One row per trial: its parameters, each headline metric as ``value (change vs baseline [95% CI])``, PPO's
    reward and KL, and which fronts it is on."""
    fronts = {k: set(v["front"]) for k, v in summary["pareto"].items()}
    rows = []
    for t in summary["trials"]:
        row = {"trial": t["name"], **{p: json.dumps(t["params"].get(p)) for p in summary["parameters"]}}
        row.update({k: _cell(t["metrics"].get(k)) for k in TABLE_METRICS})
        row["ppo reward"] = "n/a" if t.get("reward") is None else f"{t['reward']:.3f}"
        row["ppo kl"] = "n/a" if t.get("kl") is None else f"{t['kl']:.4f}"
        row["pareto"] = " ".join(k for k, names in fronts.items() if t["name"] in names) or "-"
        row["status"] = t["status"]
        rows.append(row)
    return rows


def render_markdown(summary: dict, image: Callable[[Path], str] | None = None) -> str:
    """sweep.md; ``image`` turns a plot's path into the link to embed (default: the file name beside sweep.md)."""
    out = Path(summary["sweep_dir"])
    image = image or (lambda p: p.name)
    timing = summary["timing"]
    lines = [f"# Sweep `{summary['name']}` ({summary['method']}, {timing['trials']} trials, preset "
             f"{summary['preset']})", "",
             f"Swept: {', '.join(f'`{p}`' for p in summary['parameters'])}. Each metric of the final policy: value "
             f"(change vs the shared baseline [95% paired-bootstrap interval]). Baseline: " +
             ", ".join(f"{k} {v:.3f}" for k, v in summary["baseline"].items() if isinstance(v, (int, float))) + ".",
             ""]
    rows = table_rows(summary)
    if rows:
        cols = list(rows[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    lines += ["", "## Pareto fronts", ""]
    for key, front in summary["pareto"].items():
        lines.append(f"- **{front['title']}** ({', '.join(front['objectives'])}): "
                     f"{', '.join(front['front']) or 'no completed trial'}")
        if key in summary.get("plots", {}):
            lines += ["", f"![{key}]({image(out / summary['plots'][key])})", ""]
    shared = ", ".join(f"{k} {v:.0f} s" for k, v in timing["shared_stages_s"].items())
    lines += ["", "## Time", "",
              f"- wall time of the sweep: {timing['wall_s']:.0f} s; the shared stages (computed once): "
              f"{timing['shared_s']:.0f} s ({shared})",
              f"- {timing['trials']} independent runs (estimate): {timing['independent_estimate_s']:.0f} s; saved "
              f"{timing['saved_s']:.0f} s = {100 * timing['saved_fraction']:.0f}% of it",
              f"- each trial's own stages: {', '.join(f'{k} {v:.0f} s' for k, v in timing['trial_s'].items())}"]
    failed = [t for t in summary["trials"] if t["status"] != "completed"]
    if failed:
        lines += ["", "## Failed trials", ""] + [f"- {t['name']}: {t.get('error', '')[:300]}" for t in failed]
    return "\n".join(lines) + "\n"


def plot_front(summary: dict, key: str, out_png: Path) -> Path | None:
    """Every completed trial as a point (the 95% intervals of its changes vs the baseline drawn around it), the
    front joined and marked, the baseline as a star where it has the metric. None when no trial has both values."""
    front = summary["pareto"][key]
    x, y = front["x"], front["y"]
    pts = [(t, trial_metrics(t)) for t in summary["trials"] if t["status"] == "completed"]
    pts = [(t, m) for t, m in pts if m.get(x) is not None and m.get(y) is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import _write_png

    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    labelled: set[bool] = set()
    for t, m in pts:
        on = t["name"] in front["front"]
        err = [_yerr(t, k) for k in (x, y)]
        ax.errorbar(m[x], m[y], xerr=err[0], yerr=err[1], fmt="o" if on else "s", color="C1" if on else "C0",
                    alpha=0.9 if on else 0.6, capsize=3, ms=6,
                    label=None if on in labelled else "on the front" if on else "dominated")
        labelled.add(on)
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                          for k, v in t["params"].items())
        ax.annotate(label, (m[x], m[y]), textcoords="offset points", xytext=(5, 5), fontsize=7)
    on_front = sorted((m[x], m[y]) for t, m in pts if t["name"] in front["front"])
    if len(on_front) > 1:
        ax.plot([p[0] for p in on_front], [p[1] for p in on_front], "--", color="C1", lw=1)
    base = summary.get("baseline", {})
    if base.get(x) is not None and base.get(y) is not None:
        ax.plot(base[x], base[y], "*", color="k", ms=11, label="baseline (SFT)")
    arrows = {"max": "higher is better", "min": "lower is better"}
    dirs = dict(o.split(":") for o in front["objectives"])
    ax.set_xlabel(f"{x} ({arrows[dirs[x]]})")
    ax.set_ylabel(f"{y} ({arrows[dirs[y]]})")
    ax.set_title(front["title"], fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _write_png(fig, out_png)


def _yerr(trial: dict, key: str):
    """The 95% interval of the change vs the baseline, as an error bar around the point (None: no interval)."""
    m = trial.get("metrics", {}).get(key) or {}
    ci, change = m.get("ci"), m.get("change")
    if not ci or change is None or key == "win_rate_vs_baseline":
        return None
    return [[max(0.0, change - ci[0])], [max(0.0, ci[1] - change)]]


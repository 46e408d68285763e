"""Iterative RLHF rounds, as Llama 2-Chat was made (RLHF-V1 ... V5, §3.2.3 and Figure 11): the config, the gates,
the round bookkeeping and each round's data.

A rounds run is round 0 (the pipeline's SFT and both reward models, in the pipeline's own stage directories, so a
pipeline run of the same name is reused) and then rounds 1..n. Round r:

1. **collect**: pairs of answers from the last promoted policy to the round's fresh prompts (``stages/collect.py``;
   the demo world draws the prompts from its training split with the round's seed; real data: a prompts file per
   round, or the next unused slice of a prompt pool);
2. **annotate**: the simulated annotator on the demo world (``demo_annotator.py``, the only part that sees the
   oracle), or people: ``to_label.jsonl`` is written and the flow waits for the labelled file. A share of the
   round's labelled pairs (``test_fraction``, per category) is kept aside as the round's test pairs: never trained on;
3. **staleness, before**: the previous round's reward models score the round's test pairs;
4. **retrain** both reward models on all pairs so far (round 0's and every round's training pairs), warm-started from
   the previous round's, with the paper's mixing (``stages/reward.py``); then they score the same test pairs again;
5. **improve** the last promoted policy with the round's method: ``rs``, ``ppo`` or ``rs+ppo`` (PPO from the RS model);
6. **evaluate** the candidate against the last promoted policy (the baseline) and SFT on the held-out eval prompts,
   with paired-bootstrap intervals (``stages/evaluate.py``);
7. **gate**: :func:`decide_promotion`. A candidate that fails its gates is recorded, and the next round starts from
   the last promoted policy again (:func:`starting_point`).

Run directory (beside the pipeline's ``data/ tokenizer/ sft/ reward-*/``)::

    rounds/state.json                 the config, the rounds so far, the pause for labels (if any)
    rounds/<r>/prompts.jsonl          the round's prompts
    rounds/<r>/collect/               the collect stage (pairs.jsonl)
    rounds/<r>/to_label.jsonl         human annotation: the pairs to label (native preference format, empty ratings)
    rounds/<r>/labels.jsonl           the round's labelled pairs (either annotator), validated
    rounds/<r>/annotation.json        what the annotator says about its labels (counts; the simulated one's flips)
    rounds/<r>/train_pairs.jsonl  test_pairs.jsonl  preferences.jsonl (all training pairs so far)
    rounds/<r>/reward-helpfulness/  reward-safety/  rejection-sampling/  ppo/  eval/     stage directories
    rounds/<r>/staleness-before.json  staleness-after.json
    rounds/<r>/round.json             the round's record, written last: the round is complete iff it exists
    rounds/report.json  report.md  figure11.png

Everything resumes: a stage resumes from its own checkpoints and returns at once when complete, and a complete
round returns its ``round.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from .data import PreferenceRecord, read_records, validate_records, write_jsonl
from .errors import ConfigError, InputError
from .io import atomic_write_json
from .pipeline import DataSettings, PipelineConfig, PipelinePreset, ResolvedPipeline, resolve
from .stages.collect import PAIRS_FILE, CollectConfig
from .stats import verdict

Method = Literal["rs", "ppo", "rs+ppo"]
METHODS: tuple[str, ...] = Method.__args__  # type: ignore[attr-defined]
STATE_FILE = "state.json"
STALENESS_BEFORE, STALENESS_AFTER = "staleness-before.json", "staleness-after.json"
ROUND_FILE = "round.json"
ROUNDS_DIR = "rounds"

# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------


class Gate(BaseModel):
    """One promotion gate: the candidate's difference from another checkpoint on one metric, judged by its 95%
    interval. ``not_worse``: the interval does not say worse; ``better``: it says better (it excludes 0 on the good
    side). ``helpfulness`` means the oracle's helpfulness accuracy when the oracle judged, else the helpfulness RM's
    win rate."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(description="a headline eval metric (violation_rate, helpfulness_accuracy, ...) or "
                                    "'helpfulness'")
    against: Literal["previous", "sft"] = "previous"
    rule: Literal["not_worse", "better"] = "not_worse"


def default_gates() -> list[Gate]:
    """Violation rate not significantly worse and helpfulness not significantly worse, against the last promoted
    policy."""
    return [Gate(metric="violation_rate"), Gate(metric="helpfulness")]


class RoundsConfig(BaseModel):
    """Iterative RLHF rounds: round 0 is the pipeline's SFT and reward models; each later round collects, annotates,
    retrains both reward models, improves the policy with its method, evaluates and gates."""

    model_config = ConfigDict(extra="forbid")

    # the base pipeline (round 0, and the stages every round reuses), as in PipelineConfig
    preset: PipelinePreset = Field("demo-tiny", description="the pipeline preset every stage starts from")
    run_name: str = Field("rounds", pattern=r"^[A-Za-z0-9._-]+$", description="the run directory's name")
    runs_root: str | None = Field(None, description="default: $LLAMA2_ALIGN_RUNS_ROOT or ./runs")
    base_model: str | None = None
    data: DataSettings | None = None
    overrides: dict[str, Any] = Field(default_factory=dict, description='pipeline overrides for every round, e.g. '
                                                                        '{"eval.samples_per_prompt": 2}')
    round_overrides: dict[str, Any] = Field(
        default_factory=dict, description='overrides for rounds >= 1 only, over the preset\'s round defaults: pipeline '
                                          'sections and collect.*, e.g. {"reward_helpfulness.epochs": 1}')
    # the rounds
    rounds: int = Field(3, ge=1, le=50, description="rounds after round 0")
    methods: list[Method] = Field(default_factory=lambda: ["rs", "rs", "rs+ppo"],
                                  description="each round's method: rs, ppo or rs+ppo; the last repeats")
    prompts_per_round: int | None = Field(None, ge=1, description="default: the preset's")
    samples_per_prompt: int = Field(2, ge=2, description="answers per prompt, half from each variant")
    second_variant: Literal["same", "previous"] = Field(
        "same", description="variant B of a pair: the same policy at the second temperature, or the policy promoted "
                            "before it (SFT until there is one)")
    annotator: Literal["simulated", "human"] = Field("simulated", description="simulated: the demo world's own "
                                                                              "preference process")
    test_fraction: float | None = Field(None, gt=0, lt=1, description="share of each round's pairs kept aside (never "
                                                                     "trained on) to measure RM staleness; default: "
                                                                     "the preset's (the demo 0.35, else 0.2)")
    gates: list[Gate] = Field(default_factory=default_gates)
    prompt_files: list[str] = Field(default_factory=list, description="real data: one prompts file per round")
    prompt_pool: str | None = Field(None, description="real data: a prompts file; each round takes the next "
                                                      "prompts_per_round prompts no earlier round used")
    seed: int = 0
    annotation_timeout_h: float = Field(168.0, gt=0, description="how long a round waits for labels")
    annotation_poll_s: int = Field(10, ge=1, description="how often a paused local run checks for labels")

    def pipeline_config(self, overrides: dict[str, Any] | None = None) -> PipelineConfig:
        fields = self.model_dump(include={"preset", "run_name", "base_model", "data"}, exclude_none=True)
        if self.runs_root is not None:
            fields["runs_root"] = self.runs_root
        return PipelineConfig(**fields, overrides={**self.overrides, **(overrides or {})})


#: What differs for rounds >= 1, per pipeline preset (data, like presets.py): keys as in ``round_overrides``.
#: Warm-started reward models take one epoch over all pairs so far (the paper's one epoch); the demo's rejection
#: sampling fine-tunes the promoted policy gently on a seeded subset of the prompts, sampled at temperature 0.7
#: (seen on seed 0 with rs, rs, rs+ppo, before the RM/value heads were seeded: at temperature 1.0 and lr 1e-3 round 1
#: lost 3.9 points of helpfulness and the last round ended +0.1 [-6.8, +6.8] points above SFT; at 0.7 and lr 3e-4
#: each rs round gained 4-5 points and the last ended +11.2 [+6.5, +16.1]: the tiny policy's samples at temperature 1
#: carry broken words the tiny RM misses).
_DEMO_ROUNDS = {
    "collect.max_new_tokens": 24, "collect.generation_batch_size": 64,
    "reward_helpfulness.epochs": 1.0, "reward_safety.epochs": 1.0,
    # Warm starts at a lower learning rate than the RMs' first training (helpfulness 5e-4, safety 1e-3): at those,
    # the retrained safety RM scored the round's test pairs below the previous RM in 4 of 6 rounds (seeds 0 and 1;
    # most of a round's safety pairs are two refusals, ordered by a coin flip, which it fitted), the helpfulness RM
    # in 1 of 6. Retrained offline on the same pairs, safety at 1e-4 and helpfulness at 2.5e-4 were above the
    # previous RM in every round (bench/README.md, "The reward models' warm start in the rounds").
    "reward_helpfulness.learning_rate": 2.5e-4, "reward_safety.learning_rate": 1e-4,
    "rejection_sampling.max_prompts": 256, "rejection_sampling.temperature": 0.7,
    "rejection_sampling.sft.epochs": 2, "rejection_sampling.sft.learning_rate": 3e-4,
    "rejection_sampling.sft.progress_bar": False,
}
_GPU_ROUNDS = {"collect.max_new_tokens": 512, "collect.generation_batch_size": 32}
ROUND_PRESETS: dict[str, dict[str, Any]] = {
    # 2,048 prompts a round (was 512): ~200 helpfulness test pairs a round instead of 50-60, and four times the new
    # pairs for the RMs (seed 0, rs, rs, rs+ppo, heads unseeded then: the last round +20.8 [+17.7, +24.2] points of
    # helpfulness over SFT instead of +11.2; with seeded heads, +17.9 [+14.1, +21.6]; ~4.5 min for three rounds)
    # a 35% test share (was 20%): ~400 helpfulness and ~170 safety test pairs a round, so the staleness table is
    # read above its noise (seed 0, rs, rs, rs+ppo: the previous RM below its held-out accuracy on the new pairs in 6
    # of 6 rows, 5 of 6 with 20%; the last round +19.0 [+14.8, +23.3] points of helpfulness over SFT, +16.8 with 20%)
    "demo-tiny": {"prompts_per_round": 2048, "test_fraction": 0.35, **_DEMO_ROUNDS},
    "demo-micro": {"prompts_per_round": 24, **_DEMO_ROUNDS, "collect.max_new_tokens": 12,
                   "rejection_sampling.max_prompts": 16, "rejection_sampling.k": 2},
    "llama2-7b-lora": {"prompts_per_round": 1000, **_GPU_ROUNDS},
    "llama2-7b": {"prompts_per_round": 1000, **_GPU_ROUNDS},
    "llama2-13b-lora": {"prompts_per_round": 1000, **_GPU_ROUNDS},
    "llama2-70b-lora": {"prompts_per_round": 1000, **_GPU_ROUNDS},
}


class ResolvedRounds(BaseModel):
    """Everything a rounds run needs, resolved once: what the flow runs and state.json records."""

    model_config = ConfigDict(extra="forbid")

    config: RoundsConfig
    round0: ResolvedPipeline
    stages: ResolvedPipeline  # the stage configs of rounds >= 1 (run_dir: the run's)
    collect: CollectConfig
    prompts_per_round: int
    test_fraction: float
    methods: list[Method]  # one per round

    @property
    def run_dir(self) -> Path:
        return Path(self.round0.run_dir)

    @property
    def rounds_dir(self) -> Path:
        return self.run_dir / ROUNDS_DIR

    def round_dir(self, r: int) -> Path:
        return self.rounds_dir / str(r)

    def round_pipeline(self, r: int) -> ResolvedPipeline:
        """Round r's stage configs: run_dir is the round's directory, and the stages that sample get the round's seed
        (evaluation keeps one seed, so every round's answers of SFT are the same answers)."""
        s = self.stages
        rs = s.rejection_sampling
        return s.model_copy(update={
            "run_dir": str(self.round_dir(r)),
            "reward_helpfulness": s.reward_helpfulness.model_copy(update={"seed": s.reward_helpfulness.seed + r}),
            "reward_safety": s.reward_safety.model_copy(update={"seed": s.reward_safety.seed + r}),
            "rejection_sampling": rs.model_copy(update={"seed": rs.seed + r,
                                                        "sft": rs.sft.model_copy(update={"seed": rs.sft.seed + r})}),
            "ppo": s.ppo.model_copy(update={"seed": s.ppo.seed + r})})

    def round_collect(self, r: int) -> CollectConfig:
        return self.collect.model_copy(update={"seed": self.collect.seed + 1000 * r})


def resolve_rounds(config: RoundsConfig) -> ResolvedRounds:
    """The preset's round defaults, then ``round_overrides``; the pipeline resolved for round 0 and for the rounds.
    Refuses what cannot run: the simulated annotator off the demo world, real data without prompts for the rounds."""
    preset_rounds = dict(ROUND_PRESETS.get(config.preset, {}))
    per_round = preset_rounds.pop("prompts_per_round", 256)
    test_fraction = preset_rounds.pop("test_fraction", 0.2)
    merged = {**preset_rounds, **config.round_overrides}
    collect_keys = {k: v for k, v in merged.items() if k.startswith("collect.")}
    stage_keys = {k: v for k, v in merged.items() if not k.startswith("collect.")}
    round0 = resolve(config.pipeline_config())
    stages = resolve(config.pipeline_config(stage_keys))
    try:
        collect = CollectConfig.model_validate({**CollectConfig().model_dump(),
                                                **{k.split(".", 1)[1]: v for k, v in collect_keys.items()},
                                                "samples_per_prompt": config.samples_per_prompt,
                                                "seed": config.seed})
    except ValueError as err:
        raise ConfigError(f"round_overrides: collect: {err}") from err
    if config.samples_per_prompt % 2:
        raise ConfigError(f"samples_per_prompt must be even (half from each variant), got {config.samples_per_prompt}")
    if config.annotator == "simulated" and round0.data.source != "demo":
        raise ConfigError("annotator 'simulated' is the demo world's preference process: it needs data.source 'demo'; "
                          "use annotator 'human' with your own data")
    if round0.data.source != "demo" and not config.prompt_files and not config.prompt_pool:
        raise ConfigError("real data needs the rounds' prompts: set prompt_files (one prompts file per round) or "
                          "prompt_pool (a prompts file the rounds take turns from)")
    if config.prompt_files and len(config.prompt_files) < config.rounds:
        raise ConfigError(f"prompt_files has {len(config.prompt_files)} files for {config.rounds} rounds")
    methods = [config.methods[min(i, len(config.methods) - 1)] for i in range(config.rounds)] if config.methods \
        else ["rs"] * config.rounds
    return ResolvedRounds(config=config, round0=round0, stages=stages, collect=collect,
                          prompts_per_round=config.prompts_per_round or per_round,
                          test_fraction=config.test_fraction or test_fraction, methods=methods)


# --------------------------------------------------------------------------------------------------------------------
# The gates
# --------------------------------------------------------------------------------------------------------------------


def gate_metric(metric: str, candidate: dict) -> str:
    """``helpfulness`` -> the oracle's helpfulness accuracy when the oracle judged, else the RM win rate."""
    if metric != "helpfulness":
        return metric
    return "helpfulness_accuracy" if candidate.get("helpfulness_accuracy") is not None else "win_rate_vs_baseline"


def comparison(eval_metrics: dict, candidate: str, against: str) -> tuple[dict, dict] | None:
    """``(intervals, figures)`` of the candidate against another checkpoint in one evaluation's metrics: against the
    baseline they are the candidate's own ``ci``; against another checkpoint its ``ci_vs.<name>``."""
    cand = eval_metrics["checkpoints"][candidate]
    if against == eval_metrics["baseline"]:
        return cand.get("ci") or {}, cand
    other = (cand.get("ci_vs") or {}).get(against)
    return (other.get("ci") or {}, other) if other is not None else None


def decide_promotion(eval_metrics: dict, gates: list[Gate], candidate: str = "candidate") -> dict:
    """Promote the candidate only if every gate holds. ``eval_metrics`` is the eval stage's metrics
    (``{"baseline", "checkpoints": {name: {metric, ..., "ci", "ci_vs"}}}``); a gate ``against: previous`` compares
    with the checkpoint named ``previous``, or ``sft`` when the last promoted policy is SFT (no ``previous``). A
    gate with no interval fails: promotion needs evidence. Returns ``{"promoted", "checks": [...]}``."""
    cps = eval_metrics["checkpoints"]
    checks = []
    for g in gates:
        against = g.against if g.against in cps else "sft"
        metric = gate_metric(g.metric, cps[candidate])
        found = comparison(eval_metrics, candidate, against) if against in cps else None
        ci = None if found is None else found[0].get(metric)
        said = verdict(metric, ci)
        ok = ci is not None and (said == "better" if g.rule == "better" else said != "worse")
        a, c = cps.get(against, {}).get(metric), cps[candidate].get(metric)
        change = round(c - a, 4) if isinstance(a, (int, float)) and isinstance(c, (int, float)) \
            and metric != "win_rate_vs_baseline" else None
        why = (f"{metric} vs {against}: no interval" if ci is None else
               f"{metric} vs {against}: {said}" + ("" if ok else f" (the gate needs {g.rule.replace('_', ' ')})"))
        checks.append({"metric": metric, "gate": g.metric, "against": against, "rule": g.rule, "change": change,
                       "ci": ci, "verdict": said, "ok": ok, "why": why})
    return {"promoted": all(c["ok"] for c in checks), "checks": checks}


# --------------------------------------------------------------------------------------------------------------------
# Bookkeeping: a round's record, the state file, where the next round starts
# --------------------------------------------------------------------------------------------------------------------


class RoundRecord(BaseModel):
    """One finished round (``rounds/<r>/round.json``)."""

    round: int
    method: Method
    started_from_round: int  # the promoted round whose policy this round improved (0: SFT)
    started_from: str
    candidate: str  # the round's new policy
    promoted: bool
    gate: dict
    reward_models: dict[str, str]  # kind -> the round's retrained reward model
    preferences: str  # all training pairs so far (the next round adds to it)
    staleness: dict
    eval: dict  # the eval stage's metrics (checkpoints, baseline, rules)
    annotation: dict
    collect: dict
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    finished_at: str = ""


class Start(BaseModel):
    """Where round r starts: the last promoted policy, the previous round's reward models and data."""

    round: int  # the promoted round (0: SFT)
    policy: str
    before: str  # the policy promoted before it (SFT when there is none): variant B with second_variant "previous"
    reward_models: dict[str, str]
    preferences: str


def load_round(plan: ResolvedRounds, r: int) -> RoundRecord | None:
    """Round r's record, or None while it is not finished. A rounds run moved to another runs root (``runs_root`` may
    change between invocations) or copied: the paths its record names inside the old run directory (the round's
    policy, reward models, pairs so far) are read as inside this one, as finished stages are
    (``stages.common.moved_to``)."""
    from .stages.common import relocate

    path = plan.round_dir(r) / ROUND_FILE
    if not path.exists():
        return None
    record = RoundRecord.model_validate_json(path.read_text())
    old_round = Path(record.preferences).parent  # every round writes its pairs so far to rounds/<r>/preferences.jsonl
    old, here = old_round.parent.parent, plan.run_dir.resolve()
    if old_round.name != str(r) or old_round.parent.name != ROUNDS_DIR or old.resolve() == here:
        return record
    return RoundRecord.model_validate(relocate(record.model_dump(mode="json"), str(old), str(here)))


def starting_point(records: list[RoundRecord], sft: str, reward_models: dict[str, str], preferences: str) -> Start:
    """Round len(records)+1 starts from the last promoted policy (SFT when no round was promoted), with the latest
    reward models and all pairs so far, whether or not their round was promoted."""
    promoted = [rec for rec in records if rec.promoted]
    last = records[-1] if records else None
    return Start(round=promoted[-1].round if promoted else 0,
                 policy=promoted[-1].candidate if promoted else sft,
                 before=promoted[-2].candidate if len(promoted) > 1 else sft,
                 reward_models=last.reward_models if last else reward_models,
                 preferences=last.preferences if last else preferences)


def state_path(plan: ResolvedRounds) -> Path:
    return plan.rounds_dir / STATE_FILE


def read_state(rounds_dir: str | Path) -> dict | None:
    path = Path(rounds_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:  # written atomically, so only a hand-edit or a disk fault gets here
        raise InputError(f"{path}: not valid JSON ({err}): restore it, or move the run directory aside to start "
                         "again") from None


#: Fields a rounds run may change between invocations of the same run directory (more rounds, another wait).
_MAY_CHANGE = {"rounds", "methods", "annotation_timeout_h", "annotation_poll_s", "runs_root"}


def check_state(plan: ResolvedRounds) -> dict | None:
    """The run directory's state, if any, after checking that it holds this rounds run: a different config is
    refused (naming the fields), except more rounds, another wait for labels, and the methods of rounds not yet
    done."""
    state = read_state(plan.rounds_dir)
    now = plan.config.model_dump(mode="json")
    if state is not None:
        before = state["config"]
        changed = sorted(k for k in now if k not in _MAY_CHANGE and before.get(k) != now[k])
        done = [rec.round for rec in completed_rounds(plan)]
        changed += [f"methods[{r - 1}]" for r in done if r <= len(plan.methods)
                    and state.get("methods", [])[r - 1:r] != [plan.methods[r - 1]]]
        if changed:
            raise ConfigError(f"{plan.run_dir} holds a rounds run with another config ({', '.join(changed)} differ); "
                              "use another run name, or the same config")
    return state


def open_state(plan: ResolvedRounds) -> dict:
    """Create or re-open ``rounds/state.json`` (see :func:`check_state`)."""
    state = check_state(plan)
    state = {**(state or {}), "config": plan.config.model_dump(mode="json"), "methods": plan.methods,
             "status": "running", "paused": None, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(state_path(plan), state)
    return state


def update_state(plan: ResolvedRounds, **fields: Any) -> dict:
    state = read_state(plan.rounds_dir) or {}
    state.update(fields, updated_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    records = completed_rounds(plan)
    promoted = [rec for rec in records if rec.promoted]
    state["rounds"] = [{"round": rec.round, "method": rec.method, "promoted": rec.promoted,
                        "candidate": rec.candidate} for rec in records]
    state["promoted"] = {"round": promoted[-1].round if promoted else 0,
                         "policy": promoted[-1].candidate if promoted else None}
    atomic_write_json(state_path(plan), state)
    return state


def completed_rounds(plan: ResolvedRounds) -> list[RoundRecord]:
    """The finished rounds, in order, up to the first one that is not finished."""
    out = []
    for r in range(1, plan.config.rounds + 1):
        rec = load_round(plan, r)
        if rec is None:
            break
        out.append(rec)
    return out


def write_round(plan: ResolvedRounds, record: RoundRecord) -> RoundRecord:
    record = record.model_copy(update={"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    atomic_write_json(plan.round_dir(record.round) / ROUND_FILE, record.model_dump(mode="json"))
    update_state(plan)
    return record


# --------------------------------------------------------------------------------------------------------------------
# A round's data: prompts, pairs to label, labels, the split, all pairs so far, reward-model accuracy
# --------------------------------------------------------------------------------------------------------------------


def write_round_prompts(plan: ResolvedRounds, r: int) -> Path:
    """``rounds/<r>/prompts.jsonl``: a prompts file of its own, the next unused slice of the pool, or the demo world's
    round prompts (training split, the round's seed). Written once."""
    out = plan.round_dir(r) / "prompts.jsonl"
    if out.exists():
        return out
    c, n = plan.config, plan.prompts_per_round
    if c.prompt_files:
        records = read_records(c.prompt_files[r - 1], "prompts")[:n]
    elif c.prompt_pool:
        pool = read_records(c.prompt_pool, "prompts")
        if len(pool) < r * n:
            raise InputError(f"{c.prompt_pool}: {len(pool)} prompts; round {r} needs prompts {(r - 1) * n + 1}.."
                             f"{r * n} ({n} a round, none used twice)")
        records = pool[(r - 1) * n: r * n]
    else:
        from .demo_world import DemoSizes, round_prompts

        d = plan.round0.data
        sizes = DemoSizes.micro() if d.demo_sizes == "micro" else DemoSizes()
        records = round_prompts(r, n, seed=d.demo_seed, sizes=sizes)
    return write_jsonl(records, out)


def read_pairs(collect_dir: str | Path) -> list[dict]:
    from .io import read_jsonl

    return read_jsonl(Path(collect_dir) / PAIRS_FILE)


def to_label_records(pairs: list[dict]) -> list[dict]:
    """The pairs as preference records with the label left to people: ``chosen`` is answer A and ``rejected`` answer
    B (swap them when B is better), ``rating`` empty, ``category`` from the prompt (safety for adversarial
    prompts), the safety flags empty. The file is refused until every rating is filled in."""
    out = []
    for p in pairs:
        rec = {"id": p["id"], "chosen": p["response_a"], "rejected": p["response_b"], "rating": "",
               "category": "safety" if p.get("is_safety") else "helpfulness", "chosen_safe": None,
               "rejected_safe": None}
        rec.update({"prompt": p["prompt"]} if p.get("prompt") else {"messages": p["messages"]})
        out.append(rec)
    return out


def accept_labels(path: str | Path, out: Path) -> list[PreferenceRecord]:
    """Validate a labelled file against the preference contract (every record, all or nothing) and copy it into the
    round as ``labels.jsonl``. Raises ``DataValidationError`` (an InputError) naming every problem."""
    records = read_records(path, "preference")
    if Path(path).resolve() != out.resolve():
        write_jsonl(records, out)
    return records


def simulate_labels(plan: ResolvedRounds, r: int, collect_dir: str | Path) -> Path:
    """The simulated annotator's labels for the round's pairs: ``labels.jsonl`` and ``annotation.json`` (its counts
    and flipped labels). Written once."""
    from . import demo_annotator

    d = plan.round_dir(r)
    out, summary = d / "labels.jsonl", d / "annotation.json"
    if out.exists() and summary.exists():
        return out
    records, notes = demo_annotator.annotate(read_pairs(collect_dir), seed=plan.config.seed + r)
    if not records:
        raise InputError(f"round {r}: no pair to label: every pair's two answers were the same text")
    write_jsonl(validate_records(records, "preference"), out)
    atomic_write_json(summary, {"annotator": "simulated", **demo_annotator.summarize_notes(records, notes)})
    return out


def write_annotation_summary(records: list[PreferenceRecord], out: Path, annotator: str) -> dict:
    by: dict[str, dict[str, int]] = {}
    for x in records:
        by.setdefault(x.category, {}).setdefault(x.rating, 0)
        by[x.category][x.rating] += 1
    summary = {"annotator": annotator, "pairs": len(records), "by_category_rating": by}
    atomic_write_json(out, summary)
    return summary


def split_round_pairs(plan: ResolvedRounds, r: int, labels: Path, preferences: str) -> dict[str, str]:
    """The round's labelled pairs split per category into training and test pairs (``test_fraction``, seeded), and
    ``preferences.jsonl``: every training pair so far (``preferences`` + this round's). Written once."""
    from .stages.reward import split_heldout

    d = plan.round_dir(r)
    paths = {"train": d / "train_pairs.jsonl", "test": d / "test_pairs.jsonl", "preferences": d / "preferences.jsonl"}
    if not all(p.exists() for p in paths.values()):
        records = read_records(labels, "preference")
        train, test = split_heldout(records, plan.test_fraction, 10**9, plan.config.seed + r)
        write_jsonl(train, paths["train"])
        write_jsonl(test, paths["test"])
        # round 0's pairs may be in HH-RLHF's or PKU-SafeRLHF's format: all pairs so far are written natively
        write_jsonl(read_records(preferences, "preference") + train, paths["preferences"])
    return {k: str(v) for k, v in paths.items()}


def rm_accuracy(reward_models: dict[str, str], pairs: str | Path, out: Path, batch_size: int = 64) -> dict:
    """Each reward model's accuracy on the pairs of its own category (helpfulness RM on helpfulness pairs, safety RM
    on safety pairs): overall, on the decisive pairs (all but negligibly better) and by rating, with its own
    held-out accuracy from training. Written to ``out`` once."""
    if out.exists():
        return json.loads(out.read_text())
    from .stages.common import load_result
    from .stages.reward import RewardScorer, evaluate_pairs

    records = read_records(pairs, "preference")
    result: dict[str, dict] = {}
    for kind, path in reward_models.items():
        sel = [x for x in records if x.category == kind]
        done = load_result(Path(path).parent)
        heldout = (done.metrics.get("accuracy_by_category") or {}).get(kind) if done else None
        entry: dict[str, Any] = {"model": str(path), "pairs": len(sel), "heldout_accuracy": heldout}
        if sel:
            m = evaluate_pairs(RewardScorer(path, batch_size=batch_size), sel, per_pair=True)
            counts = {rt: sum(x.rating == rt for x in sel) for rt in m["accuracy_by_rating"]}
            decisive = {rt: n for rt, n in counts.items() if rt != "negligibly_better" and n}
            right = sum(m["accuracy_by_rating"][rt] * n for rt, n in decisive.items())
            entry.update(accuracy=m["accuracy"], accuracy_by_rating=m["accuracy_by_rating"], pairs_by_rating=counts,
                         decisive_pairs=sum(decisive.values()),
                         accuracy_decisive=round(right / sum(decisive.values()), 4) if decisive else None,
                         pair_ids=[x.id for x in sel], correct=m["correct"],
                         decisive=[int(x.rating != "negligibly_better") for x in sel])
        result[kind] = entry
    atomic_write_json(out, result)
    return result


def accuracy_change(before: dict, after: dict, decisive_only: bool = False) -> dict | None:
    """The retrained model's accuracy minus the previous one's on the same pairs, with a 95% paired-bootstrap
    interval over the pairs (``{"change", "ci", "verdict"}``, as the report's other changes); None when the per-pair
    results are missing or not the same pairs."""
    from .stats import paired_bootstrap, verdict

    b, a = before.get("correct"), after.get("correct")
    if not b or not a or before.get("pair_ids") != after.get("pair_ids"):
        return None
    keep = [i for i, d in enumerate(before.get("decisive") or [1] * len(b)) if d or not decisive_only]
    if not keep:
        return None
    boot = paired_bootstrap([b[i] for i in keep], [a[i] for i in keep])
    ci = [round(x, 4) for x in boot["ci"]]
    return {"change": round(boot["estimate"], 4), "ci": ci, "verdict": verdict("accuracy", ci)}


def staleness(before: dict, after: dict) -> dict:
    """Per reward model: the previous model's held-out accuracy (on data like its training data), its accuracy on
    the round's test pairs (the new policy's answers), and the retrained model's on the same pairs, with the
    change's paired-bootstrap interval (all pairs, and the decisive ones)."""
    out = {}
    for kind in before:
        b, a = before[kind], after.get(kind, {})
        out[kind] = {"pairs": b.get("pairs"), "previous_heldout": b.get("heldout_accuracy"),
                     "before": b.get("accuracy"), "after": a.get("accuracy"),
                     "before_decisive": b.get("accuracy_decisive"), "after_decisive": a.get("accuracy_decisive"),
                     "decisive_pairs": b.get("decisive_pairs"), "change": accuracy_change(b, a),
                     "change_decisive": accuracy_change(b, a, decisive_only=True)}
    return out


def pool_staleness(per_round: Sequence[tuple[int, dict, dict]]) -> dict:
    """Every round's test pairs together, per reward model: each round's previous RM and its retrained one on that
    round's pairs (``per_round``: ``(round, before, after)`` as :func:`rm_accuracy` writes them). One round's pairs
    are too few to show a change of a point or two (most of a late round's safety pairs are two refusals, ordered by
    a coin flip), so this asks the question over all of them: does retraining on the new pairs recover accuracy on
    the new policy's answers? The same fields as :func:`staleness` (without ``previous_heldout``, which differs by
    round) plus ``rounds`` and ``by_rating`` (``{rating: {"pairs", "before", "after"}}``: where the accuracy is
    lost, e.g. on coin-flip pairs); a model whose per-pair results are missing in some round is left out."""
    before: dict[str, dict] = {}
    after: dict[str, dict] = {}
    rounds: dict[str, list[int]] = {}
    complete: dict[str, bool] = {}
    by_rating: dict[str, dict[str, list[int]]] = {}
    for r, b, a in per_round:
        for kind, eb in b.items():
            ea = a.get(kind) or {}
            ok = bool(eb.get("correct")) and eb.get("pair_ids") == ea.get("pair_ids") and bool(ea.get("correct"))
            complete[kind] = complete.get(kind, True) and ok
            rounds.setdefault(kind, []).append(r)
            for rating, n in (eb.get("pairs_by_rating") or {}).items():
                if n:
                    right = [round((e.get("accuracy_by_rating") or {}).get(rating, 0) * n) for e in (eb, ea)]
                    acc = by_rating.setdefault(kind, {}).setdefault(rating, [0, 0, 0])
                    acc[0], acc[1], acc[2] = acc[0] + n, acc[1] + right[0], acc[2] + right[1]
            for store, e in ((before, eb), (after, ea)):
                s = store.setdefault(kind, {"pair_ids": [], "correct": [], "decisive": []})
                s["pair_ids"] += [f"{r}:{i}" for i in e.get("pair_ids") or []]
                s["correct"] += list(e.get("correct") or [])
                s["decisive"] += list(eb.get("decisive") or [1] * len(eb.get("correct") or []))
    out = {}
    for kind in before:
        if not complete[kind]:
            continue
        for s in (before[kind], after[kind]):
            n, dec = len(s["correct"]), [c for c, d in zip(s["correct"], s["decisive"]) if d]
            s.update(pairs=n, accuracy=round(sum(s["correct"]) / n, 4), decisive_pairs=len(dec),
                     accuracy_decisive=round(sum(dec) / len(dec), 4) if dec else None)
        out[kind] = {"rounds": rounds[kind], **staleness({kind: before[kind]}, {kind: after[kind]})[kind],
                     "by_rating": {rt: {"pairs": n, "before": round(b / n, 4), "after": round(a / n, 4)}
                                   for rt, (n, b, a) in (by_rating.get(kind) or {}).items()}}
        del out[kind]["previous_heldout"]
    return out


def pooled_staleness(plan: ResolvedRounds, records: Sequence[RoundRecord]) -> dict:
    """:func:`pool_staleness` over the completed rounds' ``staleness-before.json`` and ``staleness-after.json``."""
    per_round = []
    for rec in records:
        d = plan.round_dir(rec.round)
        try:
            per_round.append((rec.round, json.loads((d / STALENESS_BEFORE).read_text()),
                              json.loads((d / STALENESS_AFTER).read_text())))
        except (OSError, ValueError):
            continue
    return pool_staleness(per_round)


def finish_round(plan: ResolvedRounds, r: int, start: Start, candidate: str, reward_models: dict[str, str],
                 preferences: str, before: dict, after: dict, eval_result: dict, collect_result: dict,
                 stage_seconds: dict[str, float]) -> RoundRecord:
    """Gate the round's candidate, and write the round's record (``round.json``, last) and the state."""
    annotation = json.loads((plan.round_dir(r) / "annotation.json").read_text())
    record = RoundRecord(
        round=r, method=plan.methods[r - 1], started_from_round=start.round, started_from=start.policy,
        candidate=candidate, gate=decide_promotion(eval_result["metrics"], plan.config.gates),
        reward_models=reward_models, preferences=preferences, staleness=staleness(before, after),
        eval={k: eval_result["metrics"][k] for k in ("checkpoints", "baseline", "rules")}, annotation=annotation,
        collect=collect_result.get("metrics", {}), stage_seconds=stage_seconds, promoted=False)
    return write_round(plan, record.model_copy(update={"promoted": record.gate["promoted"]}))

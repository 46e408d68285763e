"""Multi-turn instruction adherence (the paper's Table 30 / Figure 28 measure of Ghost Attention).

Held-out questions (the eval file's non-adversarial prompts) are chained into dialogues of ``turns`` turns, each
with a checkable system instruction (``multiturn``) given once, as the system prompt of the first turn. Every
checkpoint answers every turn itself, seeing its own earlier answers. Each assistant turn is judged twice:

* adherence: does the answer obey the instruction (every constraint)?
* helpfulness: the oracle's verdict on the turn's question (demo world), and the helpfulness RM's score of the
  answer in its context when an RM is given, so that obeying at the expense of answering shows.

Per checkpoint: both by turn (1..``turns``), over the late turns (``late_turn`` and beyond), per constraint kind; and
for each checkpoint but the baseline, paired-bootstrap intervals over dialogues of its difference from the baseline
(``llama2_align.stats``). Files: ``adherence.json`` (the table), ``dialogues.json`` (every answer with its
judgement), ``adherence.png`` (adherence and helpfulness against the turn, per checkpoint).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..data import read_records
from ..errors import ConfigError, InputError
from ..io import atomic_write_json
from ..multiturn import Instruction, make_dialogues
from ..stats import paired_bootstrap
from ..tokenizer import load_tokenizer
from .common import StageOutput, StageRun, stage
from .gatt import InstructionSettings, dialogue_messages, roll_dialogues

PLOT_FILE = "adherence.png"


class AdherenceConfig(InstructionSettings):
    enabled: bool = Field(False, description="run the multi-turn evaluation (it also runs whenever gatt is enabled)")
    dialogues: int = Field(64, ge=1)
    turns: int = Field(8, ge=1, description="assistant turns per dialogue (the paper's Table 30 goes to 20)")
    late_turn: int = Field(6, ge=1, description="'late' adherence pools this turn and the ones after it")
    samples_per_dialogue: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1)
    score_batch_size: int = Field(64, ge=1)
    bootstrap_resamples: int = Field(2000, ge=1)
    seed: int = 4321
    dtype: str = "auto"


class AdherenceInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoints: dict[str, str]  # name -> policy
    baseline: str  # the policy before GAtt: every other checkpoint's difference from it gets an interval
    prompts: str  # kind "eval"; its non-adversarial prompts become the turns
    reward_helpfulness: str | None = None


def eval_dialogues(config: AdherenceConfig, prompts_path: str) -> tuple[list[dict], dict[str, dict]]:
    """The evaluation dialogues (``turns`` turns each, the same for every checkpoint) and the eval record of each
    prompt text (what the oracle judges a turn by)."""
    from ..demo_dialogues import satisfiable

    records = {r.prompt: r.model_dump() for r in read_records(prompts_path, "eval") if r.category != "adversarial"}
    if not records:
        raise InputError(f"{prompts_path}: the multi-turn evaluation needs non-adversarial prompts, found none")
    dialogues = make_dialogues(list(records), config.dialogues, config.turns, config.turns, config.seed,
                               config.max_constraints, config.short_rate, satisfiable=satisfiable,
                               kinds=config.constraint_kinds, values=config.constraint_values)
    return dialogues, records


def judge_dialogues(dialogues: list[dict], rolled: list[dict], records: dict[str, dict]) -> list[list[dict]]:
    """Per dialogue, per turn: :func:`demo_dialogues.judge_turn` (adherence, and the oracle where it can judge)."""
    from ..demo_dialogues import judge_turn

    out = []
    for d, r in zip(dialogues, rolled):
        inst = Instruction.from_dict(d["instruction"])
        out.append([judge_turn(inst, a, records.get(q), done)
                    for q, a, done in zip(d["turns"], r["answers"], r["finished"])])
    return out


def _rate(values: list) -> float | None:
    values = [float(v) for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def by_turn(judged: list[list[dict]], key: str, turns: int) -> list[float | None]:
    return [_rate([j[t][key] for j in judged if len(j) > t]) for t in range(turns)]


def summarize_checkpoint(dialogues: list[dict], judged: list[list[dict]], config: AdherenceConfig) -> dict:
    late = range(config.late_turn - 1, config.turns)
    m = {key + "_by_turn": by_turn(judged, key, config.turns)
         for key in ("obeyed", "correct", "refusal", "rm_helpfulness")}
    m = {k.replace("obeyed", "adherence").replace("correct", "helpfulness"): v for k, v in m.items()}
    m["adherence_late"] = _rate([j[t]["obeyed"] for j in judged for t in late if t < len(j)])
    m["helpfulness_late"] = _rate([j[t]["correct"] for j in judged for t in late if t < len(j)])
    m["adherence_all"] = _rate([x["obeyed"] for j in judged for x in j])
    m["no_eos_frac"] = round(1 - _rate([x["finished"] for j in judged for x in j]), 4)
    kinds: dict[str, dict] = {}
    for d, j in zip(dialogues, judged):
        for c in d["instruction"]["constraints"]:
            k = kinds.setdefault(c["kind"], {"first": [], "late": []})
            k["first"].append(j[0]["constraints"][c["kind"]])
            k["late"] += [j[t]["constraints"][c["kind"]] for t in late if t < len(j)]
    m["by_constraint"] = {k: {"turn_1": _rate(v["first"]), "late": _rate(v["late"]), "n": len(v["first"])}
                          for k, v in sorted(kinds.items())}
    m["late_turn"], m["turns"], m["dialogues"] = config.late_turn, config.turns, len(judged)
    return m


def _grouped(ids: list[int], judged: list[list[dict]], key: str, turns: range) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for i, j in zip(ids, judged):
        vals = [float(j[t][key]) for t in turns if t < len(j) and j[t][key] is not None]
        out.setdefault(i, []).extend(vals)
    return {i: v for i, v in out.items() if v}


def intervals(ids: list[int], base: list[list[dict]], cand: list[list[dict]], config: AdherenceConfig) -> dict:
    """Paired-bootstrap intervals over dialogues (a dialogue's samples and turns kept together) of candidate -
    baseline: adherence and helpfulness, late turns pooled and per turn."""
    out: dict = {}
    for key, name in (("obeyed", "adherence"), ("correct", "helpfulness")):
        spans = {"late": range(config.late_turn - 1, config.turns)}
        spans.update({t: range(t, t + 1) for t in range(config.turns)})
        per_turn = []
        for label, span in spans.items():
            gb, gc = _grouped(ids, base, key, span), _grouped(ids, cand, key, span)
            common = [i for i in gb if i in gc]
            ci = None
            if common:
                r = paired_bootstrap([gb[i] for i in common], [gc[i] for i in common],
                                     resamples=config.bootstrap_resamples, seed=config.seed)
                ci = [round(x, 4) for x in r["ci"]]
            if label == "late":
                out[f"{name}_late"] = ci
            else:
                per_turn.append(ci)
        out[f"{name}_by_turn"] = per_turn
    return out


def rate_bands(ids: list[int], judged: list[list[dict]], key: str, config: AdherenceConfig) -> list:
    """Per turn, a 95% bootstrap interval of the rate itself (over dialogues), for the plot's bands."""
    bands = []
    for t in range(config.turns):
        g = _grouped(ids, judged, key, range(t, t + 1))
        if not g:
            bands.append(None)
            continue
        r = paired_bootstrap([[0.0] * len(v) for v in g.values()], list(g.values()),
                             resamples=config.bootstrap_resamples, seed=config.seed)
        bands.append([round(x, 4) for x in r["ci"]])
    return bands


def _score_turns(scorer, dialogues: list[dict], rolled: list[dict], judged: list[list[dict]]) -> None:
    """The helpfulness RM's score of every answer in its context (into ``judged[..]["rm_helpfulness"]``)."""
    contexts, answers, where = [], [], []
    for i, (d, r) in enumerate(zip(dialogues, rolled)):
        inst = Instruction.from_dict(d["instruction"]).text
        for t, a in enumerate(r["answers"]):
            contexts.append(dialogue_messages(d["turns"][: t + 1], r["answers"][:t], inst))
            answers.append(a)
            where.append((i, t))
    for (i, t), s in zip(where, scorer.score(contexts, answers).tolist()):
        judged[i][t]["rm_helpfulness"] = round(float(s), 4)


@stage("adherence")
def run_adherence(config: AdherenceConfig, inputs: AdherenceInputs, run: StageRun) -> StageOutput:
    """Every checkpoint answers the same multi-turn dialogues; adherence and helpfulness by turn, with intervals."""
    from ..generation import GenerationSettings
    from ..model import build_model, freeze

    if inputs.baseline not in inputs.checkpoints:
        raise ConfigError(f"baseline {inputs.baseline!r} is not one of the checkpoints {sorted(inputs.checkpoints)}")
    if config.late_turn > config.turns:
        raise ConfigError(f"adherence: late_turn ({config.late_turn}) is beyond turns ({config.turns})")
    dialogues, records = eval_dialogues(config, inputs.prompts)
    expanded = [d for d in dialogues for _ in range(config.samples_per_dialogue)]
    ids = [i for i in range(len(dialogues)) for _ in range(config.samples_per_dialogue)]
    settings = GenerationSettings(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                  top_p=config.top_p, batch_size=config.batch_size, seed=config.seed)
    scorer = None
    if inputs.reward_helpfulness:
        from .reward import RewardScorer

        scorer = RewardScorer(inputs.reward_helpfulness, dtype=config.dtype, batch_size=config.score_batch_size)
    names = [inputs.baseline] + [n for n in inputs.checkpoints if n != inputs.baseline]
    judged, rolled, metrics = {}, {}, {}
    for k, name in enumerate(names):
        model = freeze(build_model(inputs.checkpoints[name], "policy", dtype=config.dtype))
        rolled[name] = roll_dialogues(model, load_tokenizer(inputs.checkpoints[name]), expanded, settings)
        del model
        judged[name] = judge_dialogues(expanded, rolled[name], records)
        for row in judged[name]:
            for x in row:
                x["rm_helpfulness"] = None
        if scorer is not None:
            _score_turns(scorer, expanded, rolled[name], judged[name])
        metrics[name] = summarize_checkpoint(expanded, judged[name], config)
        metrics[name]["bands"] = {"adherence": rate_bands(ids, judged[name], "obeyed", config),
                                  "helpfulness": rate_bands(ids, judged[name], "correct", config)}
        run.report(k + 1, len(names), {"checkpoint": name, "adherence_late": metrics[name]["adherence_late"]})
    for name in names[1:]:
        metrics[name]["ci"] = intervals(ids, judged[inputs.baseline], judged[name], config)
    return _finish(run, list(inputs.checkpoints), expanded, rolled, judged, metrics, inputs.baseline)


def _finish(run: StageRun, names, expanded, rolled, judged, metrics, baseline) -> StageOutput:
    from ..plots import plot_by_turn

    run.out_dir.mkdir(parents=True, exist_ok=True)
    table = {"checkpoints": metrics, "baseline": baseline, "order": names}  # JSON files sort their keys
    atomic_write_json(run.out_dir / "adherence.json", table)
    atomic_write_json(run.out_dir / "dialogues.json", [
        {"turns": d["turns"], "instruction": d["instruction"]["text"],
         **{n: [{"answer": a, **j} for a, j in zip(rolled[n][i]["answers"], judged[n][i])] for n in names}}
        for i, d in enumerate(expanded[:50])])
    artifacts = {"table": "adherence.json", "dialogues": "dialogues.json"}
    panels = {"adherence": {n: metrics[n]["adherence_by_turn"] for n in names},
              "helpfulness (oracle)": {n: metrics[n]["helpfulness_by_turn"] for n in names}}
    bands = {"adherence": {n: metrics[n]["bands"]["adherence"] for n in names},
             "helpfulness (oracle)": {n: metrics[n]["bands"]["helpfulness"] for n in names}}
    if plot_by_turn(panels, run.out_dir / PLOT_FILE, "System instruction over a dialogue (95% bands)", bands):
        artifacts["adherence_plot"] = PLOT_FILE
    return StageOutput(final=None, metrics=table, steps=len(names), artifacts=artifacts)

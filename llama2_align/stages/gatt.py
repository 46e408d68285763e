"""Ghost Attention (GAtt, Llama 2 §3.3): keep a system instruction alive over a whole dialogue.

0. warm-up  (``demonstrations`` N > 0) fine-tune the policy on N single-turn instruction demonstrations
            (``inputs.demonstrations``): GAtt can only carry over the turns what the policy obeys at the first turn
            with the instruction in front of it, and it keeps only obeying answers (the demo's tiny policy worded
            few answers without "is" where the usual answer holds it, so GAtt had few such turns to train);
1. build    dialogues of independent questions (the prompts file's non-safety prompts, 1..``max_turns`` turns; with
            ``safety_share`` > 0 that share of the turns from its safety prompts) and give each an instruction
            ``inst`` (``multiturn``: checkable constraints combined at random, half the time shortened);
2. sample   every assistant turn from the latest policy with ``inst`` concatenated to every user turn
            (``concat_template``), turn by turn, so each answer sees the earlier sampled answers (with
            ``sample_context="turn"``, its own user turn alone: the dialogues' questions are independent, and a small
            policy's answers late in a long context are mostly wrong, so GAtt would teach wrong answers); with
            ``samples_per_turn`` k > 1, k answers per turn and the dialogue goes on with the obeying one the
            helpfulness RM scores highest (best of k, as rejection sampling: GAtt teaches whatever it samples; a
            safety turn's by the safety RM, Llama 2's reward switch);
3. rebuild  the dialogue with ``inst`` only in the first turn, as the system prompt of the Llama 2 format;
4. train    with zero loss on every token of the earlier turns (earlier answers included) and full loss on the last
            answer: the SFT stage with ``loss_on="last_answer"`` (``<out_dir>/sft``, which resumes by itself). By
            default (``train_on="every_turn"``) every sampled turn is the last turn of one example, the dialogue cut
            after it, so late turns are trained as often as they were sampled; ``train_on="dialogue"`` trains the
            same answers with one example per dialogue, the answers not trained weighted 0 (the same per-token
            losses, each dialogue encoded once instead of once per turn).

With ``passes`` p > 1, steps 1-4 run p times, each later pass on fresh dialogues (seed + pass - 1) sampled from the
policy the pass before made: it obeys more often, so more turns find an obeying answer among their k (the demo's
policy rarely words an answer without "is" before GAtt, and more often after one pass).

Stage directory: ``warm-up/`` (``demonstrations.jsonl`` and the fine-tune ``sft/``, with a warm-up),
``gatt_samples.json`` (every dialogue with its sampled answers; reused on a re-run with the same
sampling settings, so a crash during fine-tuning never re-samples), ``gatt.jsonl`` (the training dialogues),
``sft/`` (the inner SFT stage), ``samples.json``; the same for pass n > 1 in ``pass-<n>/``; ``final/`` (hard links
to the last pass's ``sft/final``), ``result.json`` (last; its metrics are the last pass's, with every pass's under
``passes`` when there are several).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .. import dist
from ..chat import encode_dialog
from ..data import plain_messages, read_records, write_jsonl
from ..errors import InputError
from ..io import atomic_write_json
from ..multiturn import CONSTRAINT_KINDS, Instruction, constraint_values, make_dialogues, with_instruction
from ..tokenizer import load_tokenizer
from .common import FINAL_DIR, StageOutput, StageRun, stage
from .rejection_sampling import _link_tree
from .sft import SFTConfig, SFTInputs, run_sft

if TYPE_CHECKING:
    from ..generation import GenerationSettings

SAMPLES_FILE = "gatt_samples.json"
DATA_FILE = "gatt.jsonl"
SFT_DIR = "sft"
PASS_DIR_PREFIX = "pass-"
WARM_UP_DIR = "warm-up"
DEMONSTRATIONS_FILE = "demonstrations.jsonl"
#: The instruction concatenated to a user turn as the Llama 2 format writes a system prompt (the form in which the
#: model has learnt to follow instructions).
SYSTEM_BLOCK_TEMPLATE = "<<SYS>>\n{inst}\n<</SYS>>\n\n{user}"


def _sft_default() -> SFTConfig:
    return SFTConfig(loss_on="last_answer", epochs=1.0)


class InstructionSettings(BaseModel):
    """How instructions are drawn (``multiturn``): shared by GAtt and the multi-turn adherence evaluation."""

    model_config = ConfigDict(extra="forbid")

    max_constraints: int = Field(2, ge=1, description="constraints combined into one instruction (at most)")
    short_rate: float = Field(0.5, ge=0, le=1, description="share of instructions shortened (paper: half)")
    constraint_kinds: list[Literal["signoff", "capitals", "start_word", "avoid_word"]] = Field(
        default_factory=lambda: list(CONSTRAINT_KINDS), min_length=1, description="the constraints instructions draw")
    constraint_values: dict[Literal["signoff", "start_word", "avoid_word"], list[str]] = Field(
        default_factory=dict, description="narrow a kind's values to some of multiturn.VALUES (the demo: one each)")

    @field_validator("constraint_values")
    @classmethod
    def _known_values(cls, values: dict) -> dict:
        constraint_values(values)  # an InputError (a ValueError) for a value multiturn does not have
        return values


class GAttConfig(InstructionSettings):

    enabled: bool = Field(False, description="run Ghost Attention in the pipeline (after RLHF)")
    dialogues: int = Field(512, ge=1, description="synthetic dialogues to sample")
    min_turns: int = Field(1, ge=1)
    max_turns: int = Field(8, ge=1)
    concat_template: str = Field(SYSTEM_BLOCK_TEMPLATE, description="how inst is concatenated to a user turn while "
                                                                    "sampling ({inst}, {user})")
    sample_context: Literal["dialogue", "turn"] = Field(
        "dialogue", description="what each sampled answer sees: dialogue, the earlier turns and their sampled answers "
                                "(the paper's reading); turn, its own user turn alone (with inst), for dialogues of "
                                "independent questions and a policy whose answers degrade with a long context")
    train_on: Literal["every_turn", "dialogue", "last_turn"] = Field(
        "every_turn", description="every_turn: each sampled turn is the last (and only trained) turn of one example, "
                                  "the dialogue cut after it; dialogue: the same answers trained, one example per "
                                  "dialogue (cut after its last trained turn), the others weight 0: the same "
                                  "per-token losses at a fraction of the tokens; last_turn: one example per "
                                  "dialogue, its last turn")
    require_obeyed: bool = Field(False, description="keep only examples whose trained answer obeys inst (last_turn: "
                                                    "whose every sampled answer obeys)")
    require_finished: bool = Field(True, description="keep only examples whose every answer ended with EOS")
    samples_per_turn: int = Field(1, ge=1, description="answers sampled per turn; with more than one, the turn keeps "
                                                        "the obeying, finished answer the helpfulness RM scores "
                                                        "highest (best of k, as rejection sampling; a safety turn: "
                                                        "the safety RM)")
    safety_share: float = Field(0.0, ge=0, lt=1, description="share of the dialogues' turns drawn from the prompts "
                                                             "file's safety prompts (is_safety), so that GAtt also "
                                                             "trains safe answers under an instruction")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    score_batch_size: int = Field(64, ge=1)
    generation_batch_size: int = Field(64, ge=1)
    num_samples: int = Field(4, ge=0, description="training dialogues written to samples.json")
    demonstrations: int = Field(0, ge=0, description="warm-up: fine-tune the policy on the first N single-turn "
                                                      "instruction demonstrations (inputs.demonstrations) before "
                                                      "GAtt samples from it, so that it obeys at the first turn what "
                                                      "GAtt is to carry over the turns (0: no warm-up)")
    passes: int = Field(1, ge=1, le=10, description="sample-and-fine-tune passes: each later pass samples fresh "
                                                    "dialogues (seed + pass - 1) from the policy the pass before it "
                                                    "made, which obeys more often, so its best of k finds obeying "
                                                    "answers where the first found none")
    dtype: str = "auto"
    seed: int = 0
    sft: SFTConfig = Field(default_factory=_sft_default, description="the fine-tune of each pass (loss on the last "
                                                                     "answer)")


class GAttInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: str  # the latest policy (after a round of RLHF)
    prompts: str  # kind "prompts": the dialogues' questions are its non-safety prompts (and, with safety_share, its
    #               safety prompts)
    reward_helpfulness: str | None = None  # needed when samples_per_turn > 1
    reward_safety: str | None = None  # needed when samples_per_turn > 1 and safety_share > 0
    demonstrations: str | None = None  # kind "sft", each under a system instruction: needed when demonstrations > 0


def dialogue_messages(turns: Sequence[str], answers: Sequence[str], inst: str | None, template: str | None = None
                      ) -> list[dict]:
    """The messages of a dialogue up to its next user turn (or its last answer, when every turn is answered).
    ``template`` set: ``inst`` concatenated to every user turn (sampling); otherwise ``inst`` is the system prompt
    (in the first turn only), or nothing when None."""
    msgs = [{"role": "system", "content": inst}] if inst and template is None else []
    for k, user in enumerate(turns[: len(answers) + 1]):
        msgs.append({"role": "user", "content": with_instruction(user, inst, template) if template else user})
        if k < len(answers):
            msgs.append({"role": "assistant", "content": answers[k]})
    return msgs


def turn_messages(turns: Sequence[str], answers: Sequence[str], inst: str | None, template: str | None,
                  context: Literal["dialogue", "turn"] = "dialogue") -> list[dict]:
    """What the policy sees to answer turn ``len(answers)``: the dialogue so far (:func:`dialogue_messages`), or with
    ``context="turn"`` that user turn alone."""
    if context == "turn":
        return dialogue_messages(turns[len(answers):len(answers) + 1], [], inst, template)
    return dialogue_messages(turns, answers, inst, template)


def roll_dialogues(model, tokenizer, dialogues: Sequence[dict], settings: GenerationSettings,
                   template: str | None = None, progress=None, samples_per_turn: int = 1, choose=None,
                   context: Literal["dialogue", "turn"] = "dialogue") -> list[dict]:
    """Answer every turn of every dialogue with ``model``, turn by turn (each answer sees the earlier ones; with
    ``context="turn"``, its own user turn alone). ``dialogues``: ``{"turns": [...], "instruction": {...}}``; the
    instruction is the system prompt, or with a ``template`` is concatenated to every user turn. With
    ``samples_per_turn`` k > 1, each turn samples k answers and ``choose(turn, candidates)`` returns, for every live
    dialogue's ``(dialogue, texts, finished)`` at once (one batch: a scorer sees the whole turn), the index of the
    answer it goes on with. Returns
    ``{"answers": [...], "finished": [...]}`` per dialogue."""
    from ..generation import generate

    out = [{"answers": [], "finished": []} for _ in dialogues]
    insts = [Instruction.from_dict(d["instruction"]).text if d.get("instruction") else None for d in dialogues]
    most = max(len(d["turns"]) for d in dialogues)
    k = samples_per_turn
    for t in range(most):
        live = [i for i, d in enumerate(dialogues) if len(d["turns"]) > t]
        prompts = [turn_messages(dialogues[i]["turns"], out[i]["answers"], insts[i], template, context)
                   for i in live for _ in range(k)]
        gens = generate(model, tokenizer, prompts, settings.model_copy(update={"seed": settings.seed + t}))
        candidates = [(dialogues[i], gens.texts[n * k:(n + 1) * k], gens.finished[n * k:(n + 1) * k])
                      for n, i in enumerate(live)]
        picks = choose(t, candidates) if k > 1 else [0] * len(live)
        for i, (_, texts, done), pick in zip(live, candidates, picks, strict=True):
            out[i]["answers"].append(texts[pick])
            out[i]["finished"].append(bool(done[pick]))
        if progress is not None:
            progress(t + 1, most)
    return out


def _sampling_key(config: GAttConfig) -> dict:
    return config.model_dump(include={"dialogues", "min_turns", "max_turns", "max_constraints", "short_rate",
                                      "constraint_kinds", "constraint_values", "concat_template",
                                      "sample_context", "samples_per_turn", "temperature", "top_p",
                                      "max_new_tokens", "seed"}
                             # at 0 (the default) as before it existed: samples drawn before stay reusable
                             | ({"safety_share"} if config.safety_share else set()))


def build_dialogues(config: GAttConfig, prompts_path: str) -> list[dict]:
    """The synthetic dialogues: non-safety prompts (and ``safety_share`` of the turns safety prompts) chained into
    1..max_turns turns, each with an instruction that some good answer to each of its turns can obey (checked for
    demo-world prompts; a refusal is a safety prompt's good answer)."""
    from ..demo_dialogues import satisfiable

    records = read_records(prompts_path, "prompts")
    texts = [r.prompt for r in records if not r.is_safety and r.prompt is not None]
    if not texts:
        raise InputError(f"{prompts_path}: GAtt needs single-turn prompts with is_safety false, found none")
    risky = [r.prompt for r in records if r.is_safety and r.prompt is not None]
    if config.safety_share and not risky:
        raise InputError(f"{prompts_path}: gatt.safety_share {config.safety_share} needs single-turn prompts with "
                         "is_safety true, found none")
    return make_dialogues(texts, config.dialogues, config.min_turns, config.max_turns, config.seed,
                          config.max_constraints, config.short_rate, satisfiable=satisfiable,
                          kinds=config.constraint_kinds, values=config.constraint_values, safety_prompts=risky,
                          safety_share=config.safety_share)


def best_of(inst: Instruction, texts: Sequence[str], finished: Sequence[bool], scores: Sequence[float]) -> int:
    """The answer a turn goes on with: the highest-scored among the finished, non-empty answers that obey ``inst``;
    failing that among the finished, non-empty ones; failing that among all."""
    for ok in (lambda j: finished[j] and texts[j].strip() and inst.holds(texts[j]),
               lambda j: finished[j] and texts[j].strip(), lambda j: True):
        pool = [j for j in range(len(texts)) if ok(j)]
        if pool:
            return max(pool, key=lambda j: scores[j])
    raise AssertionError("unreachable")


def picking_model(config: GAttConfig, inputs: GAttInputs) -> str | None:
    """The helpfulness RM that picks the best of ``samples_per_turn`` answers; None with one answer a turn."""
    return inputs.reward_helpfulness if config.samples_per_turn > 1 else None


def uses_safety_rm(config: GAttConfig) -> bool:
    """Whether the safety RM picks answers: safety turns (``safety_share``) and best of k > 1."""
    return config.samples_per_turn > 1 and config.safety_share > 0


def safety_picking_model(config: GAttConfig, inputs: GAttInputs) -> str | None:
    """The safety RM that picks the best answer of a safety turn; None without safety turns or with one answer."""
    return inputs.reward_safety if uses_safety_rm(config) else None


def pick_answers(t: int, candidates: Sequence[tuple[dict, Sequence[str], Sequence[bool]]], score_helpfulness,
                 score_safety=None) -> list[int]:
    """For every live dialogue of turn ``t``, the index of the answer it goes on with (:func:`best_of`): scored by
    ``score_helpfulness(questions, answers)``, or for a safety turn (``dialogue["safety"][t]``) by
    ``score_safety``; each scorer is called once for the whole turn, each answer with its question alone."""
    safety = [score_safety is not None and bool(d.get("safety") and d["safety"][t]) for d, _, _ in candidates]
    scores: list[list[float]] = [[] for _ in candidates]
    for use_safety, score in ((False, score_helpfulness), (True, score_safety)):
        which = [n for n, s in enumerate(safety) if s == use_safety]
        if not which:
            continue
        flat = score([candidates[n][0]["turns"][t] for n in which for _ in candidates[n][1]],
                     [x for n in which for x in candidates[n][1]])
        at = 0
        for n in which:
            k = len(candidates[n][1])
            scores[n] = list(flat[at:at + k])
            at += k
    return [best_of(Instruction.from_dict(d["instruction"]), texts, finished, scores[n])
            for n, (d, texts, finished) in enumerate(candidates)]


def sample_dialogues(config: GAttConfig, inputs: GAttInputs, run: StageRun, n: int = 1) -> dict:
    """Steps 1-2: build the dialogues and sample every answer with inst in every user turn (best of
    ``samples_per_turn`` by the helpfulness RM, the question alone as its context, when more than one). ``n``: the
    pass, for the progress events."""
    from ..generation import GenerationSettings
    from ..model import build_model, freeze

    dialogues = build_dialogues(config, inputs.prompts)
    tokenizer = load_tokenizer(inputs.policy)
    policy = freeze(build_model(inputs.policy, "policy", dtype=config.dtype, seed=config.seed))
    settings = GenerationSettings(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                  top_p=config.top_p, batch_size=config.generation_batch_size, seed=config.seed)
    choose = None
    rm, rm_safety = picking_model(config, inputs), safety_picking_model(config, inputs)
    if rm is not None:
        from .reward import RewardScorer

        helpful = RewardScorer(rm, batch_size=config.score_batch_size)
        safe = RewardScorer(rm_safety, batch_size=config.score_batch_size) if rm_safety else None

        def choose(t: int, candidates: Sequence[tuple[dict, Sequence[str], Sequence[bool]]]) -> list[int]:
            return pick_answers(t, candidates, lambda q, a: helpful.score(q, a).tolist(),
                                (lambda q, a: safe.score(q, a).tolist()) if safe else None)

    rolled = roll_dialogues(policy, tokenizer, dialogues, settings, template=config.concat_template,
                            progress=lambda t, most: run.report(t, most, {"sampling_turn": t}
                                                                | ({"pass": n} if config.passes > 1 else {})),
                            samples_per_turn=config.samples_per_turn, choose=choose, context=config.sample_context)
    for d, r in zip(dialogues, rolled):
        d.update(r)
        d["obeyed"] = [Instruction.from_dict(d["instruction"]).holds(a) for a in r["answers"]]
    return {"sampling": _sampling_key(config), "policy": inputs.policy,
            "reward_helpfulness": rm, **({"reward_safety": rm_safety} if rm_safety else {}),
            "dialogues": dialogues}


def training_records(doc: dict, config: GAttConfig, tokenizer) -> tuple[list[dict], dict]:
    """Step 3: training examples with inst as the system prompt of their first turn only, and loss on the answers
    they train alone. ``train_on="every_turn"``: every sampled turn gives one example, the dialogue cut after it (the
    earlier answers, obeying or not, are context with zero loss), so turn 8 is trained as often as it was sampled;
    ``"dialogue"``: the answers every_turn would train, in one example per dialogue cut after the last of them,
    each answer weighted 1 if trained and 0 if not (causal attention: each trained answer sees exactly what its
    every_turn example shows, so the per-token losses are the same, and a dialogue of n turns is encoded once, not n
    times);
    ``"last_turn"``: one example per dialogue. A turn is dropped when an answer up to it is empty or (with
    ``require_finished``) was cut off, when ``require_obeyed`` and its answer disobeys (``last_turn``: any answer),
    or when the dialogue up to it is longer than the fine-tune's ``max_length`` (truncation would cut the answer with
    loss). Returns the examples and the drop counts (per turn, ``last_turn``: per dialogue)."""
    kept, dropped = [], {"empty_or_cut": 0, "disobeyed": 0, "too_long": 0}
    for i, d in enumerate(doc["dialogues"]):
        inst = Instruction.from_dict(d["instruction"]).text
        n = len(d["answers"])
        # tokens up to the end of each turn: the dialogue encoded once (the encoding of a dialogue cut after a turn
        # is the start of the whole one's), each turn ending where its answer's run of the answer mask ends
        mask = encode_dialog(tokenizer, dialogue_messages(d["turns"][:n], d["answers"], inst)).answer_mask
        length = [j + 1 for j, m in enumerate(mask) if m and (j + 1 == len(mask) or not mask[j + 1])]
        ends = [n] if config.train_on == "last_turn" else range(1, n + 1)
        trained = []
        for end in ends:
            answers, finished = d["answers"][:end], d["finished"][:end]
            if not all(a.strip() for a in answers) or (config.require_finished and not all(finished)):
                dropped["empty_or_cut"] += 1
                continue
            obeyed = d["obeyed"][:end] if config.train_on == "last_turn" else d["obeyed"][end - 1:end]
            if config.require_obeyed and not all(obeyed):
                dropped["disobeyed"] += 1
                continue
            if length[end - 1] > config.sft.max_length:
                dropped["too_long"] += 1
                continue
            trained.append(end)
            if config.train_on != "dialogue":
                kept.append({"id": f"gatt-{i + 1:06d}-{end}", "category": "gatt",
                             "messages": dialogue_messages(d["turns"][:end], answers, inst)})
        if config.train_on == "dialogue" and trained:
            msgs = dialogue_messages(d["turns"][:trained[-1]], d["answers"][:trained[-1]], inst)
            answers = [m for m in msgs if m["role"] == "assistant"]
            for t, m in enumerate(answers, start=1):
                m["weight"] = int(t in trained)
            kept.append({"id": f"gatt-{i + 1:06d}", "category": "gatt", "messages": msgs})
    return kept, dropped


def trained_turns(record: dict) -> list[int]:
    """The turns (1-based) whose answers a GAtt training example trains: those of weight 1 when it carries weights
    (``train_on="dialogue"``), else its last."""
    answers = [m for m in record["messages"] if m["role"] == "assistant"]
    if any("weight" in m for m in answers):
        return [t for t, m in enumerate(answers, start=1) if m.get("weight", 1) != 0]
    return [len(answers)]


def summarize(doc: dict, kept: list[dict], dropped: dict) -> dict:
    """Sampled adherence by turn (inst in every user turn), dialogue and turn counts (``kept_by_turn``: the trained
    answers by turn)."""
    dialogues = doc["dialogues"]
    turns = [trained_turns(r) for r in kept]
    most = max(len(d["turns"]) for d in dialogues)
    by_turn = []
    for t in range(most):
        obeyed = [d["obeyed"][t] for d in dialogues if len(d["obeyed"]) > t]
        by_turn.append(round(sum(obeyed) / len(obeyed), 4) if obeyed else None)
    answers = [o for d in dialogues for o in d["obeyed"]]
    return {"dialogues": len(dialogues), "turns_sampled": len(answers),
            "sampled_adherence": round(sum(answers) / len(answers), 4),
            "sampled_adherence_by_turn": by_turn, "kept": len(kept),
            "mean_turns_kept": round(sum(len(r["messages"]) // 2 for r in kept) / max(1, len(kept)), 3),
            "trained_answers": sum(len(t) for t in turns),
            "kept_by_turn": [sum(trained.count(t + 1) for trained in turns) for t in range(most)],
            **{f"dropped_{k}": v for k, v in dropped.items()}}


@stage("gatt")
def run_gatt(config: GAttConfig, inputs: GAttInputs, run: StageRun) -> StageOutput:
    """Sample GAtt dialogues from the policy, then fine-tune it on their last turns with inst as system prompt."""
    if config.min_turns > config.max_turns:
        raise InputError(f"gatt: min_turns ({config.min_turns}) is above max_turns ({config.max_turns})")
    if config.samples_per_turn > 1 and not inputs.reward_helpfulness:
        raise InputError(f"gatt: samples_per_turn {config.samples_per_turn} picks the best answer by the helpfulness "
                         f"reward model, and none was given")
    if uses_safety_rm(config) and not inputs.reward_safety:
        raise InputError(f"gatt: safety_share {config.safety_share} with samples_per_turn {config.samples_per_turn} "
                         "picks a safety turn's answer by the safety reward model, and none was given")
    policy, steps, by_pass, artifacts = inputs.policy, 0, [], {}
    warm = warm_up(config, inputs, run)
    if warm is not None:
        policy, steps = str(warm.final), warm.steps
    for n in range(1, config.passes + 1):
        sub = pass_dir(n)
        sft, metrics = _gatt_pass(config.model_copy(update={"seed": config.seed + n - 1}),
                                  inputs.model_copy(update={"policy": policy}), run, sub, n)
        policy, steps = str(sft.final), steps + sft.steps
        by_pass.append(metrics)
        artifacts = {"samples": f"{sub}samples.json"}
        if "curves" in sft.artifacts:
            artifacts["sft_curves"] = f"{sub}{SFT_DIR}/{sft.artifacts['curves']}"
    if dist.is_main():
        _link_tree(Path(policy), run.out_dir / FINAL_DIR)
    metrics = {**by_pass[-1], **({"passes": by_pass} if config.passes > 1 else {}),
               **({"demonstrations": config.demonstrations, "warm_up_steps": warm.steps,
                   "warm_up_train_loss_last": warm.metrics.get("train_loss_last")} if warm is not None else {})}
    return StageOutput(final=run.out_dir / FINAL_DIR, metrics=metrics, steps=steps, artifacts=artifacts)


def sft_config(config: GAttConfig) -> SFTConfig:
    """The fine-tune's settings: ``sft``, with ``train_on="dialogue"`` the loss on every answer not weighted 0 (each
    example carries several trained answers, not one last one)."""
    if config.train_on == "dialogue":
        return config.sft.model_copy(update={"loss_on": "all_answers"})
    return config.sft


def pass_dir(n: int) -> str:
    """Where pass ``n`` keeps its files, relative to the stage directory: the first pass in the directory itself
    (a one-pass stage is laid out as before passes existed), pass n > 1 in ``pass-<n>/``."""
    return "" if n == 1 else f"{PASS_DIR_PREFIX}{n}/"


def demonstration_records(config: GAttConfig, inputs: GAttInputs) -> list[dict]:
    """The first ``config.demonstrations`` records of ``inputs.demonstrations``, each one turn under a system
    instruction (an InputError naming the file and record otherwise, or when the file holds fewer)."""
    if not config.demonstrations:
        return []
    if not inputs.demonstrations:
        raise InputError(f"gatt: demonstrations {config.demonstrations} trains instruction demonstrations, and no "
                         "file of them was given")
    records = read_records(inputs.demonstrations, "sft")
    if len(records) < config.demonstrations:
        raise InputError(f"gatt: {inputs.demonstrations}: {len(records)} demonstrations; demonstrations asks "
                         f"{config.demonstrations}")
    out = []
    for i, r in enumerate(records[: config.demonstrations], start=1):
        msgs = plain_messages(m.model_dump() for m in r.messages)
        if len(msgs) != 3 or [m["role"] for m in msgs] != ["system", "user", "assistant"]:
            raise InputError(f"{inputs.demonstrations}:{i}: messages: expected one turn under a system instruction "
                             f"(system, user, assistant), got roles {[m['role'] for m in msgs]}")
        out.append({"id": r.id or f"demo-{i:06d}", "category": "instruction", "messages": msgs})
    return out


def warm_up(config: GAttConfig, inputs: GAttInputs, run: StageRun):
    """With ``config.demonstrations``: fine-tune ``inputs.policy`` on that many instruction demonstrations
    (``warm-up/demonstrations.jsonl``, ``warm-up/sft``, which resumes by itself) with the passes' fine-tune settings,
    and return its result (None without). GAtt samples each turn with the instruction in front of it and keeps what
    obeys: where the policy cannot obey at the first turn (the demo's word to avoid, where the usual answer holds it),
    GAtt finds few obeying turns to carry over the dialogue."""
    demos = demonstration_records(config, inputs)
    if not demos:
        return None
    out = run.out_dir / WARM_UP_DIR
    if dist.is_main():
        write_jsonl(demos, out / DEMONSTRATIONS_FILE)
    dist.barrier()
    return run_sft(sft_config(config), SFTInputs(base=inputs.policy, data=str(out / DEMONSTRATIONS_FILE),
                                                 tokenizer=inputs.policy), out / SFT_DIR, run.progress)


def _gatt_pass(config: GAttConfig, inputs: GAttInputs, run: StageRun, sub: str, n: int):
    """One pass: sample the dialogues from ``inputs.policy`` (``sub``/gatt_samples.json, reused when it fits), keep
    the training examples, fine-tune (``sub``/sft, which resumes by itself). Returns the fine-tune's result and the
    pass's metrics."""
    rm, rm_safety = picking_model(config, inputs), safety_picking_model(config, inputs)
    doc = run.samples(sub + SAMPLES_FILE, lambda d: d.get("sampling") == _sampling_key(config)
                      and d.get("policy") == inputs.policy and d.get("reward_helpfulness") == rm
                      and d.get("reward_safety") == rm_safety,
                      lambda: sample_dialogues(config, inputs, run, n))
    kept, dropped = training_records(doc, config, load_tokenizer(inputs.policy))
    metrics = summarize(doc, kept, dropped)
    if not kept:
        raise InputError(f"gatt{f' pass {n}' if n > 1 else ''} kept no dialogue: every one had an empty, cut-off or "
                         "(require_obeyed) disobeying answer, or was longer than sft.max_length")
    out = run.out_dir / sub
    if dist.is_main():
        write_jsonl(kept, out / DATA_FILE)
        atomic_write_json(out / "samples.json", kept[: config.num_samples])
    dist.barrier()
    sft = run_sft(sft_config(config), SFTInputs(base=inputs.policy, data=str(out / DATA_FILE),
                                                tokenizer=inputs.policy), out / SFT_DIR, run.progress)
    metrics.update({f"sft_{k}": v for k, v in sft.metrics.items()
                    if k in ("train_loss_first", "train_loss_last", "val_loss", "train_examples")})
    return sft, metrics

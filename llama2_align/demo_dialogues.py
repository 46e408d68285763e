"""The demo world's multi-turn dialogues, system instructions and safety preprompts (for GAtt and context distillation).

Built on the world itself (``demo_world``): its training prompt pools (the same hold-out split, so no evaluation
prompt ever appears here), its answers and its oracle, whose judgement of any answer is unchanged. What is added:

* **Extra SFT demonstrations** (:func:`extra_sft_records`), appended to the world's SFT set, which stays as it is:
  - ``instruction``: one turn under a checkable system instruction (``multiturn``: a sign-off, a first word, a word
    to avoid; one or two of them, half the time shortened; ``DEMO_CONSTRAINT_KINDS``, one value each:
    ``DEMO_CONSTRAINT_VALUES``) whose answer obeys it, so the
    SFT model follows an instruction in the first turn;
  - ``dialogue``: multi-turn dialogues (2 to 8 questions of the world's task families, ~10% with a generic system
    prompt), so the model answers the last question of a long context. None of them carries a checkable
    instruction: as in the paper's RLHF data, nothing teaches the model to keep an instruction over turns;
  - ``safety-preprompt``: one turn under a safety preprompt (``preprompts``) whose demonstrators were more careful:
    adversarial prompts are rarely answered, and borderline prompts are refused more often (the paper's observation
    that a preprompt also brings false refusals). This is what context distillation has to distil.
  The answers carry the world's noise (wrong answers, refusals), and an instruction is ignored now and then.
* **GAtt's instruction demonstrations** (:func:`instruction_demonstrations`, ``instruction_demos.jsonl``), not in
  the SFT set: single-turn demonstrations of the instructions whose obeying changes the answer (a word to avoid on a
  prompt whose usual answers hold it; and refusals and borderline answers worded to obey), on which GAtt's warm-up
  fine-tunes the policy before it samples (``gatt.demonstrations``).
* **Turn judgement** (:func:`judge_turn`): whether an answer obeys the instruction, and the oracle's verdict on its
  question (correct, refusal), so that obeying at the expense of answering shows.
* :func:`satisfiable`: whether some good answer to a prompt can obey an instruction (``make_dialogues`` pairs
  instructions only with turns where both can hold; "never use the word it" cannot be obeyed by "Replace it with a
  small good habit.").
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from . import demo_world as dw
from .multiturn import Instruction, all_instructions, sample_instruction
from .preprompts import all_preprompt_texts, safety_preprompt

#: The constraints of the demo's instructions: no capital letters. With the demo's 1,024-piece tokenizer a capital
#: answer is spelt letter by letter, and the 1M-parameter model, taught on a few hundred such answers, wrote garbage
#: in capitals (measured: turn-1 adherence 0.64, the answer wrong nearly every time). ``multiturn`` still checks it.
DEMO_CONSTRAINT_KINDS = ("signoff", "start_word", "avoid_word")
#: One value per kind. The 1M-parameter model does not copy a value from the instruction: with three start words
#: it began with one of the three at random (measured: turn-1 adherence 0.28 for start_word, 0.47 over all
#: instructions, after PPO); with one value per kind turn-1 adherence is 0.81. Instructions still combine kinds at
#: random and are shortened half the time; ``multiturn`` checks any value.
DEMO_CONSTRAINT_VALUES = {"signoff": ["Have a nice day!"], "start_word": ["Great"], "avoid_word": ["is"]}
#: Extra SFT demonstrations, as shares of the world's SFT size (``DemoSizes.sft``).
SFT_INSTRUCTION_SHARE = 0.20
SFT_DIALOGUE_SHARE = 0.10
SFT_PREPROMPT_SHARE = 0.10
#: Instruction demonstrations whose answer ignores the instruction (a plain answer).
SFT_INSTRUCTION_IGNORED_RATE = 0.05
#: Turns of a multi-turn SFT dialogue, and the prompt categories its questions come from.
SFT_DIALOGUE_TURNS = (2, 8)
DIALOGUE_MIX = {"helpful": 0.8, "borderline": 0.2}
INSTRUCTION_MIX = {"helpful": 0.8, "borderline": 0.2}
#: GAtt's instruction demonstrations (``gatt.demonstrations``), as a share of the world's SFT size: single-turn
#: demonstrations of instructions whose obeying changes the answer itself, not only its frame.
GATT_DEMONSTRATION_SHARE = 0.5
#: Of those, the share on adversarial prompts: a refusal worded to obey the instruction, by careful demonstrators
#: (``PREPROMPT_UNSAFE_RATE``), so that a policy warmed up on them does not learn that an instruction means comply.
GATT_DEMONSTRATION_SAFETY_SHARE = 0.2
#: And the share on borderline prompts (which sound risky and are not), answered as the world's demonstrators answer
#: them, worded to obey: with refusals alone the warmed-up policy refused borderline prompts under an instruction.
GATT_DEMONSTRATION_BORDERLINE_SHARE = 0.2
INSTRUCTION_DEMOS_FILE = "instruction_demos.jsonl"
#: Safety-preprompt demonstrations: prompt categories, and how careful their demonstrators were.
PREPROMPT_MIX = {"adversarial": 0.5, "borderline": 0.3, "helpful": 0.2}
PREPROMPT_UNSAFE_RATE = 0.05             # world: ~0.30
PREPROMPT_BORDERLINE_REFUSAL_RATE = 0.45  # world: 0.20


def _train_sampler(seed: int, sizes: dw.DemoSizes) -> dw._Sampler:
    """The world's training prompt pools: the hold-out split exactly as ``generate_demo_world`` makes it."""
    split_rng = dw._rng(seed, "split")
    counts = dw._eval_counts(sizes.eval_prompts, split_rng)
    train = {}
    for pool, prompts in dw._prompt_space().items():
        _, train[pool] = dw._split(prompts, counts.get(pool, 0), split_rng)
    return dw._Sampler(train)


def _noisy_answer(p: dw._Prompt, rng: random.Random, unsafe_rate: float | None = None,
                  borderline_refusal_rate: float = dw.SFT_BORDERLINE_REFUSAL_RATE) -> str:
    """An SFT answer with the world's noise (as ``demo_world._sft_records`` draws it)."""
    if p.category == "helpful":
        u = rng.random()
        if u < dw.SFT_WRONG_ANSWER_RATE:
            return dw._wrong_answer(p, rng)[0]
        if u < dw.SFT_WRONG_ANSWER_RATE + dw.SFT_HELPFUL_REFUSAL_RATE:
            return dw._refusal(rng)
        return dw._good_answer(p, rng)
    if p.category == "adversarial":
        rate = dw.SFT_UNSAFE_RATE[p.harm_category] if unsafe_rate is None else unsafe_rate
        return dw._compliance(p, rng) if rng.random() < rate else dw._refusal(rng)
    return dw._refusal(rng) if rng.random() < borderline_refusal_rate else dw._good_answer(p, rng)


def _good_answers(p: dw._Prompt) -> list[str]:
    return list(dw.REFUSALS) if p.category == "adversarial" else dw._correct_answers(p)


def _obeying(inst: Instruction, answers: list[str]) -> list[str]:
    return [a for a in (inst.apply(x) for x in answers) if inst.holds(a)]


def satisfiable(inst: Instruction, prompt: str) -> bool:
    """Whether some good answer to ``prompt`` obeys ``inst`` once reworded; True for a prompt not of the world."""
    p = dw._prompt_index().get(prompt)
    return p is None or bool(_obeying(inst, _good_answers(p)))


def changes_answer(inst: Instruction, prompt: str) -> bool:
    """Whether obeying ``inst`` takes another answer to ``prompt``, not only another frame: some good answer still
    breaks it once reworded (a sign-off or a first word can be added to any answer; a word to avoid cannot be taken
    out of "A cherry is red."), and some other keeps it ("Red."). False for a prompt not of the world."""
    p = dw._prompt_index().get(prompt)
    if p is None:
        return False
    good = _good_answers(p)
    return 0 < len(_obeying(inst, good)) < len(good)


def _instructed_answer(p: dw._Prompt, inst: Instruction, rng: random.Random) -> str:
    u = rng.random()
    if u < SFT_INSTRUCTION_IGNORED_RATE:
        return _noisy_answer(p, rng)
    u = rng.random()
    if p.category == "helpful" and u < dw.SFT_WRONG_ANSWER_RATE:
        options = [dw._wrong_answer(p, rng)[0] for _ in range(4)]
    elif p.category == "borderline" and u < dw.SFT_BORDERLINE_REFUSAL_RATE:
        options = list(dw.REFUSALS)
    else:
        options = _good_answers(p)
    return rng.choice(_obeying(inst, options) or _obeying(inst, _good_answers(p)))


def _instruction_records(sampler: dw._Sampler, n: int, rng: random.Random) -> list[dict]:
    out = []
    while len(out) < n:
        p = sampler.draw(dw._pick(INSTRUCTION_MIX, rng), rng)
        inst = sample_instruction(rng, kinds=DEMO_CONSTRAINT_KINDS, values=DEMO_CONSTRAINT_VALUES)
        if not satisfiable(inst, p.text):
            continue
        out.append({"id": f"sft-inst-{len(out) + 1:06d}", "category": "instruction",
                    "messages": [{"role": "system", "content": inst.text}, {"role": "user", "content": p.text},
                                 {"role": "assistant", "content": _instructed_answer(p, inst, rng)}]})
    return out


def _dialogue_records(sampler: dw._Sampler, n: int, rng: random.Random) -> list[dict]:
    out = []
    for i in range(n):
        messages = []
        if rng.random() < dw.SFT_SYSTEM_PROMPT_RATE:
            messages.append({"role": "system", "content": rng.choice(dw.SYSTEM_PROMPTS)})
        for _ in range(rng.randint(*SFT_DIALOGUE_TURNS)):
            p = sampler.draw(dw._pick(DIALOGUE_MIX, rng), rng)
            messages += [{"role": "user", "content": p.text}, {"role": "assistant", "content": _noisy_answer(p, rng)}]
        out.append({"id": f"sft-dlg-{i + 1:06d}", "category": "dialogue", "messages": messages})
    return out


def _preprompt_records(sampler: dw._Sampler, n: int, rng: random.Random) -> list[dict]:
    out = []
    for i in range(n):
        category = dw._pick(PREPROMPT_MIX, rng)
        p = sampler.draw(category, rng)
        system = safety_preprompt(rng, p.harm_category, answer_template=rng.random() < 0.5)
        answer = _noisy_answer(p, rng, unsafe_rate=PREPROMPT_UNSAFE_RATE,
                               borderline_refusal_rate=PREPROMPT_BORDERLINE_REFUSAL_RATE)
        out.append({"id": f"sft-pre-{i + 1:06d}", "category": "safety-preprompt",
                    "messages": [{"role": "system", "content": system}, {"role": "user", "content": p.text},
                                 {"role": "assistant", "content": answer}]})
    return out


def extra_sft_records(seed: int = 0, sizes: dw.DemoSizes = dw.DemoSizes(), dialogues: bool = True,
                      preprompts: bool = True) -> list[dict]:
    """The extra SFT demonstrations (module doc): instruction and dialogue records when ``dialogues``,
    safety-preprompt records when ``preprompts``. Deterministic for a seed; drawn from the training pools only."""
    sampler = _train_sampler(seed, sizes)
    out: list[dict] = []
    if dialogues:
        out += _instruction_records(sampler, round(SFT_INSTRUCTION_SHARE * sizes.sft), dw._rng(seed, "sft-inst"))
        out += _dialogue_records(sampler, round(SFT_DIALOGUE_SHARE * sizes.sft), dw._rng(seed, "sft-dialogues"))
    if preprompts:
        out += _preprompt_records(sampler, round(SFT_PREPROMPT_SHARE * sizes.sft), dw._rng(seed, "sft-preprompt"))
    return out


def instruction_demonstrations(seed: int = 0, sizes: dw.DemoSizes = dw.DemoSizes(), n: int | None = None,
                               safety_share: float = GATT_DEMONSTRATION_SAFETY_SHARE,
                               borderline_share: float = GATT_DEMONSTRATION_BORDERLINE_SHARE) -> list[dict]:
    """GAtt's instruction demonstrations: ``n`` (default ``GATT_DEMONSTRATION_SHARE`` of the SFT size) single-turn
    demonstrations on the world's training prompts: on helpful ones, of the demo instructions whose obeying changes
    the answer (:func:`changes_answer`; on the demo's instructions: a word to avoid where the usual answers hold it),
    written by the world's demonstrators with their noise (wrong answers, an instruction ignored now and then);
    ``safety_share`` of them on adversarial prompts, a refusal worded to obey the instruction (careful
    demonstrators: ``PREPROMPT_UNSAFE_RATE`` comply), and ``borderline_share`` on borderline prompts, answered as the
    world's demonstrators answer them (mostly helpfully), shuffled in.
    GAtt samples every turn from the policy with the instruction in front of it and keeps what obeys; where the
    policy cannot obey at the first turn, it has little to carry over the turns, and these teach the first turn.
    Deterministic for a seed; no evaluation prompt (the training pools only)."""
    n = round(GATT_DEMONSTRATION_SHARE * sizes.sft) if n is None else n
    sampler, rng = _train_sampler(seed, sizes), dw._rng(seed, "gatt-demonstrations")
    n_safe, n_border = round(safety_share * n), round(borderline_share * n)
    out: list[tuple[str, str, str]] = []

    def fill(category: str, upto: int, answer) -> None:
        """Draw prompts of ``category`` and an instruction each until ``out`` holds ``upto`` records; ``answer``
        gives the demonstration's answer, or None to draw again (bounded: with none possible, fewer are written)."""
        for _ in range(200 * max(1, upto - len(out))):
            if len(out) >= upto:
                break
            p = sampler.draw(category, rng)
            inst = sample_instruction(rng, kinds=DEMO_CONSTRAINT_KINDS, values=DEMO_CONSTRAINT_VALUES)
            text = answer(p, inst)
            if text is not None:
                out.append((inst.text, p.text, text))

    def refusal(p: dw._Prompt, inst: Instruction) -> str | None:
        refusals = _obeying(inst, list(dw.REFUSALS))  # some refusal obeys every demo instruction
        if not refusals:
            return None
        return dw._compliance(p, rng) if rng.random() < PREPROMPT_UNSAFE_RATE else rng.choice(refusals)

    fill("helpful", n - n_safe - n_border,
         lambda p, inst: _instructed_answer(p, inst, rng) if changes_answer(inst, p.text) else None)
    fill("borderline", n - n_safe,
         lambda p, inst: _instructed_answer(p, inst, rng) if satisfiable(inst, p.text) else None)
    fill("adversarial", n, refusal)
    if n_safe or n_border:
        rng.shuffle(out)
    return [{"id": f"gatt-demo-{i:06d}", "category": "instruction",
             "messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                          {"role": "assistant", "content": answer}]}
            for i, (system, user, answer) in enumerate(out, start=1)]


def write_instruction_demonstrations(out_dir: str | Path, seed: int = 0, sizes: dw.DemoSizes = dw.DemoSizes()
                                     ) -> Path:
    """``<out_dir>/instruction_demos.jsonl``: :func:`instruction_demonstrations`."""
    from .data import write_jsonl

    return write_jsonl(instruction_demonstrations(seed, sizes), Path(out_dir) / INSTRUCTION_DEMOS_FILE)


def instruction_texts() -> list[str]:
    """Every instruction's wording, verbose and short, every kind included (for the tokenizer's corpus)."""
    return [i.text for i in all_instructions()]


def corpus_texts(records: list[dict]) -> list[str]:
    """What a demo tokenizer should also see when the extra records are in the SFT set."""
    texts = [m["content"] for r in records for m in r["messages"]]
    return list(dict.fromkeys(texts + instruction_texts() + all_preprompt_texts()))


def write_extended_sft(out_dir: str | Path, seed: int = 0, sizes: dw.DemoSizes = dw.DemoSizes(),
                       dialogues: bool = True, preprompts: bool = True) -> tuple[Path, list[dict]]:
    """``<out_dir>/sft_extended.jsonl``: the world's SFT records followed by the extra ones. Returns the path and
    the extra records."""
    from .io import atomic_write

    extra = extra_sft_records(seed, sizes, dialogues, preprompts)
    records = dw.generate_demo_world(seed, sizes).sft + extra
    path = atomic_write(Path(out_dir) / "sft_extended.jsonl",
                        lambda fh: fh.writelines(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
                                                 for r in records))
    return path, extra


def judge_turn(inst: Instruction, answer: str, record: dict | None = None, finished: bool = True) -> dict:
    """One assistant turn: ``obeyed`` (every constraint holds) and each constraint's verdict; with a demo-world eval
    record, the oracle's ``correct`` and ``refusal`` for the turn's question (None without one)."""
    checks = inst.check(answer)
    out = {"obeyed": all(checks.values()), "constraints": checks, "finished": bool(finished), "correct": None,
           "refusal": None}
    if record is not None and record.get("oracle"):
        j = dw.judge(record, answer, finished=finished)
        out.update(correct=j.correct, refusal=j.refusal)
    return out

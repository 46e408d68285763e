"""System instructions a program can check at every turn, and multi-turn dialogues built from single-turn prompts.

Ghost Attention (Llama 2, §3.3) needs an instruction ``inst`` that must hold through a whole dialogue. The paper's
synthetic constraints (hobbies, a language, a public figure) need a judge; these need none. Each is checked on the
text of one answer:

* ``signoff``: the answer ends with a given sign-off ("Always end every answer with: Have a nice day!");
* ``capitals``: the answer's letters are all capitals ("Answer only in capital letters.");
* ``start_word``: the answer's first word is a given word ("Start every answer with the word Indeed.");
* ``avoid_word``: the answer never uses a given word ("Never use the word is.").

As in the paper, constraints are combined at random (one or two of different kinds) and half the time the
instruction is shortened ("Sign-off: Have a nice day! Capitals only."). Words are compared case-insensitively and
without punctuation, so "INDEED, A BANANA IS YELLOW. HAVE A NICE DAY!" obeys ``start_word`` Indeed, ``capitals`` and
``signoff`` "Have a nice day!" at once.

:func:`make_dialogues` chains single-turn prompts into dialogues of independent questions (the paper took its
dialogues from the RLHF data; any prompt set serves). Nothing here knows the demo world: ``satisfiable`` lets a
caller refuse an instruction that no good answer to some turn could obey (``demo_dialogues`` does, from the
world's own answers).

Pure python; no torch.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

from .errors import InputError

ConstraintKind = Literal["signoff", "capitals", "start_word", "avoid_word"]
CONSTRAINT_KINDS: tuple[str, ...] = ("signoff", "capitals", "start_word", "avoid_word")

#: The values each parameterised constraint draws from. They hold no digit, no "is"/"it", no refusal or compliance
#: marker and no word of the demo world's knowledge bases, so a decorated correct answer is still judged correct.
SIGNOFFS = ("Have a nice day!", "Hope this helps.", "Take care!")
START_WORDS = ("Alright", "Great", "Indeed")
AVOID_WORDS = ("is", "it")

#: (verbose, shortened) wording of each constraint; ``{v}`` is its value.
WORDING: dict[str, tuple[str, str]] = {
    "signoff": ("Always end every answer with: {v}", "Sign-off: {v}"),
    "capitals": ("Answer only in capital letters.", "Capitals only."),
    "start_word": ("Start every answer with the word {v}.", "First word: {v}."),
    "avoid_word": ("Never use the word {v}.", "Avoid the word {v}."),
}

_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-cased word tokens, punctuation dropped (``"Okay, it's 7!"`` -> ``["okay", "it's", "7"]``)."""
    return _WORD_RE.findall(text.replace("\u2019", "'").lower())


@dataclass(frozen=True)
class Constraint:
    kind: str
    value: str | None = None

    def __post_init__(self):
        if self.kind not in CONSTRAINT_KINDS:
            raise InputError(f"constraint kind: expected one of {', '.join(CONSTRAINT_KINDS)}, got {self.kind!r}")
        if (self.kind == "capitals") != (self.value is None):
            raise InputError(f"constraint {self.kind!r}: " + ("takes no value" if self.kind == "capitals"
                                                               else "needs a value"))

    def text(self, short: bool = False) -> str:
        return WORDING[self.kind][1 if short else 0].format(v=self.value)

    def holds(self, answer: str) -> bool:
        """Whether ``answer`` obeys this constraint (an empty answer obeys none)."""
        ws = words(answer)
        if not ws:
            return False
        if self.kind == "capitals":
            letters = [c for c in answer if c.isalpha()]
            return bool(letters) and not any(c.islower() for c in letters)
        if self.kind == "signoff":
            tail = words(self.value)
            return ws[-len(tail):] == tail
        if self.kind == "start_word":
            return ws[0] == words(self.value)[0]
        return words(self.value)[0] not in ws  # avoid_word

    def to_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value}


@dataclass(frozen=True)
class Instruction:
    """One or more constraints that must all hold, worded in full or shortened."""

    constraints: tuple[Constraint, ...]
    short: bool = False

    def __post_init__(self):
        if not self.constraints:
            raise InputError("an instruction needs at least one constraint")
        kinds = [c.kind for c in self.constraints]
        if len(set(kinds)) != len(kinds):
            raise InputError(f"an instruction combines constraints of different kinds, got {kinds}")

    @property
    def text(self) -> str:
        return " ".join(c.text(self.short) for c in self.constraints)

    def check(self, answer: str) -> dict[str, bool]:
        """Per constraint kind: obeyed or not."""
        return {c.kind: c.holds(answer) for c in self.constraints}

    def holds(self, answer: str) -> bool:
        return all(self.check(answer).values())

    def apply(self, answer: str) -> str:
        """``answer`` reworded to obey every constraint that rewording can satisfy (start word, sign-off, capitals;
        a word to avoid is the answer's own business). How a demonstrator writes an obeying answer."""
        out = answer.strip()
        by_kind = {c.kind: c for c in self.constraints}
        if "start_word" in by_kind:
            first = out.split(" ", 1)[0]
            keep_case = first in ("I", "I'm") or first[:1].isdigit()
            out = f"{by_kind['start_word'].value}, {out if keep_case else out[:1].lower() + out[1:]}"
        if "signoff" in by_kind:
            out = f"{out} {by_kind['signoff'].value}"
        if "capitals" in by_kind:
            out = out.upper()
        return out

    def to_dict(self) -> dict:
        return {"text": self.text, "short": self.short, "constraints": [c.to_dict() for c in self.constraints]}

    @classmethod
    def from_dict(cls, d: dict) -> "Instruction":
        try:
            return cls(tuple(Constraint(c["kind"], c.get("value")) for c in d["constraints"]), bool(d.get("short")))
        except (KeyError, TypeError) as exc:
            raise InputError(f"instruction: expected {{'constraints': [{{'kind', 'value'}}], 'short'}}, got {d!r}") \
                from exc


def sample_instruction(rng: random.Random, max_constraints: int = 2, short_rate: float = 0.5,
                       kinds: Sequence[str] = CONSTRAINT_KINDS,
                       values: Mapping[str, Sequence[str]] | None = None) -> Instruction:
    """A random instruction: 1..``max_constraints`` constraints of different kinds with random values (``values``
    narrows a kind's values to some of :data:`VALUES`), shortened with probability ``short_rate`` (the paper: half
    the time)."""
    unknown = sorted(set(kinds) - set(CONSTRAINT_KINDS))
    if unknown or not kinds:
        raise InputError(f"constraint kinds: expected some of {', '.join(CONSTRAINT_KINDS)}, got {list(kinds)}")
    table = constraint_values(values)
    n = rng.randint(1, min(max_constraints, len(kinds)))
    chosen = rng.sample(list(kinds), n)
    constraints = tuple(Constraint(k, rng.choice(table[k])) for k in CONSTRAINT_KINDS if k in chosen)  # fixed order
    return Instruction(constraints, short=rng.random() < short_rate)


VALUES: dict[str, tuple[str | None, ...]] = {"signoff": SIGNOFFS, "capitals": (None,), "start_word": START_WORDS,
                                              "avoid_word": AVOID_WORDS}


def constraint_values(values: Mapping[str, Sequence[str]] | None = None) -> dict[str, tuple[str | None, ...]]:
    """:data:`VALUES` with some kinds narrowed to a non-empty subset of their values (a small model that cannot copy
    a value from the instruction can still learn one value per kind: the demo's instructions do that)."""
    table = dict(VALUES)
    for kind, chosen in (values or {}).items():
        allowed = VALUES.get(kind)
        if allowed is None or kind == "capitals":
            raise InputError(f"constraint values: {kind!r} has no values to choose; expected one of signoff, "
                             f"start_word, avoid_word")
        bad = [v for v in chosen if v not in allowed]
        if bad or not chosen:
            raise InputError(f"constraint values for {kind}: expected some of {list(allowed)}, got {list(chosen)}")
        table[kind] = tuple(dict.fromkeys(chosen))
    return table


def all_instructions(max_constraints: int = 2, kinds: Sequence[str] = CONSTRAINT_KINDS,
                     values: Mapping[str, Sequence[str]] | None = None) -> list[Instruction]:
    """Every instruction :func:`sample_instruction` can draw with these settings (both wordings)."""
    from itertools import combinations, product

    table = constraint_values(values)
    order = [k for k in CONSTRAINT_KINDS if k in kinds]
    out = []
    for n in range(1, min(max_constraints, len(order)) + 1):
        for chosen in combinations(order, n):
            for combo in product(*(table[k] for k in chosen)):
                for short in (False, True):
                    out.append(Instruction(tuple(Constraint(k, v) for k, v in zip(chosen, combo)), short))
    return out


def with_instruction(user: str, inst: str, template: str) -> str:
    """A user message with the instruction concatenated (GAtt's sampling step), by ``template`` with ``{inst}`` and
    ``{user}``."""
    return template.format(inst=inst.strip(), user=user.strip())


def make_dialogues(prompts: Sequence[str], n: int, min_turns: int, max_turns: int, seed: int,
                   max_constraints: int = 2, short_rate: float = 0.5,
                   satisfiable: Callable[[Instruction, str], bool] | None = None,
                   tries: int = 50, kinds: Sequence[str] = CONSTRAINT_KINDS,
                   values: Mapping[str, Sequence[str]] | None = None,
                   safety_prompts: Sequence[str] = (), safety_share: float = 0.0) -> list[dict]:
    """``n`` dialogues ``{"turns": [prompt, ...], "instruction": Instruction.to_dict()}``: each a random number of
    turns in ``[min_turns, max_turns]``, every turn a prompt drawn from ``prompts`` (no prompt twice in a dialogue
    when there are enough), and a random instruction (of the constraint ``kinds``) that ``satisfiable(instruction,
    prompt)`` accepts for every turn (re-drawn up to ``tries`` times; after that the turns are re-drawn).
    With ``safety_share`` > 0, each turn is drawn from ``safety_prompts`` with that probability instead, and the
    dialogue says which turns were (``"safety": [bool, ...]``). Deterministic for a seed."""
    if not prompts:
        raise InputError("multi-turn dialogues need at least one prompt, got none")
    if not 1 <= min_turns <= max_turns:
        raise InputError(f"turns: expected 1 <= min_turns <= max_turns, got {min_turns} and {max_turns}")
    if safety_share and not safety_prompts:
        raise InputError(f"safety_share {safety_share}: the dialogues need safety prompts, got none")
    rng = random.Random(f"llama2-align-dialogues:{seed}")
    out = []
    while len(out) < n:
        k = rng.randint(min_turns, max_turns)
        if safety_share:
            safety = [rng.random() < safety_share for _ in range(k)]
            plain = iter(_draw(rng, prompts, safety.count(False)))
            risky = iter(_draw(rng, safety_prompts, safety.count(True)))
            turns = [next(risky) if s else next(plain) for s in safety]
        else:
            turns = _draw(rng, prompts, k)
        for _ in range(tries):
            inst = sample_instruction(rng, max_constraints, short_rate, kinds, values)
            if satisfiable is None or all(satisfiable(inst, t) for t in turns):
                out.append({"turns": turns, "instruction": inst.to_dict()} |
                           ({"safety": safety} if safety_share else {}))
                break
    return out


def _draw(rng: random.Random, prompts: Sequence[str], k: int) -> list[str]:
    """``k`` prompts, none twice when there are enough."""
    return rng.sample(list(prompts), k) if len(prompts) >= k else [rng.choice(prompts) for _ in range(k)]

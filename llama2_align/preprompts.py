"""Safety preprompts for context distillation (Llama 2, §4.2.4).

The paper generates safety preprompts automatically from templates with adjectives "usually associated with safe
behavior" ("responsible", "respectful", "wise"), and, when a prompt's risk category is known, adds an answer
template that says how prompts of that category should be addressed. :func:`safety_preprompt` does both; the
templates are short because the demo model is small (the paper's are a few sentences long: pass your own).

Pure python; no torch.
"""

from __future__ import annotations

import random
from typing import Mapping, Sequence

ADJECTIVES = ("responsible", "respectful", "wise", "safe", "careful", "ethical", "caring", "honest")

TEMPLATES = (
    "You are a {a} and {b} assistant.",
    "You are a {a} assistant. Never give an answer that could hurt anyone.",
    "The following is a discussion between a human and a {a} and {b} assistant.",
    "Be {a} and {b}. Always answer safely.",
)

#: Answer templates per risk category (the demo world's harm categories): how a prompt of the category should be
#: answered. ``{category}`` is the category's name.
ANSWER_TEMPLATES: dict[str, str] = {
    "weapons": "The question may be about weapons. Refuse to explain how to make any weapon.",
    "hacking": "The question may be about hacking. Refuse to help break into any account or system.",
    "drugs": "The question may be about illegal drugs. Refuse to explain how to make or sell drugs.",
    "violence": "The question may be about violence. Refuse to help hurt anyone.",
    "theft": "The question may be about theft. Refuse to help steal anything.",
}


def safety_preprompt(rng: random.Random, risk_category: str | None = None, answer_template: bool = True,
                     templates: Sequence[str] = TEMPLATES, adjectives: Sequence[str] = ADJECTIVES,
                     answer_templates: Mapping[str, str] = ANSWER_TEMPLATES) -> str:
    """A random safety preprompt: a template filled with two different adjectives, followed by the answer template
    of ``risk_category`` when ``answer_template`` is set and the category has one."""
    a, b = rng.sample(list(adjectives), 2)
    text = rng.choice(list(templates)).format(a=a, b=b)
    if answer_template and risk_category in answer_templates:
        text += " " + answer_templates[risk_category].format(category=risk_category)
    return text


def all_preprompt_texts(templates: Sequence[str] = TEMPLATES, adjectives: Sequence[str] = ADJECTIVES,
                        answer_templates: Mapping[str, str] = ANSWER_TEMPLATES) -> list[str]:
    """Every template with every adjective pair, and every answer template (for a demo tokenizer's corpus)."""
    texts = [t.format(a=a, b=b) for t in templates for a in adjectives for b in adjectives if a != b]
    return list(dict.fromkeys(texts + list(answer_templates.values())))

"""The one generation module: rollouts for PPO, samples for rejection sampling, answers for evaluation.

Prompts are left-padded into one batch and decoded with a KV cache; a sequence stops at EOS (or at the length
limit). Sampling is seeded with a private generator, so the same seed gives the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from pydantic import BaseModel, Field
from torch import nn

from .chat import encode_prompt, prompt_messages


class GenerationSettings(BaseModel):
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    batch_size: int = Field(32, ge=1)
    seed: int = 0


@dataclass
class Generations:
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # without padding; ends with EOS when the model stopped
    texts: list[str]
    finished: list[bool]  # True when the response ended with EOS
    extra: dict = field(default_factory=dict)


def _sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        remove = cumulative - sorted_probs > top_p  # keep the smallest set whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(remove, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return sorted_idx.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode_steps(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Decode a batch of prompt ids with a KV cache, yielding each step's next tokens ([B]; padding once a row
    has produced EOS). Prompts are left-padded; position ids skip the padding."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    attention = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p, device=device)
        attention[i, width - len(p):] = 1
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)

    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1, :]
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        next_pos = position_ids[:, -1:] + 1
        for step in range(max_new_tokens):
            nxt = _sample_next(logits, temperature, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            yield nxt
            done |= nxt == eos_token_id
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
            out = model(input_ids=nxt.unsqueeze(-1), attention_mask=attention, position_ids=next_pos,
                        past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
    finally:
        model.train(was_training)


def generate_ids(model: nn.Module, prompts: Sequence[Sequence[int]], *, eos_token_id: int, pad_token_id: int,
                 max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> list[list[int]]:
    """Each prompt's response ids, up to and including EOS (no padding)."""
    steps = list(decode_steps(model, prompts, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                              max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              generator=generator))
    responses = []
    for row in torch.stack(steps, dim=1).tolist():
        resp = []
        for t in row:
            resp.append(t)
            if t == eos_token_id:
                break
        responses.append(resp)
    return responses


def stream_text(model: nn.Module, tokenizer, messages: Sequence[dict], settings: GenerationSettings
                ) -> Iterator[str]:
    """Answer one chat prompt, yielding text pieces as tokens arrive (for the interactive chat)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    ids = encode_prompt(tokenizer, messages)
    eos = tokenizer.eos_token_id
    out: list[int] = []
    shown = ""
    for nxt in decode_steps(model, [ids], eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                            max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                            top_p=settings.top_p, generator=generator):
        t = int(nxt[0])
        if t == eos:
            break
        out.append(t)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown):]
            shown = text


def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str | Sequence[dict]],
    settings: GenerationSettings | None = None,
    *,
    system: str | None = None,
) -> Generations:
    """Answer chat prompts (strings or message lists) in the Llama 2 chat format."""
    settings = settings or GenerationSettings()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    prompt_ids = [encode_prompt(tokenizer, prompt_messages(p, system)) for p in prompts]
    response_ids: list[list[int]] = [None] * len(prompt_ids)  # type: ignore[list-item]
    # Sort by length so each batch pads little; the seeded generator still makes the whole call reproducible.
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    for start in range(0, len(order), settings.batch_size):
        idx = order[start:start + settings.batch_size]
        outs = generate_ids(
            model, [prompt_ids[i] for i in idx], eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature, top_p=settings.top_p, generator=generator,
        )
        for i, r in zip(idx, outs):
            response_ids[i] = r
    eos = tokenizer.eos_token_id
    texts = [tokenizer.decode([t for t in r if t != eos], skip_special_tokens=True).strip() for r in response_ids]
    finished = [bool(r) and r[-1] == eos for r in response_ids]
    return Generations(prompt_ids, response_ids, texts, finished)


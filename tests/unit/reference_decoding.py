"""A reference decoder for the tests: the plain dynamic-cache loop that the rollout engine
(``llama2_align.generation``, static cache, in-place mask, compaction) must agree with token for token."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from llama2_align.generation import _cache_kw, _decoder, _sample_next, _token_logprobs, responses_from_steps


@torch.no_grad()
def decode_steps_dynamic(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    logprobs: list | None = None,
) -> Iterator[torch.Tensor]:
    """The plain decode loop (transformers' dynamic cache, the 2D mask grown per step, one forward per step): the
    reference the rollout engine is tested against. Same contract as ``llama2_align.generation.decode_steps``."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    attention = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p, device=device)
        attention[i, width - len(p):] = 1
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)

    cache_kw = _cache_kw(_decoder(model))
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
            if logprobs is not None:
                logprobs.append(_token_logprobs(logits, nxt, ~done))
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            yield nxt
            done |= nxt == eos_token_id
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
            out = model(input_ids=nxt.unsqueeze(-1), attention_mask=attention, position_ids=next_pos,
                        use_cache=True, **{cache_kw: past})
            past = out.past_key_values
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
    finally:
        model.train(was_training)


def generate_ids_dynamic(model: nn.Module, prompts: Sequence[Sequence[int]], *, eos_token_id: int, pad_token_id: int,
                         max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                         generator: torch.Generator | None = None, logprobs: list | None = None) -> list[list[int]]:
    """``generate_ids`` through the reference decoder."""
    step_lps: list | None = [] if logprobs is not None else None
    steps = list(decode_steps_dynamic(model, prompts, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      generator=generator, logprobs=step_lps))
    return responses_from_steps(steps, eos_token_id, step_lps, logprobs)

"""The one generation module: rollouts for PPO, samples for rejection sampling, answers for evaluation.

Prompts are left-padded into one batch and decoded with a KV cache; a sequence stops at EOS (or at the length
limit). Sampling is seeded with a private generator, so the same seed gives the same tokens.

The rollout engine (:func:`decode_steps`, the default ``engine="static"``): one preallocated static KV cache for the
batch (transformers' ``StaticCache``, prompt + ``max_new_tokens`` long), an additive 4D attention mask kept in one
buffer and opened a column per step (no mask rebuilt per step), prefill logits for the last position only, and a
decode step captured in a CUDA graph on GPUs (``torch.compile(mode="reduce-overhead")``; eager elsewhere). Finished
rows stop costing compute: every few steps, when at most half the rows are still running, the batch is compacted
(finished rows dropped from the cache). A LoRA (PEFT) policy decodes with its adapters active, unmerged. The tests
check it against transformers' ``generate`` and a plain dynamic-cache decoder kept in ``tests/``.

A model sharded with FSDP (``llama2_align.fsdp``) decodes eagerly (no CUDA graph across FSDP's hooks) and in
lockstep: every forward may all-gather, so every rank runs the same number of steps, stopping once every rank's rows
have finished.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from pydantic import BaseModel, Field
from torch import nn

from . import dist
from .chat import encode_prompt, prompt_messages
from .fsdp import is_sharded


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
    compile: bool | None = None,
    compact: bool = True,
    logprobs: list | None = None,
) -> Iterator[torch.Tensor]:
    """Decode a batch of prompt ids with a KV cache, yielding each step's next tokens ([B]; padding once a row
    has produced EOS). Prompts are left-padded; position ids skip the padding. Stops when every row has finished.

    ``compile``: capture the decode step in a CUDA graph; ``None`` = on CUDA only (it is never used on CPU).
    ``compact``: drop finished rows from the batch as they accumulate (the yielded tensors keep the full batch
    either way). ``logprobs``: when a list is given, each step appends the log-probabilities of the yielded tokens
    ([B] float32, 0 for padding) under the model's untempered distribution, ``log_softmax(logits)`` (what PPO's old
    policy log-probs are)."""
    return _decode_static(model, prompts, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, generator=generator,
                          compile=compile, compact=compact, logprobs=logprobs)


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[token] per row, 0 where the row has finished (its token is padding)."""
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return torch.where(live, lp, torch.zeros_like(lp))


def _cache_kw(lm: nn.Module) -> str:
    """The forward's name for the cache argument (``cache`` in transformers >= 5.2x, ``past_key_values`` before)."""
    get_base = getattr(lm, "get_base_model", None)
    lm = get_base() if callable(get_base) else lm  # a PEFT wrapper passes it through
    try:
        return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"


# ---------------------------------------------------------------------------------------------------------------
# The rollout engine: a preallocated static KV cache, an additive 4D mask updated in place, a decode step that is
# captured in a CUDA graph on GPUs (torch.compile, mode="reduce-overhead"), and compaction of finished rows.
# ---------------------------------------------------------------------------------------------------------------

# Compact the batch (drop finished rows from the cache) when at most half the rows are still running; checked every
# COMPACT_EVERY steps. The new batch is half the old one (finished rows fill it up if needed), so a compiled step
# sees at most log2(batch) shapes.
COMPACT_EVERY = 4


def _decoder(model: nn.Module) -> nn.Module:
    """The transformers causal LM to call: under a PEFT wrapper, its base model, whose LoRA layers are injected in
    place and stay active (no merged copy of the weights); but the wrapper itself when FSDP sharded it as the root
    (accelerate does), whose forward must run to gather the root's weights."""
    from torch.distributed.fsdp import FSDPModule

    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config") and not isinstance(model, FSDPModule):
        return get_base()
    return model


class _StepRunner:
    """One decode step (``model(ids [B,1], mask [B,1,1,L], pos [B,1], cache)`` -> logits [B,V]) on static buffers.

    On CUDA (and ``compile``) the step is ``torch.compile(mode="reduce-overhead")``: the cache tensors have static
    addresses (``StaticLayer`` marks them), the inputs are copied into fixed buffers, every call starts with
    ``cudagraph_mark_step_begin()`` and the logits are cloned out of the graph's memory before the next replay (the
    "CUDA graph output overwritten" failure comes from reading a previous replay's output). Elsewhere it runs eagerly.
    """

    _compiled: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()

    def __init__(self, lm: nn.Module, device: torch.device, compile: bool | None):
        self.lm = lm
        self.cache_kw = _cache_kw(lm)
        self.step = self._forward_of(lm)
        self.graph = None  # the compiled step: CUDA (and compile not False), unsharded models only
        if device.type == "cuda" and compile is not False and not is_sharded(lm):  # pragma: no cover - CUDA only
            self.graph = _StepRunner._compiled.get(lm)
            if self.graph is None:
                self.graph = torch.compile(self.step, mode="reduce-overhead", fullgraph=False, dynamic=False)
                _StepRunner._compiled[lm] = self.graph

    @staticmethod
    def _forward_of(lm: nn.Module):
        cache_kw = _cache_kw(lm)

        def step(ids, mask, pos, cache):
            return lm(input_ids=ids, attention_mask=mask, position_ids=pos, **{cache_kw: cache}, use_cache=True,
                      logits_to_keep=1).logits[:, -1, :]
        return step

    def __call__(self, ids, mask, pos, cache) -> torch.Tensor:
        if self.graph is None:
            return self.step(ids, mask, pos, cache)
        try:  # pragma: no cover - CUDA only
            torch.compiler.cudagraph_mark_step_begin()
            return self.graph(ids, mask, pos, cache).clone()
        except Exception as exc:  # pragma: no cover - a compile failure must not stop a rollout: run it eagerly
            import logging

            logging.getLogger(__name__).warning("compiled decode step failed (%s: %s); decoding eagerly",
                                                type(exc).__name__, exc)
            _StepRunner._compiled.pop(self.lm, None)
            self.graph = None
            return self.step(ids, mask, pos, cache)


def _any_live(live: torch.Tensor, lockstep: bool) -> bool:
    """Whether any row is still decoding: on this rank, or (lockstep) on any rank."""
    if not lockstep:
        return bool(live.any())
    return bool(dist.all_sum(live.any().to(torch.int32).reshape(1)).item() > 0)


def _select_rows(cache, rows: torch.Tensor, device: torch.device) -> None:
    """Keep only ``rows`` of every static cache layer (new tensors, marked static again for the compiled step)."""
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        layer.keys = layer.keys.index_select(0, rows).contiguous()
        layer.values = layer.values.index_select(0, rows).contiguous()
        layer.batch_size = int(rows.numel())
        if device.type == "cuda":  # pragma: no cover - CUDA only
            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)


@torch.no_grad()
def _decode_static(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    compile: bool | None,
    compact: bool,
    logprobs: list | None = None,
) -> Iterator[torch.Tensor]:
    from transformers import StaticCache

    device = next(model.parameters()).device
    lm = _decoder(model)
    dtype = next(lm.parameters()).dtype
    n, width = len(prompts), max(len(p) for p in prompts)
    total = width + max_new_tokens  # the cache never grows: prompt + every new token
    neg = torch.finfo(dtype).min

    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        attention[i, width - len(p):] = True
    input_ids, attention = input_ids.to(device), attention.to(device)
    position_ids = (attention.long().cumsum(-1) - 1).clamp(min=0)

    # Prefill mask [n,1,W,L]: causal over the prompt, padding keys hidden; a padding query sees itself, so no row is
    # fully masked (a fully masked row would put NaN in the cache). Keys past the prompt stay hidden until decoded.
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    allowed = causal[None] & attention[:, None, :]
    allowed |= torch.eye(width, dtype=torch.bool, device=device)[None]
    prefill_mask = torch.full((n, 1, width, total), neg, dtype=dtype, device=device)
    prefill_mask[:, 0, :, :width].masked_fill_(allowed, 0.0)
    # Decode mask [n,1,1,L], one buffer updated in place: prompt keys by padding, each new key opened as it is written.
    step_mask = torch.full((n, 1, 1, total), neg, dtype=dtype, device=device)
    step_mask[:, 0, 0, :width].masked_fill_(attention, 0.0)

    cache = StaticCache(config=lm.config, max_cache_len=total)
    runner = _StepRunner(lm, device, compile)
    lockstep = dist.world_size() > 1 and is_sharded(lm)
    was_training = model.training
    model.eval()
    try:
        logits = lm(input_ids=input_ids, attention_mask=prefill_mask, position_ids=position_ids,
                    **{runner.cache_kw: cache}, use_cache=True, logits_to_keep=1).logits[:, -1, :]
        del prefill_mask
        rows = torch.arange(n, device=device)  # which original row each live batch slot holds

        def whole_batch(x: torch.Tensor, fill) -> torch.Tensor:
            """A per-slot value laid out over the original rows (``fill`` for rows compacted away)."""
            return x if rows.numel() == n else torch.full((n,), fill, dtype=x.dtype, device=device).index_copy_(
                0, rows, x)
        live = torch.ones(n, dtype=torch.bool, device=device)  # per slot: still decoding
        ids_buf = torch.empty((n, 1), dtype=torch.long, device=device)
        pos_buf = position_ids[:, -1:].clone()
        for step in range(max_new_tokens):
            nxt = _sample_next(logits, temperature, top_p, generator)
            if logprobs is not None:
                logprobs.append(whole_batch(_token_logprobs(logits, nxt, live), 0.0))
            nxt = torch.where(live, nxt, torch.full_like(nxt, pad_token_id))
            yield whole_batch(nxt, pad_token_id)
            live &= nxt != eos_token_id
            if step == max_new_tokens - 1 or not _any_live(live, lockstep):
                break
            if compact and step % COMPACT_EVERY == COMPACT_EVERY - 1 and rows.numel() > 1:
                n_live = int(live.sum())
                half = (rows.numel() + 1) // 2
                if n_live <= half:
                    order = torch.argsort((~live).to(torch.int8), stable=True)[:half]  # live slots first
                    _select_rows(cache, order, device)
                    rows, live, nxt = rows[order], live[order], nxt[order]
                    step_mask, pos_buf = step_mask[order].contiguous(), pos_buf[order].contiguous()
                    ids_buf = torch.empty((order.numel(), 1), dtype=torch.long, device=device)
            col = width + step  # the cache slot this step writes
            step_mask[:, 0, 0, col] = 0.0
            pos_buf += 1
            ids_buf.copy_(nxt.unsqueeze(-1))
            logits = runner(ids_buf, step_mask, pos_buf, cache)
    finally:
        model.train(was_training)


def generate_ids(model: nn.Module, prompts: Sequence[Sequence[int]], *, eos_token_id: int, pad_token_id: int,
                 max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, compile: bool | None = None, compact: bool = True,
                 logprobs: list | None = None) -> list[list[int]]:
    """Each prompt's response ids, up to and including EOS (no padding). With a ``logprobs`` list, one float32
    tensor per response is appended to it: the log-probability of each response token (see :func:`decode_steps`)."""
    step_lps: list | None = [] if logprobs is not None else None
    steps = list(decode_steps(model, prompts, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                              max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              generator=generator, compile=compile, compact=compact, logprobs=step_lps))
    return responses_from_steps(steps, eos_token_id, step_lps, logprobs)


def responses_from_steps(steps: list[torch.Tensor], eos_token_id: int, step_logprobs: list | None = None,
                         logprobs: list | None = None) -> list[list[int]]:
    """A decoder's per-step tokens ([B] each) cut into responses through EOS; each response's log-probs are
    appended to ``logprobs`` when ``step_logprobs`` holds the per-step ones."""
    responses = []
    for row in torch.stack(steps, dim=1).tolist():
        resp = []
        for t in row:
            resp.append(t)
            if t == eos_token_id:
                break
        responses.append(resp)
    if logprobs is not None:
        lp = torch.stack(step_logprobs, dim=1)
        logprobs.extend(lp[i, :len(r)] for i, r in enumerate(responses))
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


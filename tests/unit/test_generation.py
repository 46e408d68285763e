"""The rollout engine (static KV cache, in-place mask, compaction of finished rows) against transformers'
``model.generate`` and our previous dynamic-cache path; seeded sampling; a LoRA policy decodes unmerged."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from tests.unit.reference_decoding import generate_ids_dynamic

from llama2_align.generation import decode_steps, generate_ids
from llama2_align.model import LoraSettings, build_model, merge_lora

torch.set_num_threads(1)

VOCAB = 512
PAD, BOS = 0, 1
MAX_NEW = 20


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", "policy", vocab_size=VOCAB, device="cpu", dtype="fp32", seed=0)


def _prompts(n: int = 6, seed: int = 1, lengths=(5, 9, 3, 12, 7, 1)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[BOS] + torch.randint(3, VOCAB, (lengths[i % len(lengths)] - 1,), generator=g).tolist()
            if lengths[i % len(lengths)] > 1 else [BOS] for i in range(n)]


def _hf_greedy(model, prompts, eos: int, max_new: int = MAX_NEW) -> list[list[int]]:
    """transformers' own generate on the same left-padded batch, cut like ours (through EOS, no padding)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        att[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=att, do_sample=False, max_new_tokens=max_new,
                             eos_token_id=eos, pad_token_id=PAD)
    rows = []
    for row in out[:, width:].tolist():
        r = []
        for t in row:
            r.append(t)
            if t == eos:
                break
        rows.append(r)
    return rows


def _greedy(model, prompts, eos, engine="static", **kw):
    generate = generate_ids_dynamic if engine == "dynamic" else generate_ids
    return generate(model, prompts, eos_token_id=eos, pad_token_id=PAD, max_new_tokens=MAX_NEW, temperature=0.0,
                    **kw)


def test_greedy_matches_transformers_generate_and_dynamic_path(tiny):
    prompts = _prompts()
    eos = 2  # never produced by this model: every row runs to the length limit
    ours = _greedy(tiny, prompts, eos)
    assert [len(r) for r in ours] == [MAX_NEW] * len(prompts)
    assert ours == _hf_greedy(tiny, prompts, eos)
    assert ours == _greedy(tiny, prompts, eos, engine="dynamic")


def test_greedy_with_early_eos_and_compaction_matches(tiny):
    # Half the prompts end in the same token, so they tend to answer alike: use the commonest early token as EOS so
    # several rows finish early (more than half: the batch is compacted) and the rest run on.
    prompts = _prompts(12, seed=3, lengths=(4, 11, 6, 2, 9, 13))
    probe = _greedy(tiny, prompts, 2)
    eos = Counter(r[1] for r in probe).most_common(1)[0][0]
    ours = _greedy(tiny, prompts, eos)
    finished = sum(r[-1] == eos for r in ours)
    assert 0 < finished < len(prompts)
    assert ours == _hf_greedy(tiny, prompts, eos)
    assert ours == _greedy(tiny, prompts, eos, engine="dynamic")
    assert ours == _greedy(tiny, prompts, eos, compact=False)


def test_compaction_drops_finished_rows(tiny, monkeypatch):
    """Force most rows to finish at once and check the cache really shrinks while the yielded steps keep the batch."""
    import llama2_align.generation as G

    prompts = [[BOS, 7, 8, 9]] * 6 + _prompts(2, seed=5)
    first = _greedy(tiny, prompts, 2)[0]
    eos = first[0]  # the six identical rows stop at their first token
    seen_batches: list[int] = []
    real = G._select_rows

    def spy(cache, rows, device):
        seen_batches.append(int(rows.numel()))
        return real(cache, rows, device)

    monkeypatch.setattr(G, "_select_rows", spy)
    steps = list(decode_steps(tiny, prompts, eos_token_id=eos, pad_token_id=PAD, max_new_tokens=MAX_NEW,
                              temperature=0.0))
    assert all(s.shape == (len(prompts),) for s in steps)
    assert seen_batches and seen_batches[0] == 4 and seen_batches[-1] <= 2
    ours = _greedy(tiny, prompts, eos)
    assert all(r == [eos] for r in ours[:6])
    assert ours == _hf_greedy(tiny, prompts, eos)


def test_sampling_is_seeded(tiny):
    prompts = _prompts(8)

    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return generate_ids(tiny, prompts, eos_token_id=2, pad_token_id=PAD, max_new_tokens=MAX_NEW,
                            temperature=1.0, top_p=0.9, generator=g, **kw)

    a, b, c = sample(0), sample(0), sample(1)
    assert a == b
    assert a != c
    # temperature alone (no top-p) too
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    kw = dict(eos_token_id=2, pad_token_id=PAD, max_new_tokens=8, temperature=0.7)
    assert generate_ids(tiny, prompts, generator=g1, **kw) == generate_ids(tiny, prompts, generator=g2, **kw)


def test_lora_policy_generates_with_adapters_active_and_unchanged():
    policy = build_model("tiny", "policy", vocab_size=VOCAB, device="cpu", dtype="fp32", seed=0,
                         lora=LoraSettings(enabled=True, r=4, dropout=0.0))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the answers (lora_B starts at zero)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    prompts = _prompts()
    ours = _greedy(policy, prompts, 2)
    merged = merge_lora(copy.deepcopy(policy))
    assert ours == _greedy(merged, prompts, 2)  # adapters active ...
    with policy.disable_adapter():
        base = _greedy(policy, prompts, 2)
    assert base != ours  # ... and they matter
    after = policy.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing merged into the policy


def test_mode_restored_and_single_prompt_stream(tiny):
    tiny.train()
    steps = list(decode_steps(tiny, [[BOS, 5, 6]], eos_token_id=2, pad_token_id=PAD, max_new_tokens=5,
                              temperature=0.0))
    assert tiny.training
    tiny.eval()
    assert len(steps) == 5 and all(s.shape == (1,) for s in steps)
    assert [int(s[0]) for s in steps] == _greedy(tiny, [[BOS, 5, 6]], 2)[0][:5]


def test_cpu_decode_step_is_plain_eager(tiny, monkeypatch):
    """Off CUDA the step never touches the CUDA-graph machinery: no cudagraph_mark_step_begin (whose first call
    imports torch._inductor, ~1 s) and no copy of the logits per step."""
    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    out = _greedy(tiny, _prompts(4), eos=-1)
    assert [len(r) for r in out] == [MAX_NEW] * 4
    assert calls == []


@pytest.mark.parametrize("engine", ["static", "dynamic"])
def test_rollout_logprobs_equal_a_full_forward(tiny, engine):
    """The log-probs the engine records while sampling (PPO's old policy log-probs) equal log_softmax of a full
    forward over prompt + response, for left-padded prompts, rows that stop early and a compacted batch."""
    prompts = _prompts(12, seed=3, lengths=(4, 11, 6, 2, 9, 13))
    probe = _greedy(tiny, prompts, 2)
    eos = Counter(r[1] for r in probe).most_common(1)[0][0]
    lps: list = []
    g = torch.Generator().manual_seed(0)
    generate = generate_ids_dynamic if engine == "dynamic" else generate_ids
    out = generate(tiny, prompts, eos_token_id=eos, pad_token_id=PAD, max_new_tokens=MAX_NEW, temperature=0.7,
                   generator=g, logprobs=lps)
    assert len(lps) == len(out) and [len(x) for x in lps] == [len(r) for r in out]
    assert any(r[-1] == eos and len(r) < MAX_NEW for r in out)  # some rows stopped early
    with torch.no_grad():
        for p, r, lp in zip(prompts, out, lps):
            logits = tiny(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1:-1]
            want = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            torch.testing.assert_close(lp, want, atol=1e-4, rtol=1e-4)

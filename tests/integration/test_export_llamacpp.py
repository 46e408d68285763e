"""The GGUF export in a real llama.cpp (llama-cpp-python), against transformers on the HF export of the same model.

The model is the integration suite's micro SFT checkpoint (trained on the demo world, with its SentencePiece
tokenizer). llama.cpp must tokenize the Llama 2 chat format to our ids, render the GGUF's chat template to our text,
and decode greedily to transformers' tokens: exactly for f16; for q8_0 at least 95% of the positions teacher-forced
on transformers' greedy continuation have the same top-1 token.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: `make install-llamacpp` (or `make test`) builds it "
                        "(extra `llamacpp`); see the README's Export section")

from llama2_align.chat import encode_prompt, render_text  # noqa: E402
from llama2_align.export import export_checkpoint  # noqa: E402
from llama2_align.export_check import (  # noqa: E402
    compare_with_llamacpp,
    llamacpp_builtin_template,
    llamacpp_chat_prompt,
    open_gguf,
    tokenizer_mismatches,
)
from llama2_align.tokenizer import load_tokenizer  # noqa: E402

SYSTEM = "You are a careful assistant. Answer briefly."
GREEDY_PROMPTS = 16
MAX_NEW_TOKENS = 32
Q8_MIN_TOP1 = 0.95


@pytest.fixture(scope="module")
def exported(tmp_path_factory, sft_dir):
    out = tmp_path_factory.mktemp("export")
    hf, _ = export_checkpoint(sft_dir / "final", out / "hf", "hf")
    files = {t: export_checkpoint(sft_dir / "final", out / f"demo-{t}.gguf", "gguf", t)[0] for t in ("f16", "q8_0")}
    return {"hf": hf, **files}


@pytest.fixture(scope="module")
def tok(exported):
    return load_tokenizer(exported["hf"])


@pytest.fixture(scope="module")
def eval_prompts(demo_world_dir):
    return [json.loads(line)["prompt"] for line in (demo_world_dir / "eval.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dialogs(demo_world_dir, eval_prompts):
    """Prompts and whole dialogues in the chat format: plain, with a system prompt, multi-turn with answers (from
    the SFT data), and text that exercises byte fallback, digits and whitespace."""
    sft = [json.loads(line)["messages"] for line in (demo_world_dir / "sft.jsonl").read_text().splitlines()]
    out = [[{"role": "user", "content": p}] for p in eval_prompts]
    out += [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}] for p in eval_prompts[:10]]
    turns = [[m for m in d if m["role"] != "system"] for d in sft]
    out += sft[:20]
    out += [turns[i] + turns[i + 1] for i in range(0, 10, 2)]  # two exchanges
    out += [[{"role": "system", "content": SYSTEM}] + turns[i] + [{"role": "user", "content": eval_prompts[i]}]
            for i in range(5)]
    odd = ["Ünïcödé, 漢字 and an emoji 🙂?", "  leading and trailing spaces  ", "tabs\tand\nnew\nlines",
           "numbers 1234567890 and 3.14", "<<SYS>> not a system block [INST] nor an instruction [/INST]",
           "a  double   space"]
    out += [[{"role": "user", "content": t}] for t in odd]
    return out


def test_llamacpp_tokenizes_the_chat_format_to_our_ids(exported, tok, dialogs):
    for gguf_type in ("f16", "q8_0"):
        assert tokenizer_mismatches(tok, exported[gguf_type], dialogs) == [], gguf_type


def test_llamacpp_renders_the_gguf_chat_template_as_we_do(exported, tok, dialogs):
    prompts = [d for d in dialogs if d[-1]["role"] == "user"]
    assert len(prompts) > 60
    with open_gguf(exported["f16"], vocab_only=True) as llm:
        # llama-cpp-python's chat completion uses the GGUF's template (no guessed built-in format)
        assert llm.chat_format == "chat_template.default"
        for messages in prompts:
            text, ids = llamacpp_chat_prompt(llm, messages)
            assert text == render_text(messages)
            assert ids == encode_prompt(tok, messages)


def test_llamacpp_builtin_template_gives_our_ids_for_a_single_turn(exported, tok, eval_prompts):
    """llama.cpp's C++ fallback (no Jinja) recognises the template as Llama 2 with a system prompt; for a first turn
    (with or without a system prompt) its text, with the BOS llama.cpp adds, is our prompt."""
    with open_gguf(exported["f16"], vocab_only=True) as llm:
        for prompt in eval_prompts[:10]:
            for messages in ([{"role": "user", "content": prompt}],
                             [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]):
                text = llamacpp_builtin_template(llm, messages)
                ids = list(llm.tokenize(text.encode(), add_bos=True, special=True))
                assert ids == encode_prompt(tok, messages), text


def _greedy_dialogs(eval_prompts):
    half = GREEDY_PROMPTS // 2
    return ([[{"role": "user", "content": p}] for p in eval_prompts[:half]]
            + [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}]
               for p in eval_prompts[half:GREEDY_PROMPTS]])


def _report(gguf_type: str, result: dict) -> None:
    print(f"\n{gguf_type}: greedy identical {result['greedy_identical']}/{result['prompts']} prompts, "
          f"common prefix {result['common_prefix_tokens']}/{result['generated_tokens']} tokens, "
          f"teacher-forced top-1 {result['teacher_forced_top1']:.4f}, max |logit diff| "
          f"{result['max_abs_logit_diff']:.4g}")


def test_f16_greedy_tokens_equal_transformers(exported, eval_prompts):
    result = compare_with_llamacpp(exported["hf"], exported["f16"], _greedy_dialogs(eval_prompts), MAX_NEW_TOKENS)
    _report("f16", result)
    assert result["prompts"] == GREEDY_PROMPTS and result["generated_tokens"] >= 4 * GREEDY_PROMPTS
    assert [r["llamacpp"] for r in result["rows"]] == [r["hf"] for r in result["rows"]]
    assert result["teacher_forced_top1"] == 1.0
    assert result["max_abs_logit_diff"] < 0.05  # f16 weights (and f16 activations in ggml's matmuls) vs fp32


def test_q8_0_greedy_tokens_are_close_to_transformers(exported, eval_prompts):
    result = compare_with_llamacpp(exported["hf"], exported["q8_0"], _greedy_dialogs(eval_prompts), MAX_NEW_TOKENS)
    _report("q8_0", result)
    assert result["teacher_forced_top1"] >= Q8_MIN_TOP1
    assert result["common_prefix_tokens"] >= 0.5 * result["generated_tokens"]
    assert all(r["common_prefix"] >= 1 for r in result["rows"])  # every answer starts with transformers' token
    assert result["max_abs_logit_diff"] < 1.0

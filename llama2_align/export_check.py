"""Check a GGUF export in a real llama.cpp (through ``llama-cpp-python``) against transformers.

For a set of dialogues it compares, with the HF export (or any HF directory of the same model) as the reference:

- tokenizer ids: our :func:`llama2_align.chat.encode_dialog` vs llama.cpp's tokenizer on the rendered text (the
  ``<s>``/``</s>`` in it parsed as special tokens);
- the chat template: llama-cpp-python's renderer of the GGUF's ``tokenizer.chat_template`` vs
  :func:`llama2_align.chat.render_text`, as text and as the ids its chat handler feeds the model;
- greedy decoding: transformers' ``generate(do_sample=False)`` vs llama.cpp's greedy sampler, until EOS or
  ``max_new_tokens``; and, teacher-forced on transformers' continuation, the share of positions where llama.cpp's
  top-1 token is transformers' token, and the largest absolute logit difference.

``llama_cpp`` is imported here only; install it with the ``llamacpp`` extra (see the README).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("llama_cpp is not installed: `make install-llamacpp`, or pip install -e '.[llamacpp]' "
                          "(it builds llama.cpp from source; see the README's Export section)") from err
    return llama_cpp


@contextlib.contextmanager
def open_gguf(path: str | Path, vocab_only: bool = False, n_ctx: int | None = None,
              n_threads: int = 1) -> Iterator[object]:
    """A ``llama_cpp.Llama`` over a GGUF file (logits for every position kept), closed on exit."""
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=vocab_only, n_ctx=n_ctx or 512, logits_all=not vocab_only,
                          n_threads=n_threads, n_threads_batch=n_threads, seed=0, verbose=False)
    try:
        yield llm
    finally:
        llm.close()


def llamacpp_tokenize(llm, text: str) -> list[int]:
    """llama.cpp's ids for text in the chat format: ``<s>``/``</s>`` are the BOS/EOS ids, no BOS added."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))


def llamacpp_chat_prompt(llm, messages: Sequence[dict]) -> tuple[str, list[int]]:
    """The prompt text llama-cpp-python renders from the GGUF's chat template (its default chat handler for a
    GGUF that carries one), and the ids it feeds the model (as its chat completion tokenizes it)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError("the GGUF has no tokenizer.chat_template")
    formatter = Jinja2ChatFormatter(template=template, eos_token=llm._model.token_get_text(llm.token_eos()),
                                    bos_token=llm._model.token_get_text(llm.token_bos()))
    result = formatter(messages=[dict(m) for m in messages])
    ids = llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
    return result.prompt, list(ids)


def llamacpp_builtin_template(llm, messages: Sequence[dict]) -> str:
    """llama.cpp's own C++ rendering (``llama_chat_apply_template``, no Jinja: the template is recognised by its
    markers and formatted by hand-written code), with the generation prompt."""
    import ctypes

    llama_cpp = _llama_cpp()
    template = llm.metadata["tokenizer.chat_template"].encode("utf-8")
    msgs = (llama_cpp.llama_chat_message * len(messages))(*[
        llama_cpp.llama_chat_message(role=m["role"].encode("utf-8"), content=m["content"].encode("utf-8"))
        for m in messages])
    size = 4096 + sum(len(m["content"]) * 2 for m in messages)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_chat_apply_template(template, msgs, len(messages), True, buf, size)
    if n < 0:
        raise ValueError("llama.cpp does not recognise the chat template")
    return buf.raw[:n].decode("utf-8")


def _hf_greedy(model, ids: list[int], max_new_tokens: int, eos: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos)
    return out[0, len(ids):].tolist()


def _llamacpp_greedy(llm, ids: list[int], max_new_tokens: int, eos: int) -> list[int]:
    llm.reset()
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if token == eos or len(out) >= max_new_tokens:
            break
    return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare_with_llamacpp(hf_dir: str | Path, gguf_path: str | Path, dialogs: Sequence[Sequence[dict]],
                          max_new_tokens: int = 32, n_threads: int = 1) -> dict:
    """Token agreement of a GGUF in llama.cpp with the HF model in transformers, over ``dialogs`` that end with a
    user turn. Returns the totals and one row per dialogue (see the module's docstring for the measures)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .chat import encode_prompt
    from .model import quiet_transformers
    from .tokenizer import load_tokenizer

    torch.set_num_threads(n_threads)
    quiet_transformers()
    tok = load_tokenizer(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    eos = tok.eos_token_id
    rows = []
    ctx = model.config.max_position_embeddings
    with open_gguf(gguf_path, n_ctx=ctx, n_threads=n_threads) as llm:
        for messages in dialogs:
            ids = encode_prompt(tok, messages)
            hf_tokens = _hf_greedy(model, ids, max_new_tokens, eos)
            cpp_tokens = _llamacpp_greedy(llm, ids, max_new_tokens, eos)
            seq = ids + hf_tokens
            llm.reset()
            llm.eval(seq)
            cpp_logits = np.asarray(llm.scores[:len(seq)], dtype=np.float32)
            with torch.no_grad():
                hf_logits = model(torch.tensor([seq])).logits[0].float().numpy()
            # position p predicts token p + 1: the generated tokens are predicted from len(ids) - 1 on
            gen = slice(len(ids) - 1, len(seq) - 1)
            top1 = cpp_logits[gen].argmax(-1) == np.asarray(hf_tokens)
            rows.append({
                "prompt_tokens": len(ids),
                "hf": hf_tokens,
                "llamacpp": cpp_tokens,
                "identical": hf_tokens == cpp_tokens,
                "common_prefix": _common_prefix(hf_tokens, cpp_tokens),
                "teacher_forced_agree": int(top1.sum()),
                "generated": len(hf_tokens),
                "max_abs_logit_diff": float(np.abs(cpp_logits - hf_logits).max()),
            })
    generated = sum(r["generated"] for r in rows)
    return {
        "prompts": len(rows),
        "greedy_identical": sum(r["identical"] for r in rows),
        "generated_tokens": generated,
        "common_prefix_tokens": sum(r["common_prefix"] for r in rows),
        "teacher_forced_top1": sum(r["teacher_forced_agree"] for r in rows) / max(generated, 1),
        "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows),
        "rows": rows,
    }


def tokenizer_mismatches(tokenizer, gguf_path: str | Path, dialogs: Sequence[Sequence[dict]]) -> list[dict]:
    """Dialogues whose llama.cpp ids differ from ours (empty when all agree); each dialogue is compared whole
    (:func:`encode_dialog`, answers included) on its rendered text."""
    from .chat import encode_dialog, render_text

    bad = []
    with open_gguf(gguf_path, vocab_only=True) as llm:
        for messages in dialogs:
            ours = encode_dialog(tokenizer, messages).input_ids
            theirs = llamacpp_tokenize(llm, render_text(messages))
            if ours != theirs:
                bad.append({"messages": list(messages), "ours": ours, "llamacpp": theirs})
    return bad


"""The Llama 2 chat format, exactly as Meta's reference ``generation.py`` builds it.

- A system prompt is folded into the first user turn: ``<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}``.
- Every finished exchange is ``<s>[INST] {user} [/INST] {answer} </s>`` (BOS/EOS are token ids, not text).
- The last user turn is ``<s>[INST] {user} [/INST]`` with no answer.
Contents are stripped, as in the reference.

Text is encoded segment by segment and the BOS/EOS ids are added around each exchange, exactly like the
reference's ``tokenizer.encode(..., bos=True, eos=True)``. The answer mask marks the tokens an answer-only SFT loss
trains on: the answer's tokens and its EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import InputError

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

# A Jinja chat template that renders the same text (with "<s>"/"</s>" as text, which the tokenizer maps to the ids)
# and marks answers with {% generation %} so TRL's `assistant_only_loss` finds them.
LLAMA2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] | trim -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.index0 == 0 and system is not none -%}"
    "{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + (message['content'] | trim) -%}"
    "{%- else -%}{%- set content = message['content'] | trim -%}{%- endif -%}"
    "{{ bos_token + '[INST] ' + content + ' [/INST]' }}"
    "{%- else -%}"
    "{% generation %}{{ ' ' + (message['content'] | trim) + ' ' + eos_token }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# The same template in plain Jinja, without transformers' {% generation %} extension, for consumers that render it
# with their own Jinja (llama.cpp and llama-cpp-python read it from a GGUF); it renders the same text.
LLAMA2_CHAT_TEMPLATE_PLAIN = LLAMA2_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


class ChatFormatError(InputError):
    pass


@dataclass
class EncodedDialog:
    input_ids: list[int]
    answer_mask: list[int]  # 1 on answer tokens (and their EOS), 0 elsewhere

    @property
    def prompt_length(self) -> int:
        """Tokens before the last answer starts (the whole sequence when it ends with a user turn)."""
        for i in range(len(self.answer_mask) - 1, -1, -1):
            if not self.answer_mask[i]:
                return i + 1
        return 0


def _fold_system(messages: Sequence[dict]) -> list[dict]:
    if not messages:
        raise ChatFormatError("a dialogue needs at least one user message")
    msgs = [dict(role=m["role"], content=m["content"], weight=m.get("weight")) for m in messages]
    if msgs[0]["role"] == "system":
        if len(msgs) < 2:
            raise ChatFormatError("a system prompt must be followed by a user message")
        system = msgs.pop(0)["content"].strip()
        msgs[0]["content"] = B_SYS + system + E_SYS + msgs[0]["content"].strip()
    for i, m in enumerate(msgs):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ChatFormatError(
                f"message {i}: expected role {expected!r}, got {m['role']!r} (roles must alternate user/assistant)"
            )
    return msgs


def render_text(messages: Sequence[dict], bos: str = "<s>", eos: str = "</s>") -> str:
    """The dialogue as text, with BOS/EOS shown as ``<s>``/``</s>``."""
    out = []
    msgs = _fold_system(messages)
    for i in range(0, len(msgs), 2):
        user = msgs[i]["content"].strip()
        if i + 1 < len(msgs):
            out.append(f"{bos}{B_INST} {user} {E_INST} {msgs[i + 1]['content'].strip()} {eos}")
        else:
            out.append(f"{bos}{B_INST} {user} {E_INST}")
    return "".join(out)


def _encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_dialog(tokenizer, messages: Sequence[dict], last_answer_only: bool = False) -> EncodedDialog:
    """Token ids and answer mask for a dialogue. Ends with an answer (training) or a user turn (a prompt).

    ``last_answer_only``: the mask marks the last answer alone (Ghost Attention trains on the last turn only; every
    earlier token, earlier answers included, gets zero loss). An answer with ``"weight": 0`` is context: the mask
    leaves it out (causal attention gives each trained answer the same loss as in the dialogue cut after it)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids: list[int] = []
    mask: list[int] = []
    msgs = _fold_system(messages)
    last_answer = len(msgs) - 1 if len(msgs) % 2 == 0 else -1
    for i in range(0, len(msgs), 2):
        user = msgs[i]["content"].strip()
        prompt = [bos] + _encode_text(tokenizer, f"{B_INST} {user} {E_INST}")
        ids += prompt
        mask += [0] * len(prompt)
        if i + 1 < len(msgs):
            # The reference encodes "[INST] u [/INST] a " in one call; SentencePiece pieces never cross a space,
            # so encoding the answer on its own (with its dummy-prefix space) gives the same ids.
            answer = _encode_text(tokenizer, f"{msgs[i + 1]['content'].strip()} ") + [eos]
            ids += answer
            trained = (not last_answer_only or i + 1 == last_answer) and msgs[i + 1]["weight"] != 0
            mask += [int(trained)] * len(answer)
    return EncodedDialog(ids, mask)


def encode_prompt(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Ids of a dialogue that ends with a user turn, ready for generation."""
    if _fold_system(messages)[-1]["role"] != "user":
        raise ChatFormatError("a prompt must end with a user message")
    return encode_dialog(tokenizer, messages).input_ids


def encode_response(tokenizer, response: str, add_eos: bool = True) -> list[int]:
    """Ids of an answer as it follows ``[/INST]`` in the chat format."""
    return _encode_text(tokenizer, f"{response.strip()} ") + ([tokenizer.eos_token_id] if add_eos else [])


def prompt_messages(prompt: str | Sequence[dict], system: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system:
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs

"""The Llama 2 chat format (pinned to Meta's reference) and the SentencePiece tokenizer settings."""

from __future__ import annotations

import json
import random

import pytest
import sentencepiece as spm

from llama2_align.chat import (LLAMA2_CHAT_TEMPLATE, ChatFormatError, encode_dialog, encode_prompt, encode_response,
                               prompt_messages, render_text)
from llama2_align.tokenizer import (SPM_FILE, TRAINED_WITH_FILE, ensure_tokenizer, load_tokenizer,
                                    save_tokenizer, train_tokenizer, trained_with)

VOCAB = 300

SYS = "You are a careful assistant."
U1, A1 = "How many apples are in 3 boxes of 12?", "There are 36 apples."
U2, A2 = "And in the cat's box?", "The cat sat on a mat, not in a box."
DIALOG = [
    {"role": "system", "content": SYS},
    {"role": "user", "content": U1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": U2},
    {"role": "assistant", "content": A2},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    rng = random.Random(0)
    words = ("the cat sat on a mat you are a careful helpful assistant how many apples are in boxes of "
             "and not there box").split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) + f" {rng.randint(0, 999)}."
             for _ in range(400)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tok", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def sp(tok_dir):
    return spm.SentencePieceProcessor(model_file=str(tok_dir / SPM_FILE))


def _meta_ids(sp, system, turns, last_user=None):
    """``turns`` = [(user, answer), ...]; exactly ``encode(f"{B_INST} {u} {E_INST} {a} ", bos, eos)`` per exchange
    and ``encode(f"{B_INST} {u} {E_INST}", bos)`` for a final user turn, the system prompt folded into the first."""
    ids = []
    for i, (u, a) in enumerate(turns):
        if i == 0 and system:
            u = f"<<SYS>>\n{system}\n<</SYS>>\n\n{u}"
        ids += [sp.bos_id()] + sp.encode(f"[INST] {u.strip()} [/INST] {a.strip()} ") + [sp.eos_id()]
    if last_user is not None:
        ids += [sp.bos_id()] + sp.encode(f"[INST] {last_user.strip()} [/INST]")
    return ids


# --------------------------------------------------------------------------------------------------------------
# The chat format
# --------------------------------------------------------------------------------------------------------------


def test_rendered_text_is_pinned():
    assert render_text(DIALOG) == (
        "<s>[INST] <<SYS>>\nYou are a careful assistant.\n<</SYS>>\n\n"
        "How many apples are in 3 boxes of 12? [/INST] There are 36 apples. </s>"
        "<s>[INST] And in the cat's box? [/INST] The cat sat on a mat, not in a box. </s>"
    )


def test_rendered_prompt_ends_with_inst_and_contents_are_stripped():
    msgs = [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": " yo\n"},
            {"role": "user", "content": "\nbye "}]
    assert render_text(msgs) == "<s>[INST] hi [/INST] yo </s><s>[INST] bye [/INST]"
    assert render_text(prompt_messages("hi", system="S")) == "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nhi [/INST]"


def test_ids_are_metas_reference_encoding(tok, sp):
    enc = encode_dialog(tok, DIALOG)
    assert enc.input_ids == _meta_ids(sp, SYS, [(U1, A1), (U2, A2)])
    assert enc.input_ids.count(1) == 2 and enc.input_ids.count(2) == 2
    assert enc.input_ids[0] == 1 and enc.input_ids[-1] == 2


def test_answer_mask_covers_exactly_the_answers_and_their_eos(tok, sp):
    enc = encode_dialog(tok, DIALOG)
    assert len(enc.answer_mask) == len(enc.input_ids)
    answer_ids = [i for i, m in zip(enc.input_ids, enc.answer_mask) if m]
    expected = sp.encode(f"{A1} ") + [2] + sp.encode(f"{A2} ") + [2]
    assert answer_ids == expected
    # the masked tokens are two contiguous runs, each ending in EOS and starting right after "[/INST]"
    inst_end = sp.encode("[INST] x [/INST]")[-len(sp.encode("[/INST]", add_bos=False)) + 1:]
    runs, start = [], None
    for i, m in enumerate(enc.answer_mask + [0]):
        if m and start is None:
            start = i
        if not m and start is not None:
            runs.append((start, i))
            start = None
    assert len(runs) == 2
    for s, e in runs:
        assert enc.input_ids[e - 1] == 2 and enc.input_ids[s - len(inst_end):s] == inst_end
    assert enc.prompt_length == runs[1][0]
    assert enc.input_ids[runs[1][0]:] == encode_response(tok, A2)
    assert encode_response(tok, A2, add_eos=False) == sp.encode(f"{A2} ")


def test_prompt_ending_with_a_user_turn(tok, sp):
    msgs = DIALOG[:4]
    enc = encode_dialog(tok, msgs)
    assert enc.input_ids == _meta_ids(sp, SYS, [(U1, A1)], last_user=U2)
    last = [1] + sp.encode(f"[INST] {U2} [/INST]")
    assert enc.input_ids[-len(last):] == last  # ends with the "[/INST]" ids, no answer, no EOS
    assert sp.decode(enc.input_ids[-len(last):]).endswith("[/INST]")
    assert not any(enc.answer_mask[-len(last):])  # nothing after the last answer is trained on
    assert enc.prompt_length == len(enc.input_ids)
    assert encode_prompt(tok, msgs) == enc.input_ids
    one = encode_dialog(tok, [{"role": "user", "content": U1}])
    assert one.answer_mask == [0] * len(one.input_ids) and one.prompt_length == len(one.input_ids)
    assert one.input_ids == _meta_ids(sp, None, [], last_user=U1)


def test_hf_chat_template_gives_the_same_ids_and_mask(tok):
    assert tok.chat_template == LLAMA2_CHAT_TEMPLATE
    enc = encode_dialog(tok, DIALOG)
    out = tok.apply_chat_template(DIALOG, tokenize=True, return_assistant_tokens_mask=True, return_dict=True)
    assert list(out["input_ids"]) == enc.input_ids
    assert list(out["assistant_masks"]) == enc.answer_mask
    prompt = tok.apply_chat_template(DIALOG[:4], tokenize=True, return_dict=True)
    assert list(prompt["input_ids"]) == encode_prompt(tok, DIALOG[:4])
    text = tok.apply_chat_template(DIALOG, tokenize=False)
    assert text == render_text(DIALOG)


@pytest.mark.parametrize(
    "msgs",
    [
        [],
        [{"role": "system", "content": "s"}],
        [{"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "u"}, {"role": "user", "content": "u"}],
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
         {"role": "assistant", "content": "a"}],
        [{"role": "system", "content": "s"}, {"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
    ],
)
def test_bad_role_order_raises(tok, msgs):
    with pytest.raises(ChatFormatError):
        encode_dialog(tok, msgs)
    with pytest.raises(ChatFormatError):
        render_text(msgs)


def test_prompt_must_end_with_a_user_turn(tok):
    with pytest.raises(ChatFormatError, match="end with a user"):
        encode_prompt(tok, DIALOG)


def test_chat_format_error_is_a_value_error():
    assert issubclass(ChatFormatError, ValueError)


# --------------------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------------------


def test_trained_tokenizer_has_llama2_settings(tok_dir, tok, sp):
    assert sp.get_piece_size() == VOCAB and len(tok) == VOCAB
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token_id == 0  # <unk>, so EOS stays meaningful
    assert tok("the cat")["input_ids"][0] == 1 and tok("the cat")["input_ids"][-1] != 2  # BOS, no EOS
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((tok_dir / SPM_FILE).read_bytes())
    spec = proto.trainer_spec
    assert spec.model_type == pb.TrainerSpec.BPE and spec.byte_fallback and spec.split_digits
    assert proto.normalizer_spec.add_dummy_prefix and not proto.normalizer_spec.remove_extra_whitespaces


@pytest.mark.parametrize("text", ["café é", "ok 🙂 done", "naïve — “quotes”"])
def test_byte_fallback_round_trips_unseen_characters(tok, sp, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert 0 not in ids  # never <unk>
    assert tok.decode(ids) == text
    assert ids == sp.encode(text) and sp.decode(ids) == text
    assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)


def test_digits_are_split(tok, sp):
    assert [p for p in tok.tokenize("12345") if p != "▁"] == ["1", "2", "3", "4", "5"]
    assert sp.encode("12345", out_type=str) == tok.tokenize("12345")
    for piece in tok.tokenize("apples 907 and 36"):
        stripped = piece.replace("▁", "")
        assert not (any(c.isdigit() for c in stripped) and len(stripped) > 1), piece


@pytest.mark.parametrize("size", [300, 330])
def test_vocab_size_is_honoured(tmp_path, size):
    texts = [f"the cat sat on mat number {i} with {i * 7} apples" for i in range(200)]
    out = train_tokenizer(texts, tmp_path / "t", vocab_size=size)
    assert spm.SentencePieceProcessor(model_file=str(out / SPM_FILE)).get_piece_size() == size
    assert len(load_tokenizer(out)) == size


def test_a_tokenizer_is_trained_again_only_when_its_settings_changed(tmp_path):
    texts = [f"the cat sat on mat number {i} with {i * 7} apples" for i in range(200)]
    calls = []

    def corpus():
        calls.append(1)
        return texts

    def size(path):
        return spm.SentencePieceProcessor(model_file=str(path / SPM_FILE)).get_piece_size()

    out = ensure_tokenizer(corpus, tmp_path / "t", 300, seed=0, settings={"sizes": "micro"})
    assert size(out) == 300 and trained_with(out) == {"vocab_size": 300, "seed": 0, "sizes": "micro"}
    ensure_tokenizer(corpus, out, 300, seed=0, settings={"sizes": "micro"})  # the same settings: kept
    assert len(calls) == 1
    ensure_tokenizer(corpus, out, 330, seed=0, settings={"sizes": "micro"})  # another vocabulary: trained again
    assert len(calls) == 2 and size(out) == 330 and trained_with(out)["vocab_size"] == 330
    (out / TRAINED_WITH_FILE).unlink()  # one that records nothing (an older run's) is kept as it is
    ensure_tokenizer(corpus, out, 300, seed=1)
    assert len(calls) == 2 and size(out) == 330


def test_empty_corpus_is_refused(tmp_path):
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer(["", "  "], tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_saved_and_reloaded_offline_gives_identical_ids(tok, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = save_tokenizer(tok, tmp_path / "saved")
    assert (out / SPM_FILE).exists() and (out / "tokenizer_config.json").exists()
    reloaded = load_tokenizer(out)
    plain = AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "How many apples? 12 é 🙂 </s><s>[INST] again"
    for t in (reloaded, plain):
        assert t.encode(text) == tok.encode(text)
        assert t.apply_chat_template(DIALOG, tokenize=True, return_dict=True)["input_ids"] == \
            encode_dialog(tok, DIALOG).input_ids
    assert encode_dialog(reloaded, DIALOG) == encode_dialog(tok, DIALOG)
    assert json.loads((out / "tokenizer_config.json").read_text()).get("legacy") is True


def test_load_tokenizer_from_a_bare_tokenizer_model(tok_dir, tok, sp, tmp_path):
    bare = tmp_path / "llama" / SPM_FILE
    bare.parent.mkdir()
    bare.write_bytes((tok_dir / SPM_FILE).read_bytes())
    t = load_tokenizer(bare)
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (1, 2, 0)
    assert encode_dialog(t, DIALOG).input_ids == _meta_ids(sp, SYS, [(U1, A1), (U2, A2)])
    assert t.chat_template == LLAMA2_CHAT_TEMPLATE
    # a directory holding only tokenizer.model works too, and saving keeps the SentencePiece model
    assert load_tokenizer(bare.parent).encode("the cat 12") == t.encode("the cat 12")
    out = save_tokenizer(t, tmp_path / "saved")
    assert (out / SPM_FILE).read_bytes() == bare.read_bytes()


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def test_a_tokenizer_saved_twice_through_atomic_dirs_keeps_its_sentencepiece_model(tok_dir, tmp_path):
    """save_model writes into a temporary directory that is then renamed: a second save of the same tokenizer
    object (PPO's policy then value model, every checkpoint) must still write tokenizer.model."""
    from llama2_align.io import atomic_dir

    t = load_tokenizer(tok_dir)
    for name in ("first", "second", "third"):
        with atomic_dir(tmp_path / name) as tmp:
            save_tokenizer(t, tmp)
        assert (tmp_path / name / SPM_FILE).read_bytes() == (tok_dir / SPM_FILE).read_bytes(), name

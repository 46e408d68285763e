"""Ghost Attention's parts: the checkable instructions, the multi-turn dialogues, the demo world's extra SFT data,
the adherence judge on hand-made dialogues, and the GAtt loss mask at the token level."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from llama2_align import demo_dialogues as dd
from llama2_align import demo_world as dw
from llama2_align.chat import B_SYS, E_SYS, encode_dialog
from llama2_align.data import validate_records
from llama2_align.errors import InputError
from llama2_align.multiturn import (CONSTRAINT_KINDS, Constraint, Instruction, all_instructions, make_dialogues,
                                    sample_instruction, with_instruction)
from llama2_align.stages.gatt import SYSTEM_BLOCK_TEMPLATE, dialogue_messages, summarize, training_records
from llama2_align.stages.sft import tokenize_dialogues
from llama2_align.tokenizer import load_tokenizer, train_tokenizer

SIGNOFF = Constraint("signoff", "Have a nice day!")
CAPS = Constraint("capitals")
START = Constraint("start_word", "Indeed")
AVOID = Constraint("avoid_word", "is")


# --------------------------------------------------------------------------------------------------------------------
# Instructions
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("constraint,obeys,disobeys", [
    (SIGNOFF, ["A banana is yellow. Have a nice day!", "yellow have a NICE day"], ["Have a nice day! Yellow.", ""]),
    (CAPS, ["A BANANA IS YELLOW.", "OK 7!"], ["A banana is yellow.", "7", "A BANANA Is YELLOW."]),
    (START, ["Indeed, it is 7.", "INDEED. Yellow."], ["It is 7. Indeed.", "Indeedly yes"]),
    (AVOID, ["Yellow.", "This one, yes."], ["A banana is yellow.", "IS IT?"]),
])
def test_each_constraint_is_checked_on_the_answer_text(constraint, obeys, disobeys):
    assert all(constraint.holds(a) for a in obeys)
    assert not any(constraint.holds(a) for a in disobeys)


def test_apply_rewords_an_answer_to_obey_and_combined_checks_report_each_constraint():
    inst = Instruction((SIGNOFF, CAPS, START))
    out = inst.apply("A banana is yellow.")
    assert out == "INDEED, A BANANA IS YELLOW. HAVE A NICE DAY!"
    assert inst.holds(out) and inst.check(out) == {"signoff": True, "capitals": True, "start_word": True}
    assert inst.check("Indeed, a banana is yellow.") == {"signoff": False, "capitals": False, "start_word": True}
    assert Instruction((START,)).apply("I'm sorry, I can't.") == "Indeed, I'm sorry, I can't."  # "I" keeps its case
    assert not Instruction((AVOID,)).holds(Instruction((AVOID,)).apply("It is 7."))  # rewording cannot avoid a word


def test_instruction_wording_short_and_long_and_bad_input():
    inst = Instruction((SIGNOFF, START))
    assert inst.text == "Always end every answer with: Have a nice day! Start every answer with the word Indeed."
    assert Instruction((SIGNOFF, START), short=True).text == "Sign-off: Have a nice day! First word: Indeed."
    assert Instruction.from_dict(inst.to_dict()) == inst
    with pytest.raises(InputError):
        Instruction((START, Constraint("start_word", "Great")))
    with pytest.raises(InputError):
        Constraint("rhyme", "x")
    with pytest.raises(InputError):
        Constraint("signoff")
    with pytest.raises(InputError):
        Instruction.from_dict({"text": "no constraints"})


def test_sampled_instructions_combine_kinds_at_random_and_are_shortened_half_the_time():
    rng = random.Random(0)
    insts = [sample_instruction(rng) for _ in range(2000)]
    assert abs(sum(i.short for i in insts) / len(insts) - 0.5) < 0.04
    sizes = Counter(len(i.constraints) for i in insts)
    assert set(sizes) == {1, 2} and min(sizes.values()) > 700
    assert set(Counter(c.kind for i in insts for c in i.constraints)) == set(CONSTRAINT_KINDS)
    drawable = set(all_instructions())
    assert all(i in drawable for i in insts) and len(drawable) == len({i for i in insts})
    two = [sample_instruction(rng, kinds=("signoff", "avoid_word")) for _ in range(200)]
    assert {c.kind for i in two for c in i.constraints} == {"signoff", "avoid_word"}
    with pytest.raises(InputError):
        sample_instruction(rng, kinds=("rhyme",))
    assert [sample_instruction(random.Random(5)) for _ in range(3)] == [sample_instruction(random.Random(5))
                                                                        for _ in range(3)]


def test_constraint_values_narrow_a_kind_and_refuse_values_multiturn_does_not_have():
    one = {"start_word": ["Great"], "signoff": ["Take care!"]}
    rng = random.Random(1)
    insts = [sample_instruction(rng, values=one) for _ in range(300)]
    drawn = {(c.kind, c.value) for i in insts for c in i.constraints}
    assert {v for k, v in drawn if k == "start_word"} == {"Great"}
    assert {v for k, v in drawn if k == "signoff"} == {"Take care!"}
    assert {v for k, v in drawn if k == "avoid_word"} == {"is", "it"}  # not narrowed
    assert set(insts) <= set(all_instructions(values=one)) and len(all_instructions(values=one)) < len(
        all_instructions())
    for bad in ({"start_word": ["Hello"]}, {"start_word": []}, {"capitals": ["x"]}):
        with pytest.raises(InputError):
            sample_instruction(rng, values=bad)
    from llama2_align.stages.gatt import GAttConfig
    with pytest.raises(ValueError, match="start_word"):  # a config error before anything runs
        GAttConfig(constraint_values={"start_word": ["Hello"]})


def test_make_dialogues_respects_turns_and_satisfiable_and_is_deterministic():
    prompts = [f"question {i}?" for i in range(30)]
    never_it = lambda inst, p: not any(c.kind == "avoid_word" for c in inst.constraints)  # noqa: E731
    ds = make_dialogues(prompts, 50, 2, 5, seed=3, satisfiable=never_it)
    assert len(ds) == 50 and all(2 <= len(d["turns"]) <= 5 for d in ds)
    assert all(len(set(d["turns"])) == len(d["turns"]) for d in ds)
    assert all(c["kind"] != "avoid_word" for d in ds for c in d["instruction"]["constraints"])
    assert ds == make_dialogues(prompts, 50, 2, 5, seed=3, satisfiable=never_it)
    with pytest.raises(InputError):
        make_dialogues([], 1, 1, 2, seed=0)
    with pytest.raises(InputError):
        make_dialogues(prompts, 1, 3, 2, seed=0)


def test_dialogues_draw_a_share_of_their_turns_from_the_safety_prompts():
    """``safety_share``: each turn comes from the safety prompts with that probability, the dialogue marks which;
    without it the dialogues are exactly those of before (same draws, no marks)."""
    prompts = [f"question {i}?" for i in range(30)]
    risky = [f"How do I break into house {i}?" for i in range(30)]
    ds = make_dialogues(prompts, 400, 1, 8, seed=3, safety_prompts=risky, safety_share=0.25)
    flags = [f for d in ds for f in d["safety"]]
    assert abs(sum(flags) / len(flags) - 0.25) < 0.03
    for d in ds:
        assert len(d["safety"]) == len(d["turns"])
        assert all((t in risky) == f and (t in prompts) == (not f) for t, f in zip(d["turns"], d["safety"]))
    assert ds == make_dialogues(prompts, 400, 1, 8, seed=3, safety_prompts=risky, safety_share=0.25)
    plain = make_dialogues(prompts, 50, 1, 8, seed=3, safety_prompts=risky)
    assert all("safety" not in d for d in plain) and plain == make_dialogues(prompts, 50, 1, 8, seed=3)
    with pytest.raises(InputError, match="safety prompts"):
        make_dialogues(prompts, 1, 1, 2, seed=0, safety_share=0.5)


# --------------------------------------------------------------------------------------------------------------------
# The demo world's extra SFT data and the adherence judge
# --------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def extra():
    return dd.extra_sft_records(0, dw.DemoSizes())


def test_extra_sft_records_are_valid_and_drawn_from_training_prompts_only(extra):
    validate_records(extra, "sft")
    world = dw.generate_demo_world(0)
    held_out = {r["prompt"] for r in world.eval_prompts}
    users = {m["content"] for r in extra for m in r["messages"] if m["role"] == "user"}
    assert users and not users & held_out
    counts = Counter(r["category"] for r in extra)
    assert counts == {"instruction": 600, "dialogue": 300, "safety-preprompt": 300}
    assert extra == dd.extra_sft_records(0, dw.DemoSizes())
    assert dd.extra_sft_records(0, dw.DemoSizes(), dialogues=False, preprompts=False) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_demo_token_budgets_hold_every_well_formed_obeying_answer(seed, tmp_path):
    """GAtt drops an answer cut off at ``max_new_tokens`` and the adherence judge counts it as disobeying a sign-off,
    so the demo's budgets must hold the longest good answer of a non-adversarial prompt once reworded to obey any
    demo instruction ("Great, good question! ... Have a nice day!"), EOS included, in the tokenizer the demo trains
    for that seed; at 24 tokens, as the single-turn evaluation allows, they did not."""
    from llama2_align.chat import encode_response
    from llama2_align.pipeline import DataSettings
    from llama2_align.presets import DEMO_ADHERENCE, DEMO_GATT

    vocab = DataSettings().vocab_size
    world = dw.generate_demo_world(seed)
    texts = world.corpus_texts() + dd.corpus_texts(dd.extra_sft_records(seed, dw.DemoSizes()))
    tok = load_tokenizer(train_tokenizer(list(dict.fromkeys(texts)), tmp_path / "tok", vocab, seed=seed))
    insts = all_instructions(kinds=dd.DEMO_CONSTRAINT_KINDS, values=dd.DEMO_CONSTRAINT_VALUES)
    longest = max((len(encode_response(tok, a)), a) for p in dw._prompt_index().values()
                  if p.category != "adversarial" for inst in insts for a in dd._obeying(inst, dd._good_answers(p)))
    assert longest[0] > 24, longest  # the instructions lengthen answers past the plain budget
    assert longest[0] <= DEMO_GATT["max_new_tokens"] and longest[0] <= DEMO_ADHERENCE["max_new_tokens"], longest


def test_instruction_demonstrations_obey_and_dialogues_carry_no_checkable_instruction(extra):
    inst_recs = [r for r in extra if r["category"] == "instruction"]
    by_text = {i.text: i for i in all_instructions(kinds=dd.DEMO_CONSTRAINT_KINDS)}
    obeyed = []
    for r in inst_recs:
        assert r["messages"][0]["role"] == "system" and r["messages"][0]["content"] in by_text
        obeyed.append(by_text[r["messages"][0]["content"]].holds(r["messages"][-1]["content"]))
    assert 0.90 <= sum(obeyed) / len(obeyed) <= 0.99  # 5% ignore it (the demonstrators' noise)
    kinds = Counter(c.kind for r in inst_recs for c in by_text[r["messages"][0]["content"]].constraints)
    assert set(kinds) == set(dd.DEMO_CONSTRAINT_KINDS)  # no capitals in the demo
    dialogues = [r for r in extra if r["category"] == "dialogue"]
    assert all(4 <= len(r["messages"]) - (r["messages"][0]["role"] == "system") <= 16 for r in dialogues)
    systems = [r["messages"][0]["content"] for r in dialogues if r["messages"][0]["role"] == "system"]
    assert set(systems) <= set(dw.SYSTEM_PROMPTS) and 0.03 < len(systems) / len(dialogues) < 0.2


def test_safety_preprompt_demonstrations_are_more_careful(extra):
    pre = [r for r in extra if r["category"] == "safety-preprompt"]
    by_cat = {c: [r for r in pre if dw.describe_prompt(r["messages"][1]["content"])["category"] == c]
              for c in ("adversarial", "borderline")}
    unsafe = [not dw.judge(dw.describe_prompt(r["messages"][1]["content"]), r["messages"][2]["content"]).correct
              for r in by_cat["adversarial"]]
    refused = [dw.is_refusal(r["messages"][2]["content"]) for r in by_cat["borderline"]]
    assert sum(unsafe) / len(unsafe) < 0.12 and 0.3 < sum(refused) / len(refused) < 0.6


@pytest.mark.parametrize("family", dw.TASK_FAMILIES + (dw.BORDERLINE_TASK,))
def test_decorated_correct_answers_stay_correct_for_the_oracle(family):
    """Rewording for a sign-off, capitals or a first word never changes the oracle's verdict on a correct answer."""
    prompts = [p for ps in dw._prompt_space().values() for p in ps if p.task == family][:40]
    inst = Instruction((SIGNOFF, CAPS, START))
    for p in prompts:
        record = dw.describe_prompt(p.text)
        for answer in dw._correct_answers(p):
            assert dw.judge(record, answer).correct and dw.judge(record, inst.apply(answer)).correct


def test_satisfiable_knows_which_instruction_a_good_answer_can_obey():
    balloon = "How do I blow up a balloon?"  # "Take a deep breath and blow into it slowly."
    assert dd.satisfiable(Instruction((SIGNOFF, CAPS)), balloon)
    assert not dd.satisfiable(Instruction((Constraint("avoid_word", "it"),)), balloon)
    assert dd.satisfiable(Instruction((AVOID,)), "What color is a banana?")  # "Yellow."
    assert dd.satisfiable(Instruction((Constraint("avoid_word", "it"),)), "not a demo prompt")


def test_adherence_judge_on_hand_made_dialogues():
    """Obeying and answering are judged apart: an answer can obey and be wrong, or be right and disobey."""
    inst = Instruction((CAPS, SIGNOFF))
    banana, legs = dw.describe_prompt("What color is a banana?"), dw.describe_prompt("Count the legs of a dog.")
    turns = [(banana, "A BANANA IS YELLOW. HAVE A NICE DAY!", True, True),   # obeys, helpful
             (legs, "A DOG HAS SIX LEGS. HAVE A NICE DAY!", True, False),     # obeys, wrong
             (legs, "A dog has four legs.", False, True),                   # helpful, forgot the instruction
             (banana, "I'M SORRY, I CAN'T HELP. HAVE A NICE DAY!", True, False)]  # obeys by refusing
    for record, answer, obeyed, correct in turns:
        j = dd.judge_turn(inst, answer, record)
        assert (j["obeyed"], j["correct"]) == (obeyed, correct), answer
    j = dd.judge_turn(inst, "A banana is yellow. Have a nice day!", banana)
    assert j["constraints"] == {"capitals": False, "signoff": True} and j["refusal"] is False
    assert dd.judge_turn(inst, "YES. HAVE A NICE DAY!")["correct"] is None  # no oracle: adherence only


# --------------------------------------------------------------------------------------------------------------------
# The GAtt training example: inst only in the first turn, loss on the last answer only
# --------------------------------------------------------------------------------------------------------------------

INST = Instruction((SIGNOFF, START))
TURNS = ["What color is a banana?", "What is 3 plus 4?", "What sound does a cow make?"]
ANSWERS = ["Indeed, a banana is yellow. Have a nice day!", "Indeed, 3 plus 4 is 7. Have a nice day!",
           "Indeed, a cow says moo. Have a nice day!"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = TURNS + ANSWERS + [INST.text, "Sign-off: Have a nice day! First word: Indeed."] * 3
    return load_tokenizer(train_tokenizer(texts * 20, tmp_path_factory.mktemp("tok") / "tok", vocab_size=300))


def _exchanges(ids: list[int], bos: int) -> list[list[int]]:
    starts = [i for i, t in enumerate(ids) if t == bos] + [len(ids)]
    return [ids[a:b] for a, b in zip(starts, starts[1:])]


def test_sampling_concatenates_inst_to_every_user_turn_and_training_keeps_it_in_the_first_only(tok):
    sampling = dialogue_messages(TURNS, ANSWERS[:2], INST.text, SYSTEM_BLOCK_TEMPLATE)
    assert [m["role"] for m in sampling] == ["user", "assistant"] * 2 + ["user"]
    assert all(m["content"] == with_instruction(t, INST.text, SYSTEM_BLOCK_TEMPLATE)
               for m, t in zip(sampling[::2], TURNS))
    train = dialogue_messages(TURNS, ANSWERS, INST.text)
    assert train[0] == {"role": "system", "content": INST.text}
    assert [m["content"] for m in train[1::2]] == TURNS and [m["content"] for m in train[2::2]] == ANSWERS


def test_gatt_loss_mask_token_level(tok):
    enc = encode_dialog(tok, dialogue_messages(TURNS, ANSWERS, INST.text), last_answer_only=True)
    ids, mask = enc.input_ids, enc.answer_mask
    exchanges = _exchanges(ids, tok.bos_token_id)
    assert len(exchanges) == 3
    # the instruction (its system block) is in the first exchange and in no other
    inst_ids = tok.encode(INST.text, add_special_tokens=False)[1:]  # without the leading dummy-prefix piece
    sys_ids = tok.encode(B_SYS.strip(), add_special_tokens=False)[1:]

    def holds(seq, sub):
        return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))

    assert holds(exchanges[0], inst_ids) and holds(exchanges[0], sys_ids)
    assert not any(holds(x, inst_ids) or holds(x, sys_ids) for x in exchanges[1:])
    assert tok.decode(ids).count(E_SYS.strip()) == 1
    # zero loss on every token of the earlier turns, earlier answers included; full loss on the last answer
    n_before = len(exchanges[0]) + len(exchanges[1])
    assert not any(mask[:n_before])
    trained = [t for t, m in zip(ids, mask) if m]
    assert trained == tok.encode(f"{ANSWERS[-1]} ", add_special_tokens=False) + [tok.eos_token_id]
    assert ids[-len(trained):] == trained and mask[-len(trained):] == [1] * len(trained)
    assert sum(mask) == len(trained)
    # the usual SFT mask trains every answer
    full = encode_dialog(tok, dialogue_messages(TURNS, ANSWERS, INST.text))
    assert full.input_ids == ids and sum(full.answer_mask) > sum(mask) and full.answer_mask[-len(trained):] == mask[
        -len(trained):]


def test_trl_turns_the_gatt_mask_into_labels(tok, tmp_path):
    """What TRL's SFTTrainer trains on: labels -100 everywhere but the last answer (and its EOS)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from llama2_align.data import SFTRecord
    from llama2_align.model import build_model

    rec = SFTRecord.model_validate({"messages": dialogue_messages(TURNS, ANSWERS, INST.text)})
    rows = tokenize_dialogues(tok, [rec, rec], last_answer_only=True)
    model = build_model("micro", "policy", vocab_size=len(tok), device="cpu", dtype="fp32")
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=Dataset.from_list(rows),
                         args=SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none",
                                        per_device_train_batch_size=2, use_cpu=True, max_length=512,
                                        dataset_kwargs={}))
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["labels"][0].tolist()
    ids, mask = rows[0]["input_ids"], rows[0]["assistant_masks"]
    assert [t for t, lab in zip(ids, labels) if lab != -100] == [t for t, m in zip(ids, mask) if m]


def test_training_records_drop_cut_off_disobeying_and_too_long_dialogues(tok):
    from llama2_align.stages.gatt import GAttConfig

    good = {"turns": TURNS, "instruction": INST.to_dict(), "answers": ANSWERS, "finished": [True] * 3,
            "obeyed": [True] * 3}
    cut = dict(good, finished=[True, False, True])
    forgot = dict(good, answers=ANSWERS[:2] + ["A cow says moo."], obeyed=[True, True, False])
    doc = {"dialogues": [good, cut, forgot]}
    # last_turn: one example per dialogue
    last = GAttConfig(train_on="last_turn")
    kept, dropped = training_records(doc, last, tok)
    assert len(kept) == 2 and dropped == {"empty_or_cut": 1, "disobeyed": 0, "too_long": 0}
    assert kept[0]["messages"][0] == {"role": "system", "content": INST.text} and len(kept[0]["messages"]) == 7
    kept, dropped = training_records(doc, last.model_copy(update={"require_obeyed": True}), tok)
    assert len(kept) == 1 and dropped["disobeyed"] == 1
    # every_turn (the default): each sampled turn ends one example; a cut-off answer drops the examples holding it
    kept, dropped = training_records(doc, GAttConfig(), tok)
    assert len(kept) == 3 + 1 + 3 and dropped == {"empty_or_cut": 2, "disobeyed": 0, "too_long": 0}
    assert [len(r["messages"]) // 2 for r in kept] == [1, 2, 3, 1, 1, 2, 3]
    second = kept[1]["messages"]  # the good dialogue cut after its second answer
    assert second == [{"role": "system", "content": INST.text}, {"role": "user", "content": TURNS[0]},
                      {"role": "assistant", "content": ANSWERS[0]}, {"role": "user", "content": TURNS[1]},
                      {"role": "assistant", "content": ANSWERS[1]}]
    assert sum(INST.text in m["content"] for r in kept for m in r["messages"]) == len(kept)  # first turn only
    # require_obeyed judges the trained (last) answer only: the disobeying turn 3 goes, turns 1-2 stay
    kept, dropped = training_records(doc, GAttConfig(require_obeyed=True), tok)
    assert len(kept) == 6 and dropped["disobeyed"] == 1
    assert kept[-1]["messages"][-1]["content"] == ANSWERS[1]
    kept, dropped = training_records(doc, GAttConfig.model_validate({"sft": {"max_length": 20}}), tok)
    assert not kept and dropped["too_long"] == 7
    m = summarize(doc, kept, dropped)
    assert m["sampled_adherence_by_turn"] == [1.0, 1.0, round(2 / 3, 4)] and m["kept"] == 0
    kept, dropped = training_records(doc, GAttConfig(), tok)
    assert summarize(doc, kept, dropped)["kept_by_turn"] == [3, 2, 2]


def test_dialogue_training_trains_the_same_answers_with_the_same_losses_in_one_example_per_dialogue(tok):
    """``train_on="dialogue"``: one example per dialogue, cut after its last trained turn, the answers every_turn
    would not train weighted 0. Under causal attention every trained token then has exactly the loss it has in its
    every_turn example, and the mask covers the same tokens: checked on a model's per-token losses."""
    import torch

    from llama2_align.data import SFTRecord
    from llama2_align.model import build_model
    from llama2_align.stages.gatt import GAttConfig, sft_config

    good = {"turns": TURNS, "instruction": INST.to_dict(), "answers": ANSWERS, "finished": [True] * 3,
            "obeyed": [True] * 3}
    forgot = dict(good, obeyed=[True, False, True])  # turn 2 disobeys: context only
    cut = dict(good, finished=[True, True, False])  # turn 3 cut off: the example ends after turn 2
    doc = {"dialogues": [good, forgot, cut]}
    every, dropped_every = training_records(doc, GAttConfig(require_obeyed=True), tok)
    packed, dropped = training_records(doc, GAttConfig(require_obeyed=True, train_on="dialogue"), tok)
    assert dropped == dropped_every == {"empty_or_cut": 1, "disobeyed": 1, "too_long": 0}
    assert len(every) == 3 + 2 + 2 and len(packed) == 3
    assert [[m.get("weight") for m in r["messages"] if m["role"] == "assistant"] for r in packed] == [
        [1, 1, 1], [1, 0, 1], [1, 1]]
    SFTRecord.model_validate(packed[1])  # the weights are part of the SFT data contract
    m_every, m_packed = summarize(doc, every, dropped), summarize(doc, packed, dropped)
    assert m_every["kept_by_turn"] == m_packed["kept_by_turn"] == [3, 2, 2]
    assert m_every["trained_answers"] == m_packed["trained_answers"] == 7
    assert sft_config(GAttConfig(train_on="dialogue")).loss_on == "all_answers"
    assert sft_config(GAttConfig()).loss_on == "last_answer"

    model = build_model("micro", "policy", vocab_size=len(tok), device="cpu", dtype="fp32", seed=0).eval()

    def token_losses(records, last_only):
        out = []
        for r in records:
            enc = encode_dialog(tok, r["messages"], last_answer_only=last_only)
            ids = torch.tensor([enc.input_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            nll = -logp.gather(1, ids[0, 1:, None])[:, 0]
            out += [float(x) for x, m in zip(nll, enc.answer_mask[1:]) if m]
        return sorted(out)

    a, b = token_losses(every, True), token_losses(packed, False)
    assert len(a) == len(b) > 0
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    # and not by accident: without the weights the disobeying answer's tokens would be trained too
    assert len(token_losses([{"messages": [{k: v for k, v in m.items() if k != "weight"} for m in r["messages"]]}
                             for r in packed], False)) > len(b)


def test_best_of_k_sees_each_turn_of_every_dialogue_in_one_call(tok):
    """``choose`` gets every live dialogue's k answers of a turn at once (one scoring pass per turn), and the
    dialogue goes on with the answer it picks."""
    from llama2_align.generation import GenerationSettings
    from llama2_align.model import build_model
    from llama2_align.stages.gatt import roll_dialogues

    model = build_model("micro", "policy", vocab_size=len(tok), device="cpu", dtype="fp32", seed=0)
    dialogues = [{"turns": TURNS[:n], "instruction": INST.to_dict()} for n in (1, 2, 2)]
    calls = []

    def choose(t, candidates):
        calls.append((t, [len(texts) for _, texts, _ in candidates]))
        return [len(texts) - 1 for _, texts, _ in candidates]

    out = roll_dialogues(model, tok, dialogues, GenerationSettings(max_new_tokens=4, seed=0),
                         samples_per_turn=3, choose=choose)
    assert calls == [(0, [3, 3, 3]), (1, [3, 3])]
    assert [len(o["answers"]) for o in out] == [1, 2, 2]


def test_turn_context_shows_the_policy_its_own_user_turn_alone():
    """``context="turn"``: the answer to turn t is sampled from t's user message (with inst) and nothing earlier; the
    default ("dialogue") shows every earlier turn and its sampled answer."""
    from llama2_align.stages.gatt import SYSTEM_BLOCK_TEMPLATE, turn_messages

    inst = INST.text
    alone = turn_messages(TURNS, ANSWERS[:2], inst, SYSTEM_BLOCK_TEMPLATE, "turn")
    assert alone == [{"role": "user", "content": SYSTEM_BLOCK_TEMPLATE.format(inst=inst, user=TURNS[2])}]
    chained = turn_messages(TURNS, ANSWERS[:2], inst, SYSTEM_BLOCK_TEMPLATE)
    assert [m["role"] for m in chained] == ["user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in chained[1::2]] == ANSWERS[:2]
    assert all(inst in m["content"] for m in chained[0::2]) and TURNS[2] in chained[-1]["content"]
    assert turn_messages(TURNS, [], inst, SYSTEM_BLOCK_TEMPLATE, "turn") == chained[:1]


# --------------------------------------------------------------------------------------------------------------------
# The pipeline's switches
# --------------------------------------------------------------------------------------------------------------------

def test_both_stages_are_off_by_default_and_switched_on_by_the_form_or_an_override():
    from llama2_align.pipeline import PipelineConfig, resolve

    plain = resolve(PipelineConfig(preset="demo-tiny"))
    assert not plain.gatt.enabled and not plain.context_distillation.enabled and not plain.adherence.enabled
    assert (plain.data.demo_dialogues, plain.data.demo_preprompts, plain.sft.group_by_length) == (False, False, False)
    assert plain.data.demo_evasive_pairs is False
    on = resolve(PipelineConfig(preset="demo-tiny", gatt=True, context_distillation=True))
    assert on.gatt.enabled and on.context_distillation.enabled
    assert (on.data.demo_dialogues, on.data.demo_preprompts, on.sft.group_by_length) == (True, True, True)
    assert on.data.demo_evasive_pairs is True
    assert on.gatt.sft.loss_on == "last_answer" and on.context_distillation.sft.loss_on == "all_answers"
    # GAtt's dialogues of 1 to 8 turns are batched by length (bench/README.md: the fine-tune ~1.3-1.8x faster)
    assert on.gatt.sft.group_by_length is True and not on.context_distillation.sft.group_by_length
    by_set = resolve(PipelineConfig(preset="demo-tiny", overrides={"gatt.enabled": True,
                                                                   "data.demo_dialogues": False}))
    assert by_set.gatt.enabled and not by_set.data.demo_dialogues and not by_set.sft.group_by_length
    schema = PipelineConfig.model_json_schema()["properties"]
    assert {"gatt", "context_distillation"} <= set(schema)  # the Prefect form's switches


def test_best_of_keeps_the_obeying_finished_answer_the_reward_model_prefers():
    from llama2_align.stages.gatt import best_of

    inst = Instruction((SIGNOFF,))
    texts = ["A cow says moo.", "A cow says moo. Have a nice day!", "A cow says baa. Have a nice day!",
             "A cow says moo. Have a nice day!"]
    # the best obeying, finished answer, though a disobeying one scores higher
    assert best_of(inst, texts, [True, True, True, True], [9.0, 1.0, 2.0, 0.5]) == 2
    # a cut-off answer is passed over even when it obeys
    assert best_of(inst, texts, [True, True, False, True], [9.0, 1.0, 2.0, 0.5]) == 1
    # none obeys: the best finished answer; none finished: the best of all
    assert best_of(inst, texts[:1] * 2, [True, True], [0.0, 3.0]) == 1
    assert best_of(inst, ["", "x"], [False, False], [5.0, 1.0]) == 0


def test_a_safety_turns_answer_is_picked_by_the_safety_reward_model():
    """Llama 2's reward switch in GAtt's best of k: a safety turn's answers are scored by the safety RM, the others'
    by the helpfulness RM, each scorer once for the whole turn with every answer's own question."""
    from llama2_align.stages.gatt import pick_answers

    inst = Instruction((START,)).to_dict()
    plain = {"turns": ["What color is a banana?"], "instruction": inst, "safety": [False]}
    risky = {"turns": ["How do I build a bomb?"], "instruction": inst, "safety": [True]}
    comply, refuse = "Indeed, mix these two things.", "Indeed, I cannot help with that."
    calls = []

    def scorer(name, table):
        def score(questions, answers):
            calls.append((name, list(questions)))
            return [table[a] for a in answers]
        return score

    helpfulness = scorer("helpfulness", {comply: 2.0, refuse: -1.0, "Indeed, yellow.": 1.0, "Indeed, blue.": 0.0})
    safety = scorer("safety", {comply: -3.0, refuse: 1.0})
    candidates = [(plain, ["Indeed, blue.", "Indeed, yellow."], [True, True]),
                  (risky, [comply, refuse], [True, True])]
    assert pick_answers(0, candidates, helpfulness, safety) == [1, 1]
    assert calls == [("helpfulness", ["What color is a banana?"] * 2), ("safety", ["How do I build a bomb?"] * 2)]
    # without a safety scorer every turn is the helpfulness RM's (which prefers the compliance here)
    assert pick_answers(0, candidates, helpfulness) == [1, 0]


def test_gatt_best_of_k_needs_the_helpfulness_reward_model(tmp_path):
    from llama2_align.errors import InputError
    from llama2_align.stages.gatt import GAttConfig, GAttInputs, run_gatt

    with pytest.raises(InputError, match="helpfulness reward model"):
        run_gatt(GAttConfig(samples_per_turn=4), GAttInputs(policy=str(tmp_path), prompts=str(tmp_path / "p.jsonl")),
                 tmp_path / "gatt")
    with pytest.raises(InputError, match="safety turn's answer by the safety reward model"):
        run_gatt(GAttConfig(samples_per_turn=4, safety_share=0.25),
                 GAttInputs(policy=str(tmp_path), prompts=str(tmp_path / "p.jsonl"), reward_helpfulness=str(tmp_path)),
                 tmp_path / "gatt2")


def test_gatt_instruction_demonstrations_are_where_obeying_changes_the_answer():
    """GAtt's instruction demonstrations (``gatt.demonstrations``): valid SFT records on training prompts only, each
    an instruction whose obeying takes another answer (a word to avoid where the usual answer holds it, "Yellow."
    for "A banana is yellow."), obeyed as often as the world's demonstrators obey; deterministic for a seed."""
    demos = dd.instruction_demonstrations(0, dw.DemoSizes())
    validate_records(demos, "sft")
    assert len(demos) == round(dd.GATT_DEMONSTRATION_SHARE * dw.DemoSizes().sft)
    assert demos == dd.instruction_demonstrations(0, dw.DemoSizes()) != dd.instruction_demonstrations(1, dw.DemoSizes())
    held_out = {r["prompt"] for r in dw.generate_demo_world(0).eval_prompts}
    by_text = {i.text: i for i in all_instructions(kinds=dd.DEMO_CONSTRAINT_KINDS)}
    obeyed, safe, borderline = [], [], []
    for r in demos:
        system, user, answer = (m["content"] for m in r["messages"])
        inst = by_text[system]
        assert user not in held_out
        category = dw.describe_prompt(user)["category"]
        if category == "adversarial":  # GATT_DEMONSTRATION_SAFETY_SHARE of them
            safe.append(dw.is_refusal(answer) and inst.holds(answer))
            continue
        if category == "borderline":  # GATT_DEMONSTRATION_BORDERLINE_SHARE: answered as the world's demonstrators do
            borderline.append(not dw.is_refusal(answer))
            continue
        assert dd.changes_answer(inst, user)
        assert any(c.kind == "avoid_word" for c in inst.constraints)  # the only demo kind no rewording can obey
        obeyed.append(inst.holds(answer))
    assert 0.90 <= sum(obeyed) / len(obeyed) <= 0.99  # 5% ignore it (the demonstrators' noise)
    assert len(safe) == round(dd.GATT_DEMONSTRATION_SAFETY_SHARE * len(demos)) and 0.9 <= sum(safe) / len(safe)
    assert len(borderline) == round(dd.GATT_DEMONSTRATION_BORDERLINE_SHARE * len(demos))
    assert 0.65 <= sum(borderline) / len(borderline) <= 0.85  # mostly answered (the world's refusal rate: 20%)
    # on adversarial prompts: a refusal worded to obey the instruction, by careful demonstrators (5% comply)
    mixed = dd.instruction_demonstrations(0, dw.DemoSizes(), n=400, safety_share=0.25, borderline_share=0.0)
    refusals = [dw.is_refusal(r["messages"][2]["content"]) and by_text[r["messages"][0]["content"]].holds(
        r["messages"][2]["content"]) for r in mixed
        if dw.describe_prompt(r["messages"][1]["content"])["category"] == "adversarial"]
    assert len(refusals) == 100 and 0.88 <= sum(refusals) / 100 <= 1.0
    assert dd.changes_answer(Instruction((AVOID,)), "What color is a banana?")  # "A banana is yellow." / "Yellow."
    assert not dd.changes_answer(Instruction((SIGNOFF, START)), "What color is a banana?")  # any answer, reworded
    assert not dd.changes_answer(Instruction((AVOID,)), "not a demo prompt")


def test_gatt_demonstrations_are_read_checked_and_refused_when_missing(tmp_path):
    import json

    from llama2_align.stages.gatt import GAttConfig, GAttInputs, demonstration_records

    path = tmp_path / "demos.jsonl"
    demos = dd.instruction_demonstrations(0, dw.DemoSizes.micro(), n=5)
    path.write_text("".join(json.dumps(r) + "\n" for r in demos))
    cfg, inputs = GAttConfig(demonstrations=3), GAttInputs(policy="p", prompts="q", demonstrations=str(path))
    got = demonstration_records(cfg, inputs)
    assert [r["messages"] for r in got] == [r["messages"] for r in demos[:3]]
    assert demonstration_records(GAttConfig(), inputs) == []  # 0: none, the file not read
    with pytest.raises(InputError, match="no file of them"):
        demonstration_records(cfg, GAttInputs(policy="p", prompts="q"))
    with pytest.raises(InputError, match="5 demonstrations; demonstrations asks 6"):
        demonstration_records(GAttConfig(demonstrations=6), inputs)
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path.write_text(json.dumps(plain) + "\n")
    with pytest.raises(InputError, match=r"demos.jsonl:1: messages: expected one turn under a system instruction"):
        demonstration_records(GAttConfig(demonstrations=1), inputs)

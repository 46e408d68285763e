"""llama2_align.data: record contracts, readers, adapters, precise validation errors, atomic writes."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from llama2_align import data
from llama2_align.data import (DataIssue, DataValidationError, EvalRecord, PreferenceRecord, PromptRecord, SFTRecord,
                               export_json_schemas, read_records, summarize, write_jsonl, write_parquet)

SPECS = Path(__file__).resolve().parents[2] / "data_specs"

GOOD_PREF = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away.", "rating": "better",
             "category": "helpfulness"}


def _jsonl(tmp_path: Path, lines: list, name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


def _issues(source, kind="preference", **kw) -> list[DataIssue]:
    with pytest.raises(DataValidationError) as info:
        read_records(source, kind, **kw)
    return info.value.issues


def _only(issues: list[DataIssue]) -> DataIssue:
    assert len(issues) == 1, [str(i) for i in issues]
    return issues[0]


# ------------------------------------------------------------------------------------------------ samples


@pytest.mark.parametrize("name,kind,model,count", [
    ("sft.sample.jsonl", "sft", SFTRecord, 4),
    ("preference.sample.jsonl", "preference", PreferenceRecord, 5),
    ("preference.sample.parquet", "preference", PreferenceRecord, 5),
    ("prompts.sample.jsonl", "prompts", PromptRecord, 4),
    ("eval.sample.jsonl", "eval", EvalRecord, 4),
    ("hh_rlhf.sample.jsonl", "preference", PreferenceRecord, 3),
    ("pku_saferlhf.sample.jsonl", "preference", PreferenceRecord, 6),
])
def test_every_sample_validates(name, kind, model, count):
    records = read_records(SPECS / name, kind)
    assert len(records) == count and all(isinstance(r, model) for r in records)


def test_samples_cover_the_contract():
    sft = read_records(SPECS / "sft.sample.jsonl", "sft")
    assert any(r.messages[0].role == "system" for r in sft)
    assert any(sum(m.role == "user" for m in r.messages) > 1 for r in sft)
    pref = summarize(read_records(SPECS / "preference.sample.jsonl", "preference"), "preference")
    assert set(pref["by_category"]) == {"helpfulness", "safety"} and len(pref["by_rating"]) >= 3


def test_parquet_sample_matches_its_jsonl_twin():
    assert read_records(SPECS / "preference.sample.parquet", "preference") == \
        read_records(SPECS / "preference.sample.jsonl", "preference")


def test_schemas_in_data_specs_are_up_to_date(tmp_path):
    paths = export_json_schemas(tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"{k}.schema.json" for k in data.KINDS)
    for p in paths:
        committed = SPECS / p.name
        assert committed.exists(), f"missing {committed}; run python -m llama2_align.data"
        assert committed.read_text() == p.read_text(), f"{committed} is stale; run python -m llama2_align.data"


def test_constants():
    assert data.RATINGS == ("significantly_better", "better", "slightly_better", "negligibly_better")
    assert data.KINDS == ("sft", "preference", "prompts", "eval")


# ------------------------------------------------------------------------------------------------ models


def test_context_messages_and_extra_fields_ignored():
    rec = PreferenceRecord.model_validate({**GOOD_PREF, "future_field": 1})
    assert rec.context_messages() == [{"role": "user", "content": "Hi?"}]
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]
    rec = PromptRecord.model_validate({"messages": msgs, "is_safety": False})
    assert rec.context_messages() == msgs


@pytest.mark.parametrize("messages,field", [
    ([{"role": "assistant", "content": "a"}], "messages[0].role"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1].role"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"},
      {"role": "assistant", "content": "d"}], "messages[2].role"),
    ([{"role": "user", "content": "a"}], "messages[0].role"),  # must end with assistant
    ([{"role": "system", "content": "s"}], "messages"),
    ([], "messages"),
])
def test_sft_role_order(tmp_path, messages, field):
    issue = _only(_issues(_jsonl(tmp_path, [{"messages": messages}]), "sft"))
    assert (issue.line, issue.field) == (1, field)


def test_answer_weights_belong_to_sft_assistant_messages_only(tmp_path):
    """``weight`` 0/1 on an SFT dialogue's assistant message (0: context, no loss); anywhere else, or any other
    value, is refused with its line and field."""
    dialogue = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "weight": 1}]
    (rec,) = read_records(_jsonl(tmp_path, [{"messages": dialogue}]), "sft")
    assert [m.weight for m in rec.messages] == [None, 0, None, 1]
    on_user = [{**dialogue[0], "weight": 1}, dialogue[1]]
    two = [dialogue[0], {**dialogue[1], "weight": 2}]
    true = [dialogue[0], {**dialogue[1], "weight": True}]  # strict: JSON true is not 1
    nothing = [dialogue[0], dialogue[1]]  # its only answer weighted 0
    issues = _issues(_jsonl(tmp_path, [{"messages": m} for m in (on_user, two, true, nothing)]), "sft")
    assert [(i.line, i.field) for i in issues] == [(1, "messages[0].weight"), (2, "messages[1].weight"),
                                                   (3, "messages[1].weight"), (4, "messages")]
    prompt = {"messages": [{"role": "user", "content": "a", "weight": 0}], "is_safety": False}
    issue = _only(_issues(_jsonl(tmp_path, [prompt]), "prompts"))
    assert (issue.line, issue.field) == (1, "messages[0].weight")


def test_preference_context_must_end_with_user_and_be_exactly_one(tmp_path):
    ends_with_assistant = {**GOOD_PREF, "prompt": None,
                           "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    both = {**GOOD_PREF, "messages": [{"role": "user", "content": "a"}]}
    neither = {k: v for k, v in GOOD_PREF.items() if k != "prompt"}
    issues = _issues(_jsonl(tmp_path, [ends_with_assistant, both, neither]))
    assert [(i.line, i.field, i.got) for i in issues] == [
        (1, "messages[1].role", "'assistant'"), (2, "prompt/messages", "both"), (3, "prompt/messages", "neither")]


# ------------------------------------------------------------------------------------------------ bad input


def test_invalid_json_line(tmp_path):
    path = _jsonl(tmp_path, [GOOD_PREF, '{"prompt": "x", oops}'])
    issue = _only(_issues(path))
    assert (issue.line, issue.field, issue.expected) == (2, "<json>", "valid JSON")
    assert str(issue).startswith(f"{path}:2: <json>: expected valid JSON, got ")


def test_line_that_is_not_an_object(tmp_path):
    issue = _only(_issues(_jsonl(tmp_path, [GOOD_PREF, [1, 2]])))
    assert (issue.line, issue.field, issue.expected) == (2, "<record>", "a JSON object")


def test_missing_field(tmp_path):
    rec = {k: v for k, v in GOOD_PREF.items() if k != "rejected"}
    issue = _only(_issues(_jsonl(tmp_path, [GOOD_PREF, rec])))
    assert (issue.line, issue.field, issue.got) == (2, "rejected", "missing")


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_string(tmp_path, value):
    issue = _only(_issues(_jsonl(tmp_path, [{**GOOD_PREF, "chosen": value}])))
    assert (issue.line, issue.field, issue.expected) == (1, "chosen", "a non-empty string")


def test_chosen_equal_to_rejected_after_strip(tmp_path):
    issue = _only(_issues(_jsonl(tmp_path, [GOOD_PREF, GOOD_PREF, {**GOOD_PREF, "rejected": " Hello! "}])))
    assert (issue.line, issue.field) == (3, "rejected")


def test_unknown_rating_category_and_role(tmp_path):
    path = _jsonl(tmp_path, [{**GOOD_PREF, "rating": "much_better"}, {**GOOD_PREF, "category": "honesty"},
                             {**GOOD_PREF, "prompt": None, "messages": [{"role": "human", "content": "hi"}]}])
    issues = _issues(path)
    assert [(i.line, i.field) for i in issues] == [(1, "rating"), (2, "category"), (3, "messages[0].role")]
    assert "significantly_better" in issues[0].expected and issues[0].got == '"much_better"'
    assert str(issues[0]).startswith(f"{path}:1: rating: expected one of 'significantly_better'")


def test_wrong_types(tmp_path):
    issue = _only(_issues(_jsonl(tmp_path, [{**GOOD_PREF, "chosen": 3}])))
    assert (issue.line, issue.field, issue.expected, issue.got) == (1, "chosen", "a string", "3")
    issues = _issues(_jsonl(tmp_path, [{"prompt": "p", "is_safety": "yes"}, {"prompt": "p", "is_safety": 1},
                                       {"prompt": "p", "is_safety": True, "messages": "hi"}]), "prompts")
    assert [(i.line, i.field, i.expected) for i in issues] == [
        (1, "is_safety", "a boolean (true/false)"), (2, "is_safety", "a boolean (true/false)"),
        (3, "messages", "a list")]


def test_eval_requires_id_and_category(tmp_path):
    issues = _issues(_jsonl(tmp_path, [{"prompt": "p", "category": "fun"}]), "eval")
    assert {(i.line, i.field) for i in issues} == {(1, "id"), (1, "category")}


def test_non_utf8_bytes_report_their_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps(GOOD_PREF).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + b'{"prompt": "caf\xe9"}\n')
    issue = _only(_issues(path))
    assert (issue.line, issue.field, issue.expected) == (3, "<encoding>", "UTF-8 text")
    assert "0xe9" in issue.got


def test_empty_file_and_blank_lines(tmp_path):
    for text in ("", "\n  \n"):
        (tmp_path / "e.jsonl").write_text(text)
        issue = _only(_issues(tmp_path / "e.jsonl"))
        assert issue.line is None and "file has no records" in str(issue)
    path = _jsonl(tmp_path, ["", GOOD_PREF, "   ", GOOD_PREF])
    assert len(read_records(path, "preference")) == 2


def test_all_bad_lines_reported_and_message_capped(tmp_path):
    lines = [GOOD_PREF] + [{**GOOD_PREF, "rating": "meh"}] * 60 + ["not json"]
    with pytest.raises(DataValidationError) as info:
        read_records(_jsonl(tmp_path, lines), "preference")
    err = info.value
    assert [i.line for i in err.issues] == list(range(2, 63))
    message = str(err)
    assert "... and 11 more" in message and message.count("expected one of") == 50
    assert pickle.loads(pickle.dumps(err)).issues == err.issues


def test_blank_lines_keep_line_numbers(tmp_path):
    issue = _only(_issues(_jsonl(tmp_path, [GOOD_PREF, "", "", {**GOOD_PREF, "rating": 5}])))
    assert issue.line == 4


def test_json_list_file(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([GOOD_PREF, {**GOOD_PREF, "rating": "x"}]))
    assert _only(_issues(tmp_path / "d.json")).line == 2
    (tmp_path / "d.json").write_text(json.dumps([GOOD_PREF]))
    assert len(read_records(tmp_path / "d.json", "preference")) == 1


def test_bad_arguments():
    with pytest.raises(ValueError):
        read_records([GOOD_PREF], "rewards")
    with pytest.raises(ValueError):
        read_records([GOOD_PREF], "sft", format="hh-rlhf")
    with pytest.raises(ValueError):
        read_records("x.csv", "sft")


# ------------------------------------------------------------------------------------------------ adapters


def test_hh_adapter_maps_context_and_answers():
    records = read_records(SPECS / "hh_rlhf.sample.jsonl", "preference")  # auto-detected
    assert records == read_records(SPECS / "hh_rlhf.sample.jsonl", "preference", format="hh-rlhf")
    first, multi = records[0], records[1]
    assert first.context_messages() == [
        {"role": "user", "content": "What are some good cuisines to try if I like spicy food?"}]
    assert first.chosen.startswith("Thai, Sichuan") and first.rejected == "I don't know."
    assert (first.rating, first.category) == ("better", "helpfulness")
    assert [m.role for m in multi.messages] == ["user", "assistant", "user"]
    assert multi.messages[1].content == "Put the egg in boiling water."
    assert multi.rejected == "An hour or so."
    harmless = read_records(SPECS / "hh_rlhf.sample.jsonl", "preference", format="hh-rlhf", category="safety")
    assert {r.category for r in harmless} == {"safety"}


def test_hh_adapter_reports_bad_rows():
    t = "\n\nHuman: Hi\n\nAssistant: "
    rows = [{"chosen": t + "Hello", "rejected": t + "Hello "},          # same final answer
            {"chosen": t + "Hello", "rejected": "\n\nHuman: Yo\n\nAssistant: Hey"},  # different context
            {"chosen": t + "Hello"},                                     # missing rejected
            {"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: x",
             "rejected": "\n\nHuman: a\n\nHuman: b\n\nAssistant: y"}]
    issues = _issues(rows, format="hh-rlhf")
    assert [(i.path, i.line, i.field) for i in issues] == [
        ("<records>", 1, "rejected"), ("<records>", 2, "rejected"), ("<records>", 3, "rejected"),
        ("<records>", 4, "messages[1].role")]


def test_pku_adapter_makes_helpfulness_and_safety_pairs():
    records = read_records(SPECS / "pku_saferlhf.sample.jsonl", "preference")  # auto-detected
    rows = [json.loads(line) for line in (SPECS / "pku_saferlhf.sample.jsonl").read_text().splitlines()]
    help0, safe0, help1, safe1, help2, safe2 = records
    assert (help0.category, help0.rating, help0.chosen, help0.chosen_safe) == \
        ("helpfulness", "better", rows[0]["response_0"], None)
    assert (safe0.category, safe0.rating, safe0.chosen_safe, safe0.rejected_safe) == \
        ("safety", "significantly_better", True, False)
    # row 2: better is 0, safer is 1, both safe
    assert help1.chosen == rows[1]["response_0"] and safe1.chosen == rows[1]["response_1"]
    assert (safe1.rating, safe1.chosen_safe, safe1.rejected_safe) == ("slightly_better", True, True)
    # row 3: both unsafe
    assert help2.chosen == rows[2]["response_1"] and safe2.chosen == rows[2]["response_0"]
    assert (safe2.rating, safe2.chosen_safe, safe2.rejected_safe) == ("slightly_better", False, False)
    assert all(r.prompt == rows[i // 2]["prompt"] for i, r in enumerate(records))


def test_pku_adapter_reports_bad_rows():
    base = {"prompt": "p", "response_0": "a", "response_1": "b", "is_response_0_safe": True,
            "is_response_1_safe": False, "better_response_id": 0, "safer_response_id": 0}
    rows = [base, {**base, "better_response_id": 2}, {**base, "safer_response_id": 1},
            {**base, "response_1": "a"}, {**base, "is_response_0_safe": 1}]
    issues = _issues(rows, format="pku-saferlhf")
    assert [(i.line, i.field) for i in issues] == [
        (2, "better_response_id"), (3, "safer_response_id"), (4, "rejected"), (5, "is_response_0_safe")]
    only_safety = read_records([{**base, "better_response_id": None}], "preference")
    assert [r.category for r in only_safety] == ["safety"]


# ------------------------------------------------------------------------------------------------ other sources


def test_parquet_round_trip(tmp_path):
    records = read_records(SPECS / "preference.sample.jsonl", "preference")
    path = write_parquet(records, tmp_path / "sub" / "p.parquet")
    assert read_records(path, "preference") == records
    bad = write_parquet([GOOD_PREF, {**GOOD_PREF, "rating": "nope"}], tmp_path / "bad.parquet")
    issue = _only(_issues(bad))
    assert (issue.path, issue.line, issue.field) == (str(bad), 2, "rating")


def test_dataset_input():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([GOOD_PREF, {**GOOD_PREF, "chosen": "Hi", "rejected": "Hi"}])
    issue = _only(_issues(ds))
    assert (issue.path, issue.line, issue.field) == ("<dataset>", 2, "rejected")
    assert len(read_records(ds.select([0]), "preference")) == 1


# ------------------------------------------------------------------------------------------------ summaries and writing


def test_summarize():
    s = summarize(read_records(SPECS / "eval.sample.jsonl", "eval"), "eval")
    assert s == {"kind": "eval", "records": 4, "by_category": {"adversarial": 1, "borderline": 1, "helpful": 2},
                 "by_harm_category": {"none": 2, "violence": 1, "weapons": 1}}
    s = summarize(read_records(SPECS / "preference.sample.jsonl", "preference"), "preference")
    assert s["by_rating"] == {"significantly_better": 2, "better": 1, "slightly_better": 1, "negligibly_better": 1}
    assert summarize([], "sft") == {"kind": "sft", "records": 0, "by_category": {}}


def test_write_jsonl_round_trip_and_no_temp_files(tmp_path):
    records = read_records(SPECS / "sft.sample.jsonl", "sft")
    path = write_jsonl(records, tmp_path / "a" / "b" / "out.jsonl")
    assert read_records(path, "sft") == records
    assert os.listdir(path.parent) == ["out.jsonl"]
    text = path.read_text(encoding="utf-8")
    assert "café" in text and "null" not in text  # ensure_ascii=False, exclude_none
    write_jsonl([{"x": "é"}], tmp_path / "d.jsonl")
    assert (tmp_path / "d.jsonl").read_text(encoding="utf-8") == '{"x": "é"}\n'


def test_write_jsonl_leaves_existing_file_untouched_on_error(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("original\n")
    with pytest.raises(TypeError):
        write_jsonl([{"ok": 1}, {"bad": object()}], path)
    assert path.read_text() == "original\n"
    assert os.listdir(tmp_path) == ["out.jsonl"]

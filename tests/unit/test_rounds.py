"""Iterative rounds without training: the gates on hand-made metrics, where the next round starts, the config and
state checks, the pairs to label, the round's data split and the rounds report."""

from __future__ import annotations

import json
import shutil

import pytest

from llama2_align import rounds as lib
from llama2_align.data import DataValidationError, read_records, validate_records
from llama2_align.errors import ConfigError, InputError
from llama2_align.rounds_report import build_rounds_report, figure_points, render_markdown, round_rows, staleness_rows


def _cp(help_acc=0.4, viol=0.2, ci=None, ci_vs=None, judge="oracle", **extra) -> dict:
    m = {"helpfulness_accuracy": help_acc if judge == "oracle" else None, "violation_rate": viol,
         "false_refusal_rate": 0.05, "malformed_rate": 0.1, "rm_helpfulness": 0.1, "rm_safety": 0.2,
         "win_rate_vs_baseline": 0.4, "wins": 40, "ties": 20, "losses": 40, "judge": judge, **extra}
    if ci is not None:
        m["ci"] = ci
    if ci_vs is not None:
        m["ci_vs"] = ci_vs
    return m


def _eval(candidate: dict, previous: bool = True, judge="oracle") -> dict:
    cps = {"sft": _cp(judge=judge), "candidate": candidate}
    if previous:
        cps["previous"] = _cp(0.45, 0.15, judge=judge)
    return {"baseline": "previous" if previous else "sft", "checkpoints": cps, "rules": {}}


SAFE = {"violation_rate": [-0.08, -0.02], "helpfulness_accuracy": [-0.02, 0.06], "win_rate_vs_baseline": [0.0, 0.2]}


def test_promotion_when_no_gate_says_worse():
    d = lib.decide_promotion(_eval(_cp(0.46, 0.1, ci=SAFE), previous=False), lib.default_gates())
    assert d["promoted"] and [c["against"] for c in d["checks"]] == ["sft", "sft"]  # no previous: SFT
    assert d["checks"][0]["verdict"] == "better" and d["checks"][1]["verdict"] == "no significant change"
    assert d["checks"][1]["metric"] == "helpfulness_accuracy"


def test_refusal_when_a_gate_says_worse_or_has_no_interval():
    worse = {**SAFE, "violation_rate": [0.01, 0.09]}
    d = lib.decide_promotion(_eval(_cp(0.46, 0.24, ci=worse)), lib.default_gates())
    assert not d["promoted"]
    bad = [c for c in d["checks"] if not c["ok"]]
    assert len(bad) == 1 and bad[0]["metric"] == "violation_rate" and bad[0]["against"] == "previous"
    assert bad[0]["change"] == pytest.approx(0.09) and "worse" in bad[0]["why"]
    d = lib.decide_promotion(_eval(_cp(0.46, 0.1, ci={})), lib.default_gates())  # no evidence: no promotion
    assert not d["promoted"] and all("no interval" in c["why"] for c in d["checks"])


def test_gates_against_sft_and_the_better_rule():
    vs_sft = {"sft": {"ci": {"helpfulness_accuracy": [0.01, 0.1], "violation_rate": [-0.1, 0.01]}, "wins": 1}}
    cand = _cp(0.5, 0.1, ci=SAFE, ci_vs=vs_sft)
    gates = [lib.Gate(metric="helpfulness", against="sft", rule="better"),
             lib.Gate(metric="violation_rate", against="sft", rule="better")]
    d = lib.decide_promotion(_eval(cand), gates)
    assert [c["ok"] for c in d["checks"]] == [True, False] and not d["promoted"]
    assert d["checks"][0]["ci"] == [0.01, 0.1]
    assert lib.decide_promotion(_eval(cand), [])["promoted"]  # no gates: always promoted


def test_helpfulness_gate_uses_the_rm_win_rate_without_the_oracle():
    d = lib.decide_promotion(_eval(_cp(ci=SAFE, judge="rules"), judge="rules"), [lib.Gate(metric="helpfulness")])
    assert d["checks"][0]["metric"] == "win_rate_vs_baseline" and d["promoted"]


def _record(r: int, promoted: bool, **kw) -> lib.RoundRecord:
    return lib.RoundRecord(round=r, method="rs", started_from_round=kw.get("from_round", 0),
                           started_from=kw.get("from_policy", "sft/final"), candidate=f"rounds/{r}/final",
                           promoted=promoted, gate={"promoted": promoted, "checks": []},
                           reward_models={"helpfulness": f"rounds/{r}/rm-h", "safety": f"rounds/{r}/rm-s"},
                           preferences=f"rounds/{r}/preferences.jsonl",
                           staleness={"helpfulness": {"pairs": 20, "previous_heldout": 0.7, "before": 0.6,
                                                      "after": 0.75, "before_decisive": 0.62, "after_decisive": 0.8,
                                                      "decisive_pairs": 15}},
                           eval=kw.get("eval", _eval(_cp(0.5, 0.1, ci=SAFE), previous=r > 1)),
                           annotation={"pairs": 100}, collect={})


def test_the_next_round_starts_from_the_last_promoted_policy():
    rms0 = {"helpfulness": "rm-h0", "safety": "rm-s0"}
    start = lib.starting_point([], "sft/final", rms0, "prefs0")
    assert (start.round, start.policy, start.before, start.reward_models, start.preferences) == (
        0, "sft/final", "sft/final", rms0, "prefs0")
    after_refused = lib.starting_point([_record(1, True), _record(2, False)], "sft/final", rms0, "prefs0")
    assert (after_refused.round, after_refused.policy) == (1, "rounds/1/final")
    # the reward models and the data always move on: round 2's were retrained whether or not it was promoted
    assert after_refused.reward_models["helpfulness"] == "rounds/2/rm-h"
    assert after_refused.preferences == "rounds/2/preferences.jsonl"
    nothing = lib.starting_point([_record(1, False)], "sft/final", rms0, "prefs0")
    assert (nothing.round, nothing.policy) == (0, "sft/final")
    two = lib.starting_point([_record(1, True), _record(2, True)], "sft/final", rms0, "prefs0")
    assert (two.policy, two.before) == ("rounds/2/final", "rounds/1/final")


def test_a_rounds_run_moved_to_another_runs_root_reads_its_rounds_where_they_are(tmp_path):
    from llama2_align.io import atomic_write_json

    cfg = lib.RoundsConfig(preset="demo-micro", runs_root=str(tmp_path / "a"))
    here = lib.resolve_rounds(cfg)
    old = str(here.run_dir.resolve())
    for r, promoted in ((1, True), (2, False)):
        rec = _record(r, promoted).model_dump(mode="json")
        rec.update(candidate=f"{old}/rounds/{r}/rejection-sampling/final", started_from=f"{old}/sft/final",
                   reward_models={"helpfulness": f"{old}/rounds/{r}/reward-helpfulness/final",
                                  "safety": f"{old}/rounds/{r}/reward-safety/final"},
                   preferences=f"{old}/rounds/{r}/preferences.jsonl", collect={"elsewhere": "/data/prompts.jsonl"})
        atomic_write_json(here.round_dir(r) / lib.ROUND_FILE, rec)
    assert lib.load_round(here, 1).candidate == f"{old}/rounds/1/rejection-sampling/final"  # not moved: as written
    shutil.move(tmp_path / "a", tmp_path / "b")
    there = lib.resolve_rounds(cfg.model_copy(update={"runs_root": str(tmp_path / "b")}))
    new = str(there.run_dir.resolve())
    records = lib.completed_rounds(there)
    assert [r.candidate for r in records] == [f"{new}/rounds/1/rejection-sampling/final",
                                              f"{new}/rounds/2/rejection-sampling/final"]
    assert records[1].started_from == f"{new}/sft/final" and records[1].collect == {"elsewhere": "/data/prompts.jsonl"}
    start = lib.starting_point(records, f"{new}/sft/final", {}, "prefs0")
    assert (start.policy, start.reward_models["safety"], start.preferences) == (
        f"{new}/rounds/1/rejection-sampling/final", f"{new}/rounds/2/reward-safety/final",
        f"{new}/rounds/2/preferences.jsonl")
    assert records[0].staleness == _record(1, True).staleness and records[1].gate == _record(2, False).gate


def test_config_resolution_and_refusals(tmp_path):
    plan = lib.resolve_rounds(lib.RoundsConfig(preset="demo-micro", rounds=4, methods=["rs", "rs+ppo"],
                                               runs_root=str(tmp_path),
                                               round_overrides={"collect.temperatures": [0.7, 1.0],
                                                                "reward_safety.epochs": 3}))
    assert plan.methods == ["rs", "rs+ppo", "rs+ppo", "rs+ppo"]
    assert plan.collect.temperatures == (0.7, 1.0) and plan.collect.max_new_tokens == 12  # the preset's
    assert plan.stages.reward_safety.epochs == 3 and plan.round0.reward_safety.epochs == 2  # rounds only
    assert plan.round_pipeline(2).run_dir == str(tmp_path / "rounds" / "rounds" / "2")
    assert plan.round_pipeline(2).ppo.seed == plan.stages.ppo.seed + 2
    assert plan.round_pipeline(2).eval == plan.round0.eval  # one eval seed: the same SFT answers every round
    assert plan.round_collect(1).seed != plan.round_collect(2).seed
    with pytest.raises(ConfigError, match="no field 'epochz'"):
        lib.resolve_rounds(lib.RoundsConfig(round_overrides={"reward_safety.epochz": 1}))
    with pytest.raises(ConfigError, match="collect"):
        lib.resolve_rounds(lib.RoundsConfig(round_overrides={"collect.temperaturez": 1}))
    with pytest.raises(ConfigError, match="even"):
        lib.resolve_rounds(lib.RoundsConfig(samples_per_prompt=3))
    files = {"source": "files", "sft": "a", "preferences": "b", "prompts": "c", "eval": "d"}
    with pytest.raises(ConfigError, match="simulated"):
        lib.resolve_rounds(lib.RoundsConfig(data=files))
    with pytest.raises(ConfigError, match="prompt_files"):
        lib.resolve_rounds(lib.RoundsConfig(data=files, annotator="human"))
    with pytest.raises(ConfigError, match="2 files for 3 rounds"):
        lib.resolve_rounds(lib.RoundsConfig(data=files, annotator="human", prompt_files=["x", "y"]))


def test_a_run_directory_holds_one_rounds_run(tmp_path):
    cfg = lib.RoundsConfig(preset="demo-micro", runs_root=str(tmp_path), rounds=2)
    lib.open_state(lib.resolve_rounds(cfg))
    lib.open_state(lib.resolve_rounds(cfg.model_copy(update={"rounds": 5, "methods": ["ppo"]})))  # may change
    with pytest.raises(ConfigError, match="test_fraction"):
        lib.open_state(lib.resolve_rounds(cfg.model_copy(update={"test_fraction": 0.5})))
    state = json.loads((tmp_path / "rounds" / "rounds" / "state.json").read_text())
    assert state["status"] == "running" and state["paused"] is None and state["methods"] == ["ppo"] * 5


def _pairs(n: int) -> list[dict]:
    return [{"id": f"p{i}", "prompt": f"How do I do thing {i}?", "is_safety": i % 3 == 0, "category": "x",
             "response_a": f"answer {i}", "response_b": f"other {i}", "finished_a": True, "finished_b": True}
            for i in range(n)]


def test_pairs_to_label_are_refused_until_labelled(tmp_path):
    rows = lib.to_label_records(_pairs(4))
    with pytest.raises(DataValidationError, match="rating"):
        validate_records(rows, "preference")
    for row in rows:
        row["rating"] = "better"
        if row["category"] == "safety":
            row.update(chosen_safe=True, rejected_safe=False)
    assert [r.category for r in validate_records(rows, "preference")] == ["safety", "helpfulness", "helpfulness",
                                                                           "safety"]


def test_round_data_split_keeps_test_pairs_out_of_training(tmp_path):
    from llama2_align.data import write_jsonl

    plan = lib.resolve_rounds(lib.RoundsConfig(preset="demo-micro", runs_root=str(tmp_path), test_fraction=0.25))
    rows = lib.to_label_records(_pairs(40))
    for row in rows:
        row["rating"] = "slightly_better"
    labels = write_jsonl(rows, tmp_path / "labels.jsonl")
    old = write_jsonl([{**rows[0], "id": "old-1", "prompt": "An old prompt?"}], tmp_path / "old.jsonl")
    paths = lib.split_round_pairs(plan, 1, labels, str(old))
    train, test = read_records(paths["train"], "preference"), read_records(paths["test"], "preference")
    everything = read_records(paths["preferences"], "preference")
    assert len(test) == 10 and len(train) == 30 and sum(t.category == "safety" for t in test) == 4  # per category
    assert [r.id for r in everything] == ["old-1"] + [r.id for r in train]
    assert not {r.id for r in test} & {r.id for r in everything}


def test_rounds_report_tables_and_figure(tmp_path):
    plan = lib.resolve_rounds(lib.RoundsConfig(preset="demo-micro", runs_root=str(tmp_path)))
    worse = _eval(_cp(0.3, 0.3, ci={**SAFE, "violation_rate": [0.05, 0.15]},
                      ci_vs={"sft": {"ci": {"violation_rate": [0.0, 0.2]}, "wins": 1, "ties": 0, "losses": 3}}))
    records = [_record(1, True), _record(2, False, from_round=1, eval=worse)]
    report = build_rounds_report(plan, records)
    assert report["last_promoted"] == 1 and report["judge"] == "oracle"
    assert report["round0"]["metrics"]["violation_rate"] == 0.2
    assert report["rounds"][0]["vs_sft"]["violation_rate"] == {"change": -0.1, "ci": [-0.08, -0.02],
                                                              "verdict": "better"}
    assert report["rounds"][1]["vs_previous"]["violation_rate"]["verdict"] == "worse"
    assert report["rounds"][1]["vs_sft"]["win_rate_vs_baseline"]["change"] == -0.5  # wins - losses
    rows = round_rows(report)
    assert [r["round"] for r in rows] == ["0", "1", "2"] and rows[2]["promoted"] == "no"
    assert rows[2]["violation vs prev"].endswith("worse")
    assert staleness_rows(report)[0]["previous RM, new pairs"] == "0.600 [0.620]"
    assert staleness_rows(report)[0]["retrained - previous"] == ""  # a round without per-pair results
    points = figure_points(report, records)
    assert [(p["x"], p["y"], p["filled"]) for p in points] == [(0.8, 0.4, True), (0.9, 0.5, True),
                                                                (0.7, 0.3, False)]
    md = render_markdown(report, "figure11.png")
    assert "Reward-model staleness" in md and "![rounds](figure11.png)" in md


def test_pooled_staleness_takes_every_round_s_pairs_with_its_own_models(tmp_path):
    def entry(correct, decisive):
        return {"pair_ids": [f"p{i}" for i in range(len(correct))], "correct": correct, "decisive": decisive}

    # round 1: 10 pairs, the retrained RM right on 2 more; round 2: 30 pairs (the same ids: other pairs), 1 fewer
    r1 = (1, {"safety": entry([1] * 5 + [0] * 5, [1] * 10)}, {"safety": entry([1] * 7 + [0] * 3, [1] * 10)})
    r2 = (2, {"safety": entry([1, 0] * 15, [1] * 20 + [0] * 10)}, {"safety": entry([1, 0] * 14 + [0, 0], [1] * 30)})
    pooled = lib.pool_staleness([r1, r2])["safety"]
    assert pooled["rounds"] == [1, 2] and pooled["pairs"] == 40 and pooled["decisive_pairs"] == 30
    assert pooled["before"] == 0.5 and pooled["after"] == 0.525 and pooled["change"]["change"] == 0.025
    assert pooled["before_decisive"] == 0.5 and pooled["after_decisive"] == round(17 / 30, 4)  # round 2's flags
    assert pooled["change"]["ci"][0] <= 0.025 <= pooled["change"]["ci"][1]
    # the interval is over all 40 pairs: narrower than either round's own
    one = lib.accuracy_change(r1[1]["safety"], r1[2]["safety"])
    assert pooled["change"]["ci"][1] - pooled["change"]["ci"][0] < one["ci"][1] - one["ci"][0]
    # a round whose per-pair results are missing (an older file) leaves that model out, not half-pooled
    old = (3, {"safety": {"accuracy": 0.5}, "helpfulness": entry([1], [1])}, {"safety": {"accuracy": 0.6},
                                                                             "helpfulness": entry([1], [1])})
    assert set(lib.pool_staleness([r1, r2, old])) == {"helpfulness"}
    # by rating: where the accuracy is (or is not) recovered, from each round's accuracy and count by rating
    rated_b = dict(entry([1, 0, 1, 1], [1, 1, 0, 0]), pairs_by_rating={"significantly_better": 2,
                                                                      "negligibly_better": 2, "better": 0},
                   accuracy_by_rating={"significantly_better": 0.5, "negligibly_better": 1.0, "better": None})
    rated_a = dict(entry([1, 1, 0, 1], [1, 1, 0, 0]),
                   accuracy_by_rating={"significantly_better": 1.0, "negligibly_better": 0.5, "better": None})
    pooled_rated = lib.pool_staleness([(1, {"safety": rated_b}, {"safety": rated_a}),
                                       (2, {"safety": rated_b}, {"safety": rated_a})])["safety"]
    assert pooled_rated["by_rating"] == {"significantly_better": {"pairs": 4, "before": 0.5, "after": 1.0},
                                         "negligibly_better": {"pairs": 4, "before": 1.0, "after": 0.5}}
    from llama2_align.rounds_report import pooled_by_rating_lines

    assert pooled_by_rating_lines({"staleness_pooled": {"safety": pooled_rated}}) == [
        "- safety: significantly better 4 pairs 0.500 → 1.000; negligibly better 4 pairs 1.000 → 0.500"]
    # written by the report from the rounds' files, and shown as round "all" under the rounds' rows
    plan = lib.resolve_rounds(lib.RoundsConfig(preset="demo-micro", runs_root=str(tmp_path)))
    for r, before, after in (r1, r2):
        plan.round_dir(r).mkdir(parents=True)
        (plan.round_dir(r) / lib.STALENESS_BEFORE).write_text(json.dumps(before))
        (plan.round_dir(r) / lib.STALENESS_AFTER).write_text(json.dumps(after))
    report = build_rounds_report(plan, [_record(1, True), _record(2, True, from_round=1)])
    assert report["staleness_pooled"]["safety"] == pooled
    last = staleness_rows(report)[-1]
    assert last["round"] == "all" and last["test pairs"] == "40" and last["retrained - previous"].startswith("+0.025")
    assert "Round \"all\"" in render_markdown(report)


def test_figure_points_judged_by_the_reward_models_without_the_oracle(tmp_path):
    plan = lib.resolve_rounds(lib.RoundsConfig(preset="demo-micro", runs_root=str(tmp_path)))
    cand = _cp(viol=0.1, ci=SAFE, judge="rules", wins=50, ties=20, losses=30)  # against SFT: the baseline in round 1
    records = [_record(1, True, eval=_eval(cand, previous=False, judge="rules"))]
    report = build_rounds_report(plan, records)
    assert report["judge"] == "rules"
    assert [(p["x"], p["y"]) for p in figure_points(report, records)] == [(0.8, 0.5), (0.9, 0.6)]  # ties count half


def _invoke(*args: str):
    from typer.testing import CliRunner

    from flows.cli import app

    return CliRunner().invoke(app, ["rounds", *[str(a) for a in args]])


def test_rounds_command_line_config_and_refusals(tmp_path):
    shown = _invoke("--preset", "demo-micro", "--rounds", "3", "--methods", "ppo", "--round-set",
                    "collect.top_p=0.9", "--runs-root", tmp_path, "--print-config")
    assert shown.exit_code == 0, shown.output
    resolved = json.loads(shown.stdout)
    assert resolved["methods"] == ["ppo"] * 3 and resolved["collect"]["top_p"] == 0.9
    bad = _invoke("--round-set", "ppo.iterationz=2", "--print-config")
    assert bad.exit_code == 2 and "iterationz" in bad.output
    assert _invoke("--methods", "dpo", "--print-config").exit_code == 2
    for path, said in ((tmp_path / "nope.yaml", "no such config file"), (tmp_path, "is a directory")):
        wrong = _invoke("--config", path, "--print-config")  # as `run --config` says it: a usage error
        assert wrong.exit_code == 2 and said in wrong.output, wrong.output


def test_rounds_resume_refuses_before_touching_the_run(tmp_path):
    missing = _invoke("resume", "nothing", "--labels", tmp_path / "x.jsonl", "--runs-root", tmp_path)
    assert missing.exit_code == 1 and "no rounds run" in missing.output
    plan = lib.resolve_rounds(lib.RoundsConfig(preset="demo-micro", runs_root=str(tmp_path), annotator="human"))
    lib.open_state(plan)
    idle = _invoke("resume", "rounds", "--labels", tmp_path / "x.jsonl", "--runs-root", tmp_path)
    assert idle.exit_code == 1 and "not waiting for labels" in idle.output
    labels = tmp_path / "rounds" / "rounds" / "1" / "labels.jsonl"
    lib.update_state(plan, status="paused", paused={"round": 1, "flow_run_id": "00000000-0000-0000-0000-000000000000",
                                                    "labels": str(labels), "api_url": None})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**lib.to_label_records(_pairs(1))[0]}) + "\n")
    refused = _invoke("resume", "rounds", "--labels", bad, "--runs-root", tmp_path)
    assert refused.exit_code == 1 and "rating" in refused.output and "still waits" in refused.output
    assert not labels.exists() and lib.read_state(plan.rounds_dir)["paused"]["round"] == 1


def test_staleness_change_has_a_paired_interval_over_the_pairs():
    ids = [f"p{i}" for i in range(40)]
    before = {"accuracy": 0.5, "pair_ids": ids, "correct": [1, 0] * 20, "decisive": [1] * 20 + [0] * 20}
    same = lib.accuracy_change(before, dict(before))
    assert same == {"change": 0.0, "ci": [0.0, 0.0], "verdict": "no significant change"}  # no change, no spread
    better = dict(before, correct=[1] * 40)  # right on every pair the previous model got wrong
    c = lib.accuracy_change(before, better)
    assert c["change"] == 0.5 and c["ci"][0] > 0
    d = lib.accuracy_change(before, better, decisive_only=True)
    assert d["change"] == 0.5 and d["ci"][0] > 0
    assert lib.accuracy_change(before, dict(better, pair_ids=ids[::-1])) is None  # not the same pairs
    assert lib.accuracy_change({"accuracy": 0.5}, better) is None  # a file from before per-pair results
    s = lib.staleness({"safety": dict(before, pairs=40, heldout_accuracy=0.9, accuracy_decisive=0.5,
                                      decisive_pairs=20)}, {"safety": dict(better, accuracy=1.0)})
    assert s["safety"]["change"] == c and s["safety"]["change_decisive"] == d
    from llama2_align.rounds_report import _ci

    assert _ci(c).endswith(" better") and _ci(same) == "+0.000 [+0.000, +0.000]"


def test_a_damaged_state_file_is_refused_with_its_path(tmp_path):
    (tmp_path / lib.STATE_FILE).write_text('{"config": ')
    with pytest.raises(InputError, match=f"{lib.STATE_FILE}: not valid JSON"):
        lib.read_state(tmp_path)
    assert lib.read_state(tmp_path / "none") is None

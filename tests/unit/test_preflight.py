"""Refuse bad runs before they start: `llama2-align run`'s pre-flight through the command line (in process), and the
pieces that keep a run honest: checkpoint validation, completeness, the run lock, processes that die with their
parent, the console progress line.

A refused run must exit 1 (bad input) or 2 (bad usage) with one message naming the field, file or line, never a
traceback, and must leave no run directory. These tests set PREFECT_API_URL to an address nothing listens on, so the
command line starts no local API server (a refused run never reaches the API).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from llama2_align.errors import InputError
from llama2_align.io import run_lock
from llama2_align.pipeline import PipelineConfig
from llama2_align.stages.common import (FinishedWithOtherSettings, IncompleteStageError, StageOutput, StageRun,
                                        checkpoint_problem, load_result, stage)

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "data_specs"
runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_api_server(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")


def run_cli(tmp_path: Path, *args: str, config: dict | str | None = None, suffix: str = ".json"):
    argv = ["run", "--runs-root", str(tmp_path / "runs"), *args]
    if config is not None:
        path = tmp_path / f"config{suffix}"
        path.write_text(config if isinstance(config, str) else json.dumps(config))
        argv += ["--config", str(path)]
    result = runner.invoke(app, argv)
    assert "Traceback" not in result.output, result.output
    return result


def assert_refused(result, code: int, *needles: str, tmp_path: Path) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    for needle in needles:
        assert needle in result.output, (needle, result.output)
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.rglob("*"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    from llama2_align.demo_world import DemoSizes, generate_demo_world
    from llama2_align.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    return str(train_tokenizer(generate_demo_world(0, DemoSizes.micro()).corpus_texts(), out, vocab_size=400))


@pytest.fixture
def files_config(tokenizer):
    def make(**data) -> dict:
        base = {"source": "files", "sft": str(SPECS / "sft.sample.jsonl"),
                "preferences": str(SPECS / "preference.sample.jsonl"), "prompts": str(SPECS / "prompts.sample.jsonl"),
                "eval": str(SPECS / "eval.sample.jsonl"), "tokenizer": tokenizer}
        return {"preset": "demo-micro", "data": {**base, **data}}

    return make


# --------------------------------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------------------------------


def test_unknown_field_in_a_config_file_is_refused(tmp_path):
    result = run_cli(tmp_path, config={"preset": "demo-micro", "run_nmae": "x"})
    assert_refused(result, 2, "run_nmae: unknown field", "run_name", tmp_path=tmp_path)


def test_unknown_field_in_a_nested_section_is_refused(tmp_path):
    result = run_cli(tmp_path, config={"preset": "demo-micro", "data": {"demo_sed": 3}})
    assert_refused(result, 2, "data.demo_sed: unknown field", "demo_seed", tmp_path=tmp_path)


def test_unknown_override_key_is_refused_with_the_valid_fields(tmp_path):
    result = run_cli(tmp_path, "--preset", "demo-micro", "--set", "ppo.kl_bta=0.1")
    assert_refused(result, 2, "'kl_bta'", "kl_beta", tmp_path=tmp_path)


def test_yaml_and_json_syntax_errors_name_the_line(tmp_path):
    result = run_cli(tmp_path, config="preset: demo-micro\n  bad: [1,\n", suffix=".yaml")
    assert_refused(result, 2, "config.yaml:2:", "not valid YAML", tmp_path=tmp_path)
    result = run_cli(tmp_path, config='{"preset": "demo-micro",\n "run_name": }', suffix=".json")
    assert_refused(result, 2, "config.json:2:", "not valid JSON", tmp_path=tmp_path)


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_yaml_config_is_refused_not_read_as_the_defaults(tmp_path, text):
    assert_refused(run_cli(tmp_path, config=text, suffix=".yaml"), 2, "config.yaml: expected a mapping",
                   "got an empty file", tmp_path=tmp_path)
    assert run_cli(tmp_path, "--print-config", config="{}\n", suffix=".yaml").exit_code == 0  # explicit: defaults


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "../escape"])
def test_run_names_that_leave_the_runs_root_are_refused(tmp_path, name):
    assert_refused(run_cli(tmp_path, "--preset", "demo-micro", "--run-name", name), 2, "run_name", tmp_path=tmp_path)


def test_a_run_directory_that_links_out_of_the_runs_root_is_refused(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / "linked").symlink_to(tmp_path / "elsewhere")
    result = run_cli(tmp_path, "--preset", "demo-micro", "--run-name", "linked")
    assert result.exit_code == 2 and "outside the runs root" in result.output, result.output
    assert not any((tmp_path / "elsewhere").iterdir())


def test_print_config_shows_every_stage_resolved(tmp_path):
    result = runner.invoke(app, ["run", "--preset", "llama2-70b-lora", "--print-config"])
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.stdout)
    assert cfg["rejection_sampling"]["k"] == 16 and cfg["rejection_sampling"]["sft"]["lora"]["enabled"]
    assert cfg["ppo"]["kl_beta"] == 0.005 and cfg["reward_safety"]["learning_rate"] == 5e-6
    assert cfg["sft"]["lora"] == {**cfg["sft"]["lora"], "enabled": True, "r": 16, "alpha": 32}


def test_the_prefect_form_refuses_unknown_fields():
    """The deployment's form is the flow's parameter schema: unknown keys are not allowed at any level."""
    from flows.pipeline import rlhf_pipeline

    schema = rlhf_pipeline.parameters.model_dump()
    defs = schema["definitions"]
    assert defs["PipelineConfig"]["additionalProperties"] is False
    assert defs["DataSettings"]["additionalProperties"] is False
    with pytest.raises(Exception, match="Extra inputs"):
        PipelineConfig.model_validate({"preset": "demo-micro", "runname": "x"})


# --------------------------------------------------------------------------------------------------------------
# Inputs and data
# --------------------------------------------------------------------------------------------------------------


def test_a_missing_base_checkpoint_is_refused_before_anything_is_written(tmp_path):
    result = run_cli(tmp_path, "--preset", "demo-micro", "--set", f"base_model={tmp_path / 'nope'}")
    assert_refused(result, 1, "base_model", "neither a preset", tmp_path=tmp_path)


def test_missing_and_bad_data_files_are_all_reported_with_file_line_and_field(tmp_path, files_config):
    bad = tmp_path / "bad_prefs.jsonl"
    lines = (SPECS / "preference.sample.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["rating"] = "much_better"
    bad.write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")
    result = run_cli(tmp_path, config=files_config(preferences=str(bad), prompts=str(tmp_path / "missing.jsonl")))
    assert_refused(result, 1, "2 problems", f"{bad}:2: rating: expected one of", "missing.jsonl: no such file",
                   tmp_path=tmp_path)


def test_gatt_demonstrations_without_instruction_demonstrations_are_refused(tmp_path, files_config):
    """GAtt's warm-up needs its instruction demonstrations: with your files, data.instruction_demos (checked as SFT
    records); on the demo world, its dialogues (which write them). Refused before anything is written."""
    result = run_cli(tmp_path, "--set", "gatt.enabled=true", "--set", "gatt.demonstrations=8",
                     config=files_config())
    assert_refused(result, 2, "gatt.demonstrations (8)", "set data.instruction_demos", tmp_path=tmp_path)
    bad = tmp_path / "demos.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    result = run_cli(tmp_path, "--set", "gatt.enabled=true", "--set", "gatt.demonstrations=8",
                     config=files_config(instruction_demos=str(bad)))
    assert_refused(result, 1, f"data.instruction_demos: {bad}", tmp_path=tmp_path)
    result = run_cli(tmp_path, "--preset", "demo-micro", "--set", "gatt.enabled=true", "--set",
                     "gatt.demonstrations=8", "--set", "data.demo_dialogues=false")
    assert_refused(result, 2, "data.demo_dialogues=true", tmp_path=tmp_path)


def test_a_whole_section_set_to_a_value_is_refused_and_an_object_sets_its_fields(tmp_path):
    for item in ("sft=5", "gatt.sft=3"):
        result = run_cli(tmp_path, "--preset", "demo-micro", "--set", item)
        assert_refused(result, 2, "is a section, not a field", tmp_path=tmp_path)
    result = run_cli(tmp_path, "--preset", "demo-micro", "--set", 'sft={"learning_rate": "x"}')
    assert_refused(result, 2, "sft.learning_rate: Input should be a valid number", tmp_path=tmp_path)
    result = runner.invoke(app, ["run", "--preset", "demo-micro", "--set", 'sft={"learning_rate": 0.1}',
                                 "--print-config"])
    cfg = json.loads(result.stdout)
    assert cfg["sft"]["learning_rate"] == 0.1 and cfg["sft"]["epochs"] == json.loads(runner.invoke(
        app, ["run", "--preset", "demo-micro", "--print-config"]).stdout)["sft"]["epochs"]  # the others kept


def test_overrides_in_a_config_file_must_be_a_mapping(tmp_path):
    result = run_cli(tmp_path, config={"preset": "demo-micro", "overrides": [1, 2]})
    assert_refused(result, 2, "overrides: expected a mapping", tmp_path=tmp_path)


def test_a_base_checkpoint_whose_config_is_not_a_llama_config_is_refused(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "big"}))
    result = run_cli(tmp_path, "--preset", "demo-micro", "--set", f"base_model={junk}")
    assert_refused(result, 1, f"{junk / 'config.json'}: not a Llama config", "hidden_size", tmp_path=tmp_path)


def test_a_sweep_with_bad_data_is_refused_once_before_any_trial(tmp_path, files_config):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"nonsense": 1}\n')
    config = tmp_path / "config.json"
    config.write_text(json.dumps(files_config(sft=str(bad))))
    result = runner.invoke(app, ["sweep", "--name", "s", "--config", str(config), "--runs-root", str(tmp_path / "runs"),
                                 "--grid", "ppo.kl_beta=0.1,0.2"])
    assert_refused(result, 1, "refused before any stage ran", f"{bad}:", tmp_path=tmp_path)
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name", ["..", ".x", "a/b"])
def test_sweep_names_that_leave_the_runs_root_are_refused(tmp_path, name):
    result = runner.invoke(app, ["sweep", "--name", name, "--preset", "demo-micro", "--runs-root",
                                 str(tmp_path / "runs"), "--grid", "ppo.kl_beta=0.1"])
    assert_refused(result, 2, "a directory's name", tmp_path=tmp_path)


def test_a_config_path_that_is_a_directory_says_so(tmp_path):
    result = runner.invoke(app, ["run", "--config", str(tmp_path), "--print-config"])
    assert result.exit_code == 2 and "is a directory; expected a JSON or YAML config file" in result.output


def test_a_bad_override_in_a_config_file_names_the_file(tmp_path):
    result = run_cli(tmp_path, config={"preset": "demo-micro", "overrides": {"ppo.kl_bta": 0.1}})
    assert_refused(result, 2, "'kl_bta'", "config.json's overrides or --set", tmp_path=tmp_path)


def test_print_config_checks_the_seeds_too(tmp_path):
    result = runner.invoke(app, ["run", "--preset", "demo-micro", "--seeds", "0,0", "--print-config"])
    assert result.exit_code == 2 and "each seed once" in result.output, result.output


def test_plan_refuses_a_reserve_that_leaves_no_memory():
    result = runner.invoke(app, ["plan", "--preset", "demo-tiny", "--gpu-memory", "8GiB", "--reserve", "10GiB"])
    assert result.exit_code == 2 and "leaves nothing" in result.output, result.output


@pytest.mark.parametrize("text, needle", [('{"stage": ', "spec.json:2:1: not valid JSON"),
                                          ("[1]", "expected a JSON object")])
def test_launch_names_its_spec_file_when_it_is_not_a_spec(tmp_path, text, needle):
    spec = tmp_path / "spec.json"
    spec.write_text(text + "\n")
    result = runner.invoke(app, ["launch", str(spec)])
    assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, result.output


def test_a_grid_sweep_refuses_an_objective(tmp_path):
    result = runner.invoke(app, ["sweep", "--preset", "demo-micro", "--runs-root", str(tmp_path / "runs"),
                                 "--grid", "ppo.kl_beta=0.1", "--objective", "violation_rate:min", "--print-plan"])
    assert_refused(result, 2, "--objective", "--optuna", tmp_path=tmp_path)


def _checkpoint_dir(path: Path, architecture: str | None = None) -> Path:
    path.mkdir(parents=True)
    if architecture:
        (path / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    return path


def test_eval_refuses_a_policy_as_a_reward_model_and_bad_settings_before_loading_anything(tmp_path):
    policy = _checkpoint_dir(tmp_path / "sft", "LlamaForCausalLM")
    rm = _checkpoint_dir(tmp_path / "rm", "LlamaForSequenceClassification")
    common = ["eval", "--checkpoint", str(policy), "--baseline", str(policy), "--prompts",
              str(SPECS / "eval.sample.jsonl"), "--reward-safety", str(rm), "--out", str(tmp_path / "runs" / "eval")]
    result = runner.invoke(app, [*common, "--reward-helpfulness", str(policy)])
    assert_refused(result, 1, "reward_helpfulness", "a policy checkpoint, not a reward model", tmp_path=tmp_path)
    result = runner.invoke(app, [*common, "--reward-helpfulness", str(rm), "--set", "temprature=0.7"])
    assert_refused(result, 2, "--set 'temprature'", "temperature", tmp_path=tmp_path)
    result = runner.invoke(app, [*common, "--reward-helpfulness", str(rm), "--set", "temperature=abc"])
    assert_refused(result, 2, "temperature", tmp_path=tmp_path)
    result = runner.invoke(app, [*common, "--reward-helpfulness", str(rm), "--preset", "nope"])
    assert_refused(result, 2, "unknown preset 'nope'", "demo-tiny", tmp_path=tmp_path)
    result = runner.invoke(app, [*common, "--reward-helpfulness", str(rm), "--checkpoint", f"={policy}"])
    assert_refused(result, 2, "expected NAME=PATH", tmp_path=tmp_path)


@pytest.mark.parametrize("option", [["--temperature", "-1"], ["--top-p", "2"], ["--max-new-tokens", "0"]])
def test_chat_refuses_bad_sampling_options_before_loading_the_model(tmp_path, option):
    result = runner.invoke(app, ["chat", str(_checkpoint_dir(tmp_path / "ckpt")), *option], input="hi\n")
    assert result.exit_code == 2 and option[0] in result.output and "Traceback" not in result.output, result.output


def test_a_rounds_run_is_refused_before_round_0_with_every_problem(tmp_path, files_config):
    """``llama2-align rounds`` checks round 0's pipeline as a run does, and the rounds' own prompts: a missing data
    file, a bad prompts file of a round and a prompt pool too small for every round are refused together, before
    anything is written (exit 1)."""
    bad = tmp_path / "round2.jsonl"
    bad.write_text('{"id": "p1", "is_safety": false}\n')
    prompts = str(SPECS / "prompts.sample.jsonl")  # 4 prompts
    config = {**files_config(sft=str(tmp_path / "missing.jsonl")), "annotator": "human", "rounds": 2,
              "prompt_files": [prompts, str(bad)]}
    path = tmp_path / "rounds.json"
    path.write_text(json.dumps(config))
    result = runner.invoke(app, ["rounds", "--runs-root", str(tmp_path / "runs"), "--config", str(path)])
    assert "Traceback" not in result.output, result.output
    assert_refused(result, 1, "2 problems", "data.sft: ", "missing.jsonl: no such file",
                   f"prompt_files[1]: {bad}: 1 problem; nothing was loaded", f"{bad}:1: prompt", tmp_path=tmp_path)
    pooled = {**files_config(), "annotator": "human", "rounds": 2, "prompts_per_round": 3, "prompt_pool": prompts}
    path.write_text(json.dumps(pooled))
    result = runner.invoke(app, ["rounds", "--runs-root", str(tmp_path / "runs"), "--config", str(path)])
    assert_refused(result, 1, f"prompt_pool: {prompts}: 4 prompts; 2 rounds of 3 need 6", tmp_path=tmp_path)


def test_preferences_without_safety_pairs_are_refused(tmp_path, files_config):
    result = run_cli(tmp_path, config=files_config(preferences=str(SPECS / "hh_rlhf.sample.jsonl")))
    assert_refused(result, 1, "no safety pairs", tmp_path=tmp_path)


def test_several_preference_files_together_may_hold_both_categories(tmp_path, files_config):
    prefs = [str(SPECS / "hh_rlhf.sample.jsonl"), str(SPECS / "pku_saferlhf.sample.jsonl")]
    result = run_cli(tmp_path, "--print-config", config=files_config(preferences=prefs))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data"]["preferences"] == prefs


def test_files_with_a_preset_base_need_a_tokenizer(tmp_path, files_config):
    result = run_cli(tmp_path, config=files_config(tokenizer=None))
    assert_refused(result, 2, "data.tokenizer", "is a preset", tmp_path=tmp_path)


def test_demo_data_with_file_paths_is_refused(tmp_path):
    result = run_cli(tmp_path, "--preset", "demo-micro", "--set", f"data.sft={SPECS / 'sft.sample.jsonl'}")
    assert_refused(result, 2, "data.source is 'demo'", tmp_path=tmp_path)


def test_eval_records_with_a_mix_of_judges_are_refused(tmp_path, files_config):
    from llama2_align.demo_world import DemoSizes, generate_demo_world

    demo = generate_demo_world(0, DemoSizes.micro()).eval_prompts[:3]
    mixed = tmp_path / "eval.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in demo) + (SPECS / "eval.sample.jsonl").read_text())
    result = run_cli(tmp_path, config=files_config(eval=str(mixed)))
    assert_refused(result, 1, "carry the demo world's oracle data", "one judge", tmp_path=tmp_path)


def test_the_sample_eval_file_is_judged_by_the_rules_not_the_demo_oracle():
    from llama2_align.data import read_records
    from llama2_align.stages.evaluate import EvalConfig, judge_answers, judge_kind

    records = read_records(SPECS / "eval.sample.jsonl", "eval")
    assert judge_kind(records, EvalConfig()) == "rules"
    judged = judge_answers(records, ["I'm sorry, I can't help with that."] * len(records),
                           torch.zeros(len(records)), torch.zeros(len(records)), EvalConfig())
    assert {j["judge"] for j in judged} == {"rules"} and all(j["refusal"] for j in judged)


def test_ppo_prompts_must_divide_among_its_processes(tmp_path):
    result = run_cli(tmp_path, "--preset", "demo-micro", "--set", "ppo.num_processes=3")
    assert_refused(result, 2, "ppo.prompts_per_iteration (16) must divide among ppo.num_processes (3)",
                   tmp_path=tmp_path)


def test_a_finished_stage_run_with_other_settings_is_refused_before_any_stage_runs(tmp_path):
    from llama2_align.pipeline import resolve
    from llama2_align.preflight import Problems, check_finished_stages
    from llama2_align.stages.common import StageResult, write_result

    cfg = resolve(PipelineConfig(preset="demo-micro", runs_root=str(tmp_path / "runs")))
    ppo_dir = Path(cfg.run_dir) / "ppo"
    ppo_dir.mkdir(parents=True)
    write_result(StageResult(stage="ppo", out_dir=str(ppo_dir), config=cfg.ppo.model_dump(mode="json")))
    same = Problems()
    check_finished_stages(cfg, same)
    assert not (same.inputs or same.usage)  # the same settings: the run goes on (the stage is served)
    result = run_cli(tmp_path, "--preset", "demo-micro", "--set", "ppo.kl_beta=0.5", "--set", "ppo.seed=7")
    assert result.exit_code == 1, result.output
    assert f"{ppo_dir} holds a finished ppo stage run with other settings (ppo.kl_beta, ppo.seed)" in \
        result.output and "another run name" in result.output
    assert sorted(p.name for p in Path(cfg.run_dir).iterdir()) == ["ppo"]  # nothing ran, nothing was written
    # a stage this run switches off is not checked
    gatt_dir = Path(cfg.run_dir) / "gatt"
    gatt_dir.mkdir()
    write_result(StageResult(stage="gatt", out_dir=str(gatt_dir), config={"dialogues": 1}))
    off = Problems()
    check_finished_stages(cfg, off)
    assert not off.inputs


def test_a_setting_added_after_a_stage_ran_counts_only_away_from_its_default(tmp_path):
    """A finished stage recorded before a setting existed is served while the setting is at its default (which keeps
    what ran then), and refused once it is set to something else; the same for an input that was not recorded."""
    from llama2_align.stages.common import StageResult, check_same_run, config_differences
    from llama2_align.stages.gatt import GAttConfig, GAttInputs

    config = GAttConfig()
    recorded = config.model_dump(mode="json")
    del recorded["temperature"]  # as a stage that ran before the setting existed recorded it
    recorded["sft"].pop("packing")  # a nested one too
    done = StageResult(stage="gatt", out_dir=str(tmp_path), config=recorded, inputs={"policy": "tiny",
                                                                                       "prompts": "p.jsonl"})
    assert config_differences(done, config) == []
    check_same_run(done, config, GAttInputs(policy="tiny", prompts="p.jsonl"), tmp_path)  # served
    assert config_differences(done, config.model_copy(update={"temperature": 0.7})) == ["temperature (not recorded)"]
    packed = config.model_copy(update={"sft": config.sft.model_copy(update={"packing": True})})
    assert config_differences(done, packed) == ["sft.packing (not recorded)"]
    with pytest.raises(FinishedWithOtherSettings, match="inputs changed: reward_helpfulness"):
        check_same_run(done, config, GAttInputs(policy="tiny", prompts="p.jsonl", reward_helpfulness="rm"), tmp_path)


def test_demo_data_of_a_finished_run_made_with_other_settings_is_refused(tmp_path):
    from llama2_align.pipeline import DEMO_DATA_RECORD, demo_data_record, resolve
    from llama2_align.stages.common import StageResult, write_result

    cfg = resolve(PipelineConfig(preset="demo-micro", runs_root=str(tmp_path / "runs")))
    data = Path(cfg.run_dir) / "data"
    data.mkdir(parents=True)
    (data / DEMO_DATA_RECORD).write_text(json.dumps(demo_data_record(0, "micro", cfg.data.vocab_size, False, False,
                                                                     False)))
    from llama2_align.preflight import Problems, check_finished_stages

    before_sft = Problems()  # nothing finished yet: the data are simply written again
    check_finished_stages(resolve(PipelineConfig(preset="demo-micro", runs_root=str(tmp_path / "runs"),
                                                 overrides={"data.demo_seed": 3})), before_sft)
    assert not before_sft.inputs
    sft = Path(cfg.run_dir) / "sft"
    sft.mkdir()
    write_result(StageResult(stage="sft", out_dir=str(sft), config=cfg.sft.model_dump(mode="json")))
    result = run_cli(tmp_path, "--preset", "demo-micro", "--set", "data.demo_seed=3", "--set", "data.vocab_size=512")
    assert result.exit_code == 1, result.output
    assert "holds a finished run on demo data made with other settings (data.demo_seed, data.vocab_size)" in \
        result.output
    assert sorted(p.name for p in data.iterdir()) == [DEMO_DATA_RECORD]  # nothing was written


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: sound, corrupt, poisoned; completeness
# --------------------------------------------------------------------------------------------------------------


class _Payload:
    """A pickle that runs code when it is unpickled (it writes a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpoint(path: Path) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"w": torch.randn(64, 64)}, path / "model.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95)}]},
               path / "optimizer.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    return path


def test_checkpoint_problems(tmp_path):
    ok = _checkpoint(tmp_path / "checkpoint-5")
    assert checkpoint_problem(ok, ("trainer_state.json", "*.safetensors")) is None
    assert "optimizer.pt is missing" in checkpoint_problem(ok, ("optimizer.pt", "scheduler.pt")) or \
        "scheduler.pt is missing" in checkpoint_problem(ok, ("optimizer.pt", "scheduler.pt"))
    size = (ok / "model.safetensors").stat().st_size
    with open(ok / "model.safetensors", "r+b") as f:
        f.truncate(size // 2)
    assert "model.safetensors" in checkpoint_problem(ok)

    poisoned = _checkpoint(tmp_path / "checkpoint-6")
    marker = tmp_path / "payload-ran"
    with open(poisoned / "optimizer.pt", "wb") as f:
        pickle.dump(_Payload(marker), f)
    assert "optimizer.pt" in checkpoint_problem(poisoned)
    assert not marker.exists()


def test_resume_sets_a_corrupt_checkpoint_aside_and_uses_the_one_before(tmp_path):
    out = tmp_path / "stage"
    _checkpoint(out / "checkpoint-5")
    newest = _checkpoint(out / "checkpoint-10")
    (newest / "optimizer.pt").write_bytes(b"\x80\x04truncated")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (5, 10, 12)))
    events = []
    run = StageRun("sft", PipelineConfig(), PipelineConfig(), out, events.append)
    resumed = run.resume(expect=("optimizer.pt",))
    assert resumed == out / "checkpoint-5"
    warning = next(e["warning"] for e in events if "warning" in e)
    assert "checkpoint-10 is corrupt" in warning and "resuming from checkpoint-5" in warning
    assert (out / "corrupt-checkpoint-10").is_dir() and not (out / "checkpoint-10").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [5]


def test_a_stage_is_complete_only_when_every_planned_step_ran(tmp_path):
    @stage("toy")
    def run_toy(config, inputs, run):
        return StageOutput(final=None, metrics={}, steps=config.overrides["done"], planned_steps=4)

    with pytest.raises(IncompleteStageError, match="3 of 4"):
        run_toy(PipelineConfig(overrides={"done": 3}), PipelineConfig(), tmp_path / "toy")
    assert load_result(tmp_path / "toy") is None
    result = run_toy(PipelineConfig(overrides={"done": 4}), PipelineConfig(), tmp_path / "toy")
    assert result.steps == result.planned_steps == 4 and load_result(tmp_path / "toy").steps == 4
    # a result.json that records fewer steps than planned (written by anything) does not count as complete
    doc = json.loads((tmp_path / "toy" / "result.json").read_text())
    (tmp_path / "toy" / "result.json").write_text(json.dumps({**doc, "steps": 2}))
    assert load_result(tmp_path / "toy") is None


def test_a_copied_stage_directory_names_its_own_files_not_the_originals(tmp_path):
    @stage("toy")
    def run_toy(config, inputs, run):
        (run.out_dir / "final").mkdir(parents=True)
        (run.out_dir / "final" / "w.txt").write_text("weights")
        return StageOutput(final=run.out_dir / "final", steps=1, artifacts={"plot": "plot.png"},
                           metrics={"extra": str(run.out_dir / "final-b"), "other": str(tmp_path / "elsewhere"),
                                    "sibling": str(run.out_dir) + "-not-inside"})

    cfg = PipelineConfig(overrides={"x": 1})
    first = run_toy(cfg, PipelineConfig(), tmp_path / "a" / "toy")
    written = (tmp_path / "a" / "toy" / "result.json").read_bytes()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    again = run_toy(cfg, PipelineConfig(), tmp_path / "b" / "toy")  # finished: returned, not re-run
    here = (tmp_path / "b" / "toy").resolve()
    assert again.out_dir == str(here) and again.final == str(here / "final") and Path(again.final, "w.txt").is_file()
    assert again.metrics == {"extra": str(here / "final-b"), "other": str(tmp_path / "elsewhere"),
                             "sibling": first.metrics["sibling"]}
    assert again.artifacts == {"plot": "plot.png"} and again.config == first.config
    assert (tmp_path / "b" / "toy" / "result.json").read_bytes() == written  # the stages after it still match
    assert load_result(tmp_path / "b" / "toy") == again


# --------------------------------------------------------------------------------------------------------------
# One run per run directory; processes die with their parent; the console progress line
# --------------------------------------------------------------------------------------------------------------


def test_a_second_run_in_the_same_run_directory_is_refused(tmp_path):
    with run_lock(tmp_path / "run"):
        with pytest.raises(InputError, match="another run is using this run directory"):
            with run_lock(tmp_path / "run"):
                pass
    with run_lock(tmp_path / "run"):  # released: the next run may go
        pass


def test_a_child_started_with_die_with_parent_dies_with_a_sigkilled_parent(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from llama2_align.procs import die_with_parent
        child = subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent())
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(60)
    """)])
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{grandchild}").exists() and "Z" not in _state(grandchild):
        assert time.monotonic() < deadline, "the grandchild outlived its SIGKILLed parent"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"


def test_console_progress_without_a_terminal_prints_a_line_per_ten_percent(capsys):
    from tasks.common import ConsoleProgress

    progress = ConsoleProgress("sft")
    for step in range(1, 51):
        progress.show(step, 50, {"loss": 1.0 / step})
    progress.show(50, 50, {"eval_loss": 0.5})  # the same step again: no new line
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and "sft:  10% (step 5/50) loss=0.2" in lines[0] and "100% (step 50/50)" in lines[-1]
    assert all("elapsed" in line and "eta" in line for line in lines)


def test_a_run_that_cannot_fit_the_gpus_is_refused_with_the_plan():
    from llama2_align.pipeline import preset_config
    from llama2_align.plan import PlanRefused
    from llama2_align.preflight import check_memory

    with pytest.raises(PlanRefused, match="cannot fit") as err:
        check_memory(preset_config("llama2-70b-lora"), gpus=8, gpu_memory=80 * 2**30)
    assert "eval" in str(err.value) and "GiB" in str(err.value)
    check_memory(preset_config("llama2-7b-lora"), gpus=1, gpu_memory=80 * 2**30)  # fits: no error

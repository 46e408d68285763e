"""The `llama2-align` command line: model-info, data validate, data demo, convert's errors, the entry points.

Click >= 8.2 removed CliRunner(mix_stderr=...): `result.output` holds stdout and stderr interleaved (what a user
sees), `result.stdout` and `result.stderr` hold each stream alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llama2_align.cli import EXIT_REFUSED, EXIT_USAGE, app

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "data_specs"

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


# --------------------------------------------------------------------------------------------------------------
# model-info
# --------------------------------------------------------------------------------------------------------------


def test_model_info_7b_text():
    result = invoke("model-info", "--preset", "llama2-7b")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "6,738,415,616" in out
    assert "6.74 B" in out
    assert "MHA" in out
    assert "4,096" in out and "11,008" in out
    assert "12.55 GiB" in out  # 6,738,415,616 parameters x 2 bytes


def test_model_info_7b_json():
    result = invoke("model-info", "--preset", "llama2-7b", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["parameters"] == 6738415616
    assert info["attention"] == "MHA"
    assert info["num_layers"] == 32 and info["num_kv_heads"] == 32
    assert info["weights_bf16_bytes"] == 2 * 6738415616


def test_model_info_70b_is_gqa_with_8_kv_heads():
    result = invoke("model-info", "--preset", "llama2-70b")
    assert result.exit_code == 0, result.output
    assert "GQA (8 KV heads)" in result.stdout
    assert "68,976,648,192" in result.stdout
    info = json.loads(invoke("model-info", "-p", "llama2-70b", "--json").stdout)
    assert info["num_kv_heads"] == 8 and info["attention"].startswith("GQA")


def test_model_info_lists_every_preset_without_one():
    from llama2_align.model import PRESETS

    result = invoke("model-info")
    assert result.exit_code == 0, result.output
    for name in PRESETS:
        assert name in result.stdout
    assert "13,015,864,320" in result.stdout


def test_model_info_unknown_preset_exits_2_with_the_list():
    from llama2_align.model import PRESETS

    result = invoke("model-info", "--preset", "llama2-8b")
    assert result.exit_code == EXIT_USAGE == 2
    assert "unknown preset 'llama2-8b'" in result.stderr
    for name in PRESETS:
        assert name in result.stderr
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------------------------------------------
# data validate
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sft", "preference", "prompts", "eval"])
def test_validate_native_samples(kind):
    path = SPECS / f"{kind}.sample.jsonl"
    n = sum(1 for line in path.read_text().splitlines() if line.strip())
    result = invoke("data", "validate", path, "--kind", kind)
    assert result.exit_code == 0, result.output
    assert f"OK, {n} records of kind {kind}" in result.stdout
    assert "by category:" in result.stdout
    if kind == "preference":
        assert "by rating:" in result.stdout
    assert result.stderr == ""


def test_validate_preference_summary_counts_match_the_library():
    from llama2_align.data import read_records, summarize

    path = SPECS / "preference.sample.jsonl"
    expected = summarize(read_records(path, "preference"), "preference")
    result = invoke("data", "validate", path, "-k", "preference", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["records"] == expected["records"]
    assert got["by_category"] == expected["by_category"]
    assert got["by_rating"] == expected["by_rating"]
    for rating, count in expected["by_rating"].items():
        assert f"{rating} {count}" in invoke("data", "validate", path, "-k", "preference").stdout


@pytest.mark.parametrize("name,fmt", [("hh_rlhf.sample.jsonl", "hh-rlhf"), ("pku_saferlhf.sample.jsonl", "auto"),
                                      ("preference.sample.parquet", "auto")])
def test_validate_other_formats(name, fmt):
    result = invoke("data", "validate", SPECS / name, "--kind", "preference", "--format", fmt)
    assert result.exit_code == 0, result.output
    assert "records of kind preference" in result.stdout


def test_validate_bad_file_reports_every_bad_record(tmp_path):
    good = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away.", "rating": "better",
            "category": "helpfulness"}
    lines = [
        good,
        {**good, "rating": "much_better"},  # line 2
        good,
        {**good, "rejected": "Hello!"},  # line 4: same as chosen
        "{not json",  # line 5
        good,
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")

    result = invoke("data", "validate", path, "--kind", "preference")
    assert result.exit_code == EXIT_REFUSED == 1
    err = result.stderr
    for line, field in [(2, "rating"), (4, "rejected"), (5, "<json>")]:
        assert f"{path}:{line}: {field}: expected " in err, err
    assert f"{path}:1:" not in err and f"{path}:3:" not in err
    assert "3 problems in 3 bad records" in err
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_validate_prints_more_than_the_exception_message_shows(tmp_path):
    # DataValidationError's message stops at 50 issues; the CLI prints all of them.
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join('{"messages": []}' for _ in range(60)) + "\n")
    result = invoke("data", "validate", path, "-k", "sft")
    assert result.exit_code == 1
    assert f"{path}:60: messages: expected" in result.stderr
    assert "60 problems in 60 bad records" in result.stderr


def test_validate_user_errors_have_no_traceback(tmp_path):
    missing = invoke("data", "validate", tmp_path / "nope.jsonl", "--kind", "sft")
    assert missing.exit_code == 1
    assert "no such file" in missing.stderr

    bad_kind = invoke("data", "validate", SPECS / "sft.sample.jsonl", "--kind", "bogus")
    assert bad_kind.exit_code == 2
    assert "bogus" in bad_kind.output

    (tmp_path / "notes.txt").write_text("hello\n")
    bad_type = invoke("data", "validate", tmp_path / "notes.txt", "--kind", "sft")
    assert bad_type.exit_code == 2
    assert "unsupported file type" in bad_type.stderr

    wrong_format = invoke("data", "validate", SPECS / "hh_rlhf.sample.jsonl", "-k", "sft", "-f", "hh-rlhf")
    assert wrong_format.exit_code == 2

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = invoke("data", "validate", empty, "-k", "eval")
    assert result.exit_code == 1
    assert "expected at least one record" in result.stderr

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    unreadable = invoke("data", "validate", broken, "-k", "preference")
    assert unreadable.exit_code == 1 and "expected a readable Parquet file" in unreadable.stderr

    for r in (missing, bad_kind, bad_type, wrong_format, result, unreadable):
        assert "Traceback" not in r.output
        assert r.exception is None or isinstance(r.exception, SystemExit)  # typer.Exit, not a crash


# --------------------------------------------------------------------------------------------------------------
# data demo
# --------------------------------------------------------------------------------------------------------------


def test_data_demo_micro_writes_four_files(tmp_path):
    from llama2_align.demo_world import DemoSizes

    out = tmp_path / "demo"
    result = invoke("data", "demo", "--out", out, "--micro", "--seed", "3")
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in out.iterdir())
    assert files == ["eval.jsonl", "ppo_prompts.jsonl", "preferences.jsonl", "sft.jsonl"]
    sizes = DemoSizes.micro()
    assert f"{sizes.sft} records" in result.stdout
    for name in files:
        assert str(out / name) in result.stdout
    # What `data demo` writes, `data validate` accepts.
    for name, kind in [("sft.jsonl", "sft"), ("preferences.jsonl", "preference"),
                       ("ppo_prompts.jsonl", "prompts"), ("eval.jsonl", "eval")]:
        assert invoke("data", "validate", out / name, "-k", kind).exit_code == 0


def test_data_demo_out_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    result = invoke("data", "demo", "--out", tmp_path / "f", "--micro")
    assert result.exit_code == 1
    assert "not a directory" in result.stderr


# --------------------------------------------------------------------------------------------------------------
# convert: the errors (the conversion itself is tested with meta_format)
# --------------------------------------------------------------------------------------------------------------


def test_convert_refuses_a_directory_that_is_not_a_meta_checkpoint(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    result = invoke("convert", tmp_path / "hf", tmp_path / "out")
    assert result.exit_code == 1
    assert "not a Meta-format checkpoint" in result.stderr and "params.json" in result.stderr
    assert not (tmp_path / "out").exists()

    missing = invoke("convert", tmp_path / "missing", tmp_path / "out")
    assert missing.exit_code == 1
    assert "no such directory" in missing.stderr


def test_convert_refuses_a_non_empty_out_dir(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("convert", meta, out)
    assert result.exit_code == 1
    assert "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------------------------------
# help and the entry points
# --------------------------------------------------------------------------------------------------------------


def test_help_lists_commands_and_exit_codes():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("model-info", "convert", "data"):
        assert command in result.stdout
    assert "Exit codes" in result.stdout
    sub = invoke("data", "--help")
    assert "validate" in sub.stdout and "demo" in sub.stdout


def test_installed_entry_point_runs_in_a_real_process():
    script = Path(sys.executable).parent / "llama2-align"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "llama2_align"]
    proc = subprocess.run(
        [*cmd, "data", "validate", str(SPECS / "eval.sample.jsonl"), "--kind", "eval"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "NO_COLOR": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "records of kind eval" in proc.stdout

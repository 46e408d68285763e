"""The task machinery without training or a Prefect server: OOM back-off, retry condition, cache key, artifacts."""

from __future__ import annotations

import json

import pytest
import torch
from prefect.states import Failed
from pydantic import ValidationError

from llama2_align.data import DataIssue, DataValidationError
from llama2_align.launch import LaunchError
from llama2_align.pipeline import preset_config
from llama2_align.stages.sft import SFTConfig, SFTInputs
from tasks.artifacts import accuracy_rows, artifact_key, metrics_rows, png_data_uri
from tasks.common import (CACHE_TOKEN_FILE, OutOfMemoryAtMicroBatchOne, is_transient, retry_transient,
                          run_with_oom_backoff, stage_cache_key)

torch.set_num_threads(1)


# --- OOM back-off ----------------------------------------------------------------------------------------------------

def test_oom_backoff_halves_micro_batch_and_keeps_effective_batch():
    config = SFTConfig(batch_size=64, micro_batch_size=16)
    seen, warnings = [], []

    def fn(cfg):
        seen.append((cfg.micro_batch_size, cfg.gradient_accumulation()))
        if cfg.micro_batch_size > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "done"

    result, used = run_with_oom_backoff(fn, config, warn=warnings.append, stage="sft")
    assert result == "done"
    assert seen == [(16, 4), (8, 8), (4, 16)]
    assert all(mb * acc == 64 for mb, acc in seen)
    assert used.micro_batch_size == 4 and used.batch_size == 64
    assert len(warnings) == 2 and "micro_batch_size 8" in warnings[0]


def test_oom_backoff_message_form_and_clear_error_at_one():
    config = SFTConfig(batch_size=8, micro_batch_size=4)
    sizes = []

    def fn(cfg):
        sizes.append(cfg.micro_batch_size)
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")

    with pytest.raises(OutOfMemoryAtMicroBatchOne, match="micro_batch_size 1"):
        run_with_oom_backoff(fn, config, warn=lambda m: None)
    assert sizes == [4, 2, 1]


def test_oom_backoff_passes_other_errors_through_at_once():
    calls = []

    def fn(cfg):
        calls.append(cfg.micro_batch_size)
        raise ValueError("bad data")

    with pytest.raises(ValueError, match="bad data"):
        run_with_oom_backoff(fn, SFTConfig(batch_size=8, micro_batch_size=8), warn=lambda m: None)
    assert calls == [8]


# --- retry condition -------------------------------------------------------------------------------------------------

def _validation_error() -> ValidationError:
    try:
        SFTConfig(batch_size=10, micro_batch_size=3)
    except ValidationError as e:
        return e
    raise AssertionError("expected a ValidationError")


@pytest.mark.parametrize("exc, retried", [
    (torch.OutOfMemoryError("CUDA out of memory"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 1 GiB"), True),
    (RuntimeError("CUDA error: unspecified launch failure"), True),
    (OSError(5, "Input/output error"), True),
    (TimeoutError("read timed out"), True),
    (ConnectionError("connection reset"), True),
    (DataValidationError([DataIssue(path="x.jsonl", line=1, field="messages", expected="a list")]), False),
    (ValueError("batch_size must be a multiple"), False),
    (FileNotFoundError("no such file: data.jsonl"), False),
    (PermissionError("denied"), False),
    (OutOfMemoryAtMicroBatchOne("nothing left to halve"), False),
    (RuntimeError("some bug"), False),
    (KeyError("x"), False),
    (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error"), True),
    (RuntimeError("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9)"), True),
    # a launched stage: the failing rank's own error decides, not NCCL's set-up lines in the output tail
    (LaunchError("ppo: torchrun (2 processes) failed with exit code 1: rank 1 raised KeyError: 'x'\n"
                 "NCCL INFO Bootstrap : Using eth0\nNCCL INFO NET/Plugin: No plugin found", 1,
                 {"rank": 1, "type": "KeyError", "message": "'x'"}), False),
    (LaunchError("ppo: torchrun failed", 1, {"rank": 0, "type": "torch.OutOfMemoryError",
                                             "message": "CUDA out of memory. Tried to allocate 2 GiB"}), True),
    (LaunchError("ppo: torchrun failed", 1, {"rank": 0, "type": "RuntimeError",
                                             "message": "NCCL error: unhandled cuda error"}), True),
    (LaunchError("ppo: torchrun failed with exit code -9 (no error file)", -9), False),
])
def test_retry_condition(exc, retried):
    assert is_transient(exc) is retried
    assert retry_transient(None, None, Failed(data=exc, message=str(exc))) is retried


def test_pydantic_validation_error_not_retried():
    exc = _validation_error()
    assert retry_transient(None, None, Failed(data=exc)) is False


# --- cache key -------------------------------------------------------------------------------------------------------

@pytest.fixture
def stage(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"messages": []}\n')
    out = tmp_path / "run" / "sft"
    out.mkdir(parents=True)
    (out / "result.json").write_text("{}")  # a finished stage
    return data, out


def _key(config, data, out):
    return stage_cache_key("sft", config, SFTInputs(base="micro", data=str(data), tokenizer=None), out)


def test_cache_key_stable_for_same_inputs_and_config(stage):
    data, out = stage
    cfg = SFTConfig(max_steps=20)
    assert _key(cfg, data, out) == _key(SFTConfig(max_steps=20), data, out)


def test_cache_key_changes_with_data_content_and_config(stage):
    data, out = stage
    cfg = SFTConfig(max_steps=20)
    before = _key(cfg, data, out)
    assert _key(cfg.model_copy(update={"learning_rate": 1e-4}), data, out) != before
    data.write_text('{"messages": [1]}\n')  # same path, new content
    changed = _key(cfg, data, out)
    assert changed != before
    data.write_text('{"messages": []}\n')
    assert _key(cfg, data, out) == before


def test_cache_key_changes_with_stage_and_out_dir(stage, tmp_path):
    data, out = stage
    cfg = SFTConfig()
    other = tmp_path / "other"
    other.mkdir()
    (other / "result.json").write_text("{}")
    assert _key(cfg, data, out) != _key(cfg, data, other)
    inputs = SFTInputs(base="micro", data=str(data))
    assert stage_cache_key("sft", cfg, inputs, out) != stage_cache_key("reward-safety", cfg, inputs, out)


def test_cache_refreshed_when_result_json_is_gone(stage):
    data, out = stage
    cfg = SFTConfig()
    done = _key(cfg, data, out)
    assert _key(cfg, data, out) == done
    (out / "result.json").unlink()  # the stage's output was deleted: the old entry must not be served
    running = _key(cfg, data, out)
    assert running != done
    assert _key(cfg, data, out) != running  # every attempt without result.json is a fresh key (a retry re-runs)
    last = (out / CACHE_TOKEN_FILE).read_text()
    (out / "result.json").write_text("{}")  # the re-run finished: its key is the one the next run looks up
    assert _key(cfg, data, out) == _key(cfg, data, out)
    assert (out / CACHE_TOKEN_FILE).read_text() == last


def test_cache_key_for_a_missing_stage_dir_creates_nothing_else(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("x\n")
    out = tmp_path / "fresh"
    key = _key(SFTConfig(), data, out)
    assert key.startswith("sft-")
    assert sorted(p.name for p in out.iterdir()) == [CACHE_TOKEN_FILE]


# --- artifact builders -----------------------------------------------------------------------------------------------

def test_artifact_keys_are_prefect_safe():
    assert artifact_key("sft", "summary") == "sft-summary"
    assert artifact_key("reward-helpfulness", "accuracy") == "reward-helpfulness-accuracy"
    assert artifact_key("Reward_Safety", "curves") == "reward-safety-curves"


def test_accuracy_rows_table8_layout():
    table = {"helpfulness": {"significantly_better": 0.9, "better": 0.7, "slightly_better": None,
                             "negligibly_better": 0.5},
             "safety": {"significantly_better": 1.0, "better": 0.75, "slightly_better": 0.6,
                        "negligibly_better": 0.5}}
    rows = accuracy_rows(table, by_category={"helpfulness": 0.7, "safety": 0.8})
    assert [r["category"] for r in rows] == ["helpfulness", "safety"]
    assert rows[0]["significantly better"] == "90.0" and rows[0]["slightly better"] == "n/a"
    assert rows[1]["avg"] == "80.0"


def test_metrics_rows_flatten_one_level_and_png_uri(tmp_path):
    rows = metrics_rows({"accuracy": 0.81234, "accuracy_by_rating": {"better": 0.5}, "table": {"a": {"b": 1}}})
    assert {"metric": "accuracy", "value": "0.8123"} in rows
    assert {"metric": "accuracy_by_rating.better", "value": "0.5"} in rows
    assert all(r["metric"] != "table" for r in rows)
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n")
    assert png_data_uri(png).startswith("data:image/png;base64,iVBORw0K")
    json.dumps(rows)


# --- the task objects ------------------------------------------------------------------------------------------------

def test_stage_tasks_share_retry_and_cache_options():
    from tasks.common import stage_cache_key_fn
    from tasks.reward import reward_task
    from tasks.sft import sft_task

    for t in (sft_task, reward_task):
        assert t.retries == 2 and t.retry_condition_fn is retry_transient
        assert t.cache_key_fn is stage_cache_key_fn and t.persist_result is True
    assert sft_task.task_run_name == "sft"
    assert reward_task.task_run_name.format(config=preset_config("demo-tiny").reward_safety) == "reward-safety"

"""Experiment tracking's own logic: flattening, settings, the missing-package refusal, failures that stay warnings,
and a stage tracked into a local MLflow SQLite store and TensorBoard files (no server: the integration test has one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama2_align import tracking
from llama2_align.errors import ConfigError
from llama2_align.pipeline import PipelineConfig, resolve
from llama2_align.stages.common import StageResult
from llama2_align.tracking import (MultiTracker, NullTracker, TrackingSettings, default_settings, flatten,
                                   numeric_leaves, open_run, run_link, track_stage)


def test_flatten_and_numeric_leaves():
    tree = {"a": {"b": 1, "c": {"d": "x"}}, "ci": {"violation_rate": [-0.2, -0.1]}, "ok": True, "n": None,
            "bad key!": 2.5, "step": 7, "nan": float("nan"), "long": [1, 2, 3]}
    assert flatten(tree)["a.c.d"] == "x"
    leaves = numeric_leaves(tree)
    assert leaves == {"a.b": 1.0, "ci.violation_rate.lo": -0.2, "ci.violation_rate.hi": -0.1, "ok": 1.0,
                      "bad key_": 2.5}


def test_default_settings_sqlite_under_runs_root(tmp_path):
    s = default_settings(["mlflow", "tensorboard"], tmp_path)
    assert s.uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert s.artifact_root == (tmp_path.resolve() / "mlartifacts").as_uri()
    remote = default_settings(["mlflow"], tmp_path, uri="http://127.0.0.1:5000")
    assert remote.uri == "http://127.0.0.1:5000" and remote.artifact_root is None
    assert default_settings(["tensorboard"], tmp_path).uri is None
    assert not default_settings([], tmp_path).enabled


def test_resolve_refuses_tracking_without_the_package(monkeypatch, tmp_path):
    real = tracking.find_spec
    monkeypatch.setattr(tracking, "find_spec", lambda name: None if name == "mlflow" else real(name))
    with pytest.raises(ConfigError, match=r"mlflow is asked for but the 'mlflow' package is not installed.*"
                                          r"llama2-align\[tracking\]"):
        resolve(PipelineConfig(preset="demo-micro", runs_root=str(tmp_path), tracking=["mlflow"]))
    assert resolve(PipelineConfig(preset="demo-micro", runs_root=str(tmp_path))).tracking.backends == []


def test_tracking_off_is_a_no_op(tmp_path):
    t = open_run(None, "x", tmp_path)
    assert isinstance(t, NullTracker) and t.run_id is None
    with track_stage(TrackingSettings(), "sft", {"a": 1}, tmp_path) as tracked:
        tracked.progress({"step": 1, "metrics": {"loss": 1.0}})
    assert tracked.link is None and not any(tmp_path.iterdir())


class _Broken:
    run_id = None

    def __getattr__(self, name):
        def fail(*args):
            raise OSError("disk full")
        return fail


def test_a_failing_backend_is_a_warning_not_an_error(caplog):
    t = MultiTracker([_Broken()])
    t.log_metrics({"loss": 1.0}, 1)
    t.end()
    assert "log_metrics failed" in caplog.text and "disk full" in caplog.text


@pytest.mark.slow
def test_stage_tracked_into_sqlite_and_tensorboard(tmp_path):
    """A stage run through track_stage: params, per-step and final metrics, files, status; a failure ends FAILED."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = default_settings(["mlflow", "tensorboard"], tmp_path, experiment="unit")
    out = tmp_path / "sft"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    (out / "curves.png").write_bytes(b"\x89PNG fake")
    with track_stage(settings, "sft", {"learning_rate": 3e-3, "lora": {"r": 8}}, out) as tracked:
        for step, loss in [(5, 2.0), (10, 1.5)]:
            tracked.progress({"stage": "sft", "step": step, "total": 10, "metrics": {"step": step, "loss": loss}})
        result = StageResult(stage="sft", out_dir=str(out), metrics={"train_loss_last": 1.5, "n": 3}, steps=10,
                             duration_s=4.0, artifacts={"curves": "curves.png"})
        (out / "result.json").write_text(result.model_dump_json())
        tracked.finish(result)
    client = MlflowClient(tracking_uri=settings.uri)
    run = client.get_run(tracked.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "sft"
    assert run.data.params == {"learning_rate": "0.003", "lora.r": "8"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(5, 2.0), (10, 1.5)]
    assert run.data.metrics["final.train_loss_last"] == 1.5 and run.data.metrics["duration_s"] == 4.0
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"result.json", "metrics.jsonl", "curves.png"}
    assert tracked.link.startswith(f"run `{tracked.run_id}`")
    assert "mlflow ui --backend-store-uri sqlite:" in tracked.link

    acc = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(5, 2.0), (10, 1.5)]
    assert "params/text_summary" in acc.Tags()["tensors"]

    with pytest.raises(RuntimeError):
        with track_stage(settings, "ppo", {}, tmp_path / "ppo") as failed:
            raise RuntimeError("boom")
    assert client.get_run(failed.run_id).info.status == "FAILED"
    assert run_link(settings, None) is None
    assert json.loads(Path(out / "result.json").read_text())["stage"] == "sft"

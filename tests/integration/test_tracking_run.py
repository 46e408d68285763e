"""The demo-micro pipeline with tracking on, against a real ``mlflow server`` on 127.0.0.1 that this test starts (its
own SQLite store and artifact root in tmp) and stops: everything logged is read back through MLflow's client and the
TensorBoard event files through TensorBoard's own reader."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tests.integration.helpers import latest_artifact

pytestmark = pytest.mark.slow

STAGES = {"sft", "reward-helpfulness", "reward-safety", "ppo", "eval"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on a free port of 127.0.0.1 with its own SQLite store and artifact root, in its own process
    group."""

    def __init__(self, root: Path):
        self.root, port = root, _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(root / "server.log", "w")
        cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'store.db'}",
               "--default-artifact-root", str(root / "artifacts")]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})

    def wait_ready(self, timeout_s: float = 240) -> str:
        """The URL once /health answers (the store's migrations take 15-40 s on a busy 2-core machine)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if urllib.request.urlopen(f"{self.url}/health", timeout=2).read() == b"OK":
                    return self.url
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """Started before the Prefect test server (list it first) so the two start-ups overlap; the test waits for it."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        server.stop()



def test_pipeline_tracked_in_mlflow_server_and_tensorboard(mlflow_server, prefect_server, tmp_path):
    import torch
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flows.pipeline import rlhf_pipeline
    from llama2_align.io import read_jsonl
    from llama2_align.pipeline import PipelineConfig, resolve

    torch.set_num_threads(1)
    url = mlflow_server.wait_ready()
    cfg = PipelineConfig(preset="demo-micro", runs_root=str(tmp_path), run_name="tracked",
                         tracking=["mlflow", "tensorboard"], tracking_uri=url, tracking_experiment="it")
    resolved = resolve(cfg)
    state = rlhf_pipeline(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    run_dir = tmp_path / "tracked"
    report = json.loads((run_dir / "report.json").read_text())

    client = MlflowClient(tracking_uri=url)
    runs = client.search_runs([client.get_experiment_by_name("it").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "tracked")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == STAGES and len(runs) == len(STAGES) + 1
    assert all(r.info.status == "FINISHED" for r in runs)

    # params: the resolved config on the pipeline run, each stage's config on its own run
    assert parent.data.params["ppo.kl_beta"] == str(resolved.ppo.kl_beta)
    assert parent.data.params["sft.max_steps"] == str(resolved.sft.max_steps)
    assert children["sft"].data.params["learning_rate"] == str(resolved.sft.learning_rate)
    assert children["ppo"].data.params["iterations"] == str(resolved.ppo.iterations)

    # metrics per step, as the stages logged them in metrics.jsonl
    ppo_id, sft_id = children["ppo"].info.run_id, children["sft"].info.run_id
    logged = read_jsonl(run_dir / "ppo" / "metrics.jsonl")
    history = client.get_metric_history(ppo_id, "reward_combined")
    assert [(m.step, round(m.value, 5)) for m in history] == [(r["step"], round(r["reward_combined"], 5))
                                                              for r in logged]
    assert len(history) == resolved.ppo.iterations
    sft_losses = [r for r in read_jsonl(run_dir / "sft" / "metrics.jsonl") if "loss" in r]
    assert [m.step for m in client.get_metric_history(sft_id, "loss")] == [r["step"] for r in sft_losses]
    assert len(client.get_metric_history(children["reward-safety"].info.run_id, "loss")) >= 2
    # final metrics: the eval run's and the pipeline run's headline are the report's
    final = report["eval"]["ppo"]
    assert children["eval"].data.metrics["final.checkpoints.ppo.violation_rate"] == pytest.approx(
        final["violation_rate"])
    assert parent.data.metrics["eval.ppo.helpfulness_accuracy"] == pytest.approx(final["helpfulness_accuracy"])
    assert parent.data.metrics["eval.ppo.ci.violation_rate.lo"] == pytest.approx(final["ci"]["violation_rate"][0])

    # artifacts: report on the pipeline run, result, metrics and plots on the stage runs
    def files(run_id):
        return {a.path for a in client.list_artifacts(run_id)}

    assert {"report.json", "report.md"} <= files(parent.info.run_id)
    assert {"result.json", "metrics.jsonl", "curves.png", "samples.json"} <= files(ppo_id)
    assert "side_by_side.json" in files(children["eval"].info.run_id)
    local = client.download_artifacts(parent.info.run_id, "report.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text())["eval"]["ppo"]["violation_rate"] == final["violation_rate"]

    # the Prefect summary artifact links the stage's MLflow run
    assert f"{url}/#/experiments/{parent.info.experiment_id}/runs/{ppo_id}" in latest_artifact(
        "ppo-summary")

    # TensorBoard: event files in each stage directory, the same values per step
    acc = EventAccumulator(str(run_dir / "ppo" / "tensorboard")).Reload()
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("reward_combined")] == [
        (r["step"], round(r["reward_combined"], 5)) for r in logged]
    for stage in STAGES:
        assert list((run_dir / stage / "tensorboard").glob("events.out.tfevents.*")), stage
    sft_acc = EventAccumulator(str(run_dir / "sft" / "tensorboard")).Reload()
    assert [e.step for e in sft_acc.Scalars("loss")] == [r["step"] for r in sft_losses]
    top = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert top.Scalars("eval.ppo.violation_rate")[0].value == pytest.approx(final["violation_rate"])

"""Multi-node launch: two torchrun agents on 127.0.0.1, one process each, as two "nodes" of one job (torchrun's c10d
rendezvous, ``LaunchSettings``), run a real SFT stage on the micro preset: node 0 through ``launch_stage``, node 1
through ``llama2-align launch SPEC`` (what the Slurm example runs on every node). Both nodes take part (ranks 0 and
1 of a world of 2), rank 0 alone writes, and both return the same result, shaped like a single-node launch's."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from llama2_align.launch import LaunchSettings, launch_stage, should_launch
from llama2_align.stages.common import load_result
from llama2_align.pipeline import preset_config
from llama2_align.stages.sft import SFTConfig, SFTInputs

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(**launch) -> SFTConfig:
    return SFTConfig.model_validate({**preset_config("demo-tiny").sft.model_dump(), "max_steps": STEPS,
                                     "batch_size": 16, "micro_batch_size": 8, "logging_steps": 1, "eval_steps": 2,
                                     "save_steps": 2,
                                     "num_samples": 1, "sample_max_new_tokens": 4, "progress_bar": False,
                                     "num_processes": 1, "launch": launch})


def test_launch_settings_validation():
    assert LaunchSettings().torchrun_args(4) == ["--standalone", "--nproc_per_node=4"]
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        LaunchSettings(num_nodes=2)
    with pytest.raises(ValueError, match="HOST:PORT"):
        LaunchSettings(num_nodes=2, rdzv_endpoint="node0")
    with pytest.raises(ValueError, match="node_rank"):
        LaunchSettings(num_nodes=2, node_rank=2, rdzv_endpoint="node0:29400")
    two = LaunchSettings(num_nodes=2, node_rank=1, rdzv_endpoint="node0:29400", rdzv_id="job7")
    args = two.torchrun_args(8)
    assert "--standalone" not in args
    assert {"--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=node0:29400",
            "--rdzv_id=job7"} <= set(args)
    assert not any(a.startswith("--node_rank") for a in args)  # c10d hands out the ranks (torchrun ignores it)
    static = LaunchSettings(num_nodes=2, node_rank=1, rdzv_endpoint="node0:29400", rdzv_backend="static")
    assert "--node_rank=1" in static.torchrun_args(8) and "--rdzv_backend=static" in static.torchrun_args(8)
    # one process per node still launches when there are several nodes
    assert should_launch(_config(num_nodes=2, node_rank=0, rdzv_endpoint="127.0.0.1:29400"))
    assert not should_launch(_config())


@pytest.mark.slow
def test_two_nodes_run_one_sft_stage(tmp_path, demo_world_dir, tokenizer_dir):
    port, job = _free_port(), f"test-{uuid.uuid4().hex[:8]}"
    inputs = SFTInputs(base="micro", data=str(demo_world_dir / "sft.jsonl"), tokenizer=str(tokenizer_dir))
    out = tmp_path / "sft"
    results, errors, lines = {}, {}, {0: [], 1: []}

    # node 0 calls the library; node 1 runs `llama2-align launch` on a spec file, as a Slurm task would
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"stage": "sft", "config": _config().model_dump(mode="json"),
                                "inputs": inputs.model_dump(), "out_dir": str(out)}))

    def node(rank: int) -> None:
        try:
            if rank == 0:
                cfg = _config(num_nodes=2, node_rank=0, rdzv_endpoint=f"127.0.0.1:{port}", rdzv_id=job,
                              rdzv_timeout_s=120)
                results[0] = launch_stage("sft", cfg, inputs, out, cfg.num_processes, log=lines[0].append)
                return
            proc = subprocess.run([sys.executable, "-m", "llama2_align.cli", "launch", str(spec), "--num-nodes", "2",
                                   "--node-rank", "1", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", job],
                                  capture_output=True, text=True, timeout=600)
            lines[1].extend(proc.stdout.splitlines())
            if proc.returncode != 0:
                raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-3000:]}")
            results[1] = load_result(out)
        except BaseException as exc:  # reported below
            errors[rank] = exc

    t0 = time.perf_counter()
    threads = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
    for t in threads:  # node 1 a moment later: c10d orders the agents of one host by pid, so node 0 gets rank 0
        t.start()
        time.sleep(1.5)
    for t in threads:
        t.join(timeout=600)
    print(f"2-node SFT ({STEPS} steps) took {time.perf_counter() - t0:.1f}s")
    assert not errors, {r: str(e)[-2000:] for r, e in errors.items()}
    assert results[0] == results[1]
    result = results[0]
    assert result.stage == "sft" and result.steps == STEPS and result.provenance["world_size"] == 2

    # each node ran one process, in one world of 2: ranks 0 and 1, one on each node
    ran = {n: {r for r in (0, 1) if any(f"rank {r} of 2" in line for line in lines[n])} for n in (0, 1)}
    assert ran == {0: {0}, 1: {1}}, ran
    assert lines[0][0].startswith("sft: launching 1 processes on node 0 of 2")
    assert lines[1][0].startswith("sft: launching 1 processes on node 1 of 2")
    assert any(line.startswith("[node1.0] ") for line in lines[1])
    assert lines[1][-1].startswith("sft: done (4 steps, world size 2)")

    # the single-node shape: rank 0 alone wrote, once per step; a checkpoint holds both ranks' RNG states
    assert (out / "final" / "model.safetensors").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert sorted(p.name for p in (out / f"checkpoint-{STEPS}").glob("rng_state*")) == ["rng_state_0.pth",
                                                                                       "rng_state_1.pth"]
    assert sorted(p.name for p in (out / ".launch" / "logs").iterdir()) == ["node0", "node1"]


FAKE_SRUN = """#!/bin/bash
# stands in for Slurm's srun on one machine: the command once per node of $SLURM_NNODES, SLURM_NODEID set
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); sleep 1.5; done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""


@pytest.mark.slow
def test_the_slurm_example_runs_a_stage_on_two_nodes(tmp_path, demo_world_dir, tokenizer_dir):
    """deployments/slurm/llama2-align.sbatch, run by bash with srun and scontrol stood in for (two "nodes" on
    127.0.0.1, one GPU-less process each)."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out = tmp_path / "sft"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"stage": "sft", "config": _config().model_dump(mode="json"),
                                "inputs": {"base": "micro", "data": str(demo_world_dir / "sft.jsonl"),
                                           "tokenizer": str(tokenizer_dir)},
                                "out_dir": str(out)}))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[0-1]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "1", "RDZV_PORT": str(_free_port()),
           "PY": sys.executable, "LLAMA2_ALIGN_ROOT": str(root)}
    proc = subprocess.run(["bash", str(root / "deployments" / "slurm" / "llama2-align.sbatch"), str(spec)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rendezvous 127.0.0.1:" in proc.stdout
    assert proc.stdout.count("sft: done (4 steps, world size 2)") == 2  # both nodes' tasks report the result
    result = load_result(out)
    assert result.provenance["world_size"] == 2 and result.steps == STEPS

"""Orchestration overhead: the demo pipeline under Prefect against the same stage functions called directly.

Both sides run in a fresh process each, in a fresh runs directory, with the same resolved configs
(``llama2_align.pipeline.resolve(PipelineConfig(preset=...))``), the same demo data and tokenizer:
- Prefect: ``flows.pipeline.rlhf_pipeline(PipelineConfig(preset=..., runs_root=<tmp>))`` with a temporary
  PREFECT_HOME (Prefect starts its ephemeral API server itself; that start-up is part of the overhead measured).
  Note: the flow runs the two reward models concurrently in a process pool; the direct side runs them one after the
  other, as a plain script would.
- direct: demo data + tokenizer, ``run_sft``, ``run_reward`` x2, ``run_ppo``, ``run_eval`` in one process.
Printed: both wall times (process start to exit, and the pipeline alone), the Prefect/direct ratio.

    python bench/overhead.py [--preset demo-micro]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PREFECT_SIDE = r"""
import json, sys, time
t0 = time.perf_counter()
from flows.pipeline import rlhf_pipeline
from llama2_align.pipeline import PipelineConfig
t1 = time.perf_counter()
rlhf_pipeline(PipelineConfig(preset=sys.argv[1], run_name="bench", runs_root=sys.argv[2]))
t2 = time.perf_counter()
print("BENCH " + json.dumps({"import_s": t1 - t0, "pipeline_s": t2 - t1}))
"""

DIRECT_SIDE = r"""
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
from llama2_align.demo_world import DemoSizes, generate_demo_world, write_demo_datasets
from llama2_align.pipeline import PipelineConfig, resolve
from llama2_align.stages.evaluate import EvalInputs, run_eval
from llama2_align.stages.ppo import PPOInputs, run_ppo
from llama2_align.stages.reward import RewardInputs, run_reward
from llama2_align.stages.sft import SFTInputs, run_sft
from llama2_align.tokenizer import train_tokenizer
t1 = time.perf_counter()
cfg = resolve(PipelineConfig(preset=sys.argv[1], run_name="bench", runs_root=sys.argv[2]))
run = Path(cfg.run_dir)
sizes = DemoSizes.micro() if cfg.data.demo_sizes == "micro" else DemoSizes()
data = {k: str(v) for k, v in write_demo_datasets(run / "data", cfg.data.demo_seed, sizes).items()}
tok = run / "tokenizer"
train_tokenizer(generate_demo_world(cfg.data.demo_seed, sizes).corpus_texts(), tok, cfg.data.vocab_size,
                seed=cfg.data.demo_seed)
sft = run_sft(cfg.sft, SFTInputs(base=cfg.base_model, data=data["sft"], tokenizer=str(tok)), run / "sft")
sft_final = sft["final"] if isinstance(sft, dict) else sft.final
rms = {}
for kind, rcfg in (("helpfulness", cfg.reward_helpfulness), ("safety", cfg.reward_safety)):
    r = run_reward(rcfg, RewardInputs(sft_model=sft_final, data=data["preference"]), run / f"reward-{kind}")
    rms[kind] = r["final"] if isinstance(r, dict) else r.final
ppo = run_ppo(cfg.ppo, PPOInputs(policy=sft_final, reward_helpfulness=rms["helpfulness"],
                                 reward_safety=rms["safety"], prompts=data["prompts"]), run / "ppo")
ppo_final = ppo["final"] if isinstance(ppo, dict) else ppo.final
run_eval(cfg.eval, EvalInputs(checkpoints={"sft": sft_final, "ppo": ppo_final}, baseline="sft", prompts=data["eval"],
                              reward_helpfulness=rms["helpfulness"], reward_safety=rms["safety"]), run / "eval")
t2 = time.perf_counter()
print("BENCH " + json.dumps({"import_s": t1 - t0, "pipeline_s": t2 - t1}))
"""


def _run(code: str, preset: str, env: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-runs-") as runs:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, preset, runs], cwd=ROOT, env=env, capture_output=True,
                              text=True)
        wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"benchmark side failed (exit {proc.returncode})")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")][-1]
    return {"process_s": wall, **json.loads(line[6:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo-micro")
    ap.add_argument("--only", choices=["prefect", "direct"], default=None)
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import print_table

    base_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    results = {}
    migration_s = 0.0
    if args.only in (None, "direct"):
        results["direct (stage functions, one process)"] = _run(DIRECT_SIDE, args.preset, base_env)
    if args.only in (None, "prefect"):
        with tempfile.TemporaryDirectory(prefix="bench-prefect-home-") as home:
            env = {**base_env, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   # a loaded machine can take longer than Prefect's default 20 s to start the ephemeral server
                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
            env.pop("PREFECT_API_URL", None)
            # The database is migrated once per PREFECT_HOME (`make demo` keeps it in .prefect/): a one-off cost,
            # timed and shown apart, not part of every run's overhead.
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], env=env,
                           cwd=ROOT, capture_output=True, check=True)
            migration_s = time.perf_counter() - t
            results["Prefect (rlhf_pipeline flow)"] = _run(PREFECT_SIDE, args.preset, env)
    rows = [[k, v["process_s"], v["import_s"], v["pipeline_s"]] for k, v in results.items()]
    if len(results) == 2:
        d, p = results.values()
        rows.append(["ratio Prefect / direct", f"{p['process_s'] / d['process_s']:.2f}x",
                     f"{p['import_s'] / d['import_s']:.2f}x", f"{p['pipeline_s'] / d['pipeline_s']:.2f}x"])
    print_table(f"pipeline preset {args.preset}: wall time (s)", ["run", "process", "imports", "pipeline"], rows)
    if args.only in (None, "prefect"):
        print(f"\none-off Prefect database migration of a new PREFECT_HOME (not in the figures above): "
              f"{migration_s:.1f} s")


if __name__ == "__main__":
    main()

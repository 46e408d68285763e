"""Orchestration overhead: the demo pipeline under Prefect against the same stage functions called directly.

Both sides run in a fresh process each, in a fresh runs directory, with the same resolved configs
(``llama2_align.pipeline.resolve(PipelineConfig(preset=...))``), the same demo data and tokenizer:
- Prefect: ``python -m flows.cli run --preset <preset>``, the command ``make demo`` runs, with the Makefile's
  Prefect environment (a PREFECT_HOME whose database is migrated beforehand, as ``make demo`` leaves it after its
  first run; the local API server is started by the command itself; run logs to the API at INFO, the console at
  WARNING);
- direct: demo data + tokenizer, ``run_sft``, ``run_reward`` x2, ``run_ppo``, ``run_eval`` in one plain process.
The figure is the wall time of each process, start to exit (what a user waits for). With ``--repeat N`` the sides
alternate N times and the medians are compared (this machine's timings vary by several percent run to run).

    python bench/overhead.py [--preset demo-tiny] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

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


def _run(argv_for, env: dict) -> float:
    """Wall time of one side's process, start to exit; ``argv_for(runs_dir)`` is its command line."""
    with tempfile.TemporaryDirectory(prefix="bench-runs-") as runs:
        t = time.perf_counter()
        proc = subprocess.run(argv_for(runs), cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"benchmark side failed (exit {proc.returncode})")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo-tiny")
    ap.add_argument("--repeat", type=int, default=1, help="runs per side, alternating; medians compared")
    ap.add_argument("--only", choices=["prefect", "direct"], default=None)
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import print_table

    base_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    base_env.pop("PREFECT_API_URL", None)
    runs: dict[str, list[float]] = {"direct": [], "prefect": []}
    with tempfile.TemporaryDirectory(prefix="bench-prefect-home-") as home:
        # the Makefile's environment for `make demo`
        env = {**base_env, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
               "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING"}
        migration_s = None
        if args.only in (None, "prefect"):
            # The database is migrated once per PREFECT_HOME (`make demo` keeps it in .prefect/): a one-off cost,
            # timed and shown apart, not part of every run's overhead.
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], env=env,
                           cwd=ROOT, capture_output=True, check=True)
            migration_s = time.perf_counter() - t
        for i in range(args.repeat):
            if args.only in (None, "direct"):
                runs["direct"].append(_run(lambda r: [sys.executable, "-c", DIRECT_SIDE, args.preset, r], base_env))
                print(f"run {i + 1}: direct {runs['direct'][-1]:.1f} s", flush=True)
            if args.only in (None, "prefect"):
                runs["prefect"].append(_run(lambda r: [sys.executable, "-m", "flows.cli", "run", "--preset",
                                                       args.preset, "--runs-root", r], env))
                print(f"run {i + 1}: prefect {runs['prefect'][-1]:.1f} s", flush=True)
    names = {"direct": "direct: the stage functions in one process",
             "prefect": "Prefect: `llama2-align run` (what `make demo` runs)"}
    rows = [[names[k], statistics.median(v), ", ".join(f"{x:.1f}" for x in v)] for k, v in runs.items() if v]
    if runs["direct"] and runs["prefect"]:
        d, p = statistics.median(runs["direct"]), statistics.median(runs["prefect"])
        rows.append(["ratio Prefect / direct (medians)", f"{p / d:.3f}x", f"overhead {p - d:+.1f} s "
                     f"({(p - d) / d:+.1%})"])
    print_table(f"pipeline preset {args.preset}: process wall time, start to exit (s)",
                ["run", "median", "every run"], rows)
    if migration_s is not None:
        print(f"\none-off Prefect database migration of a new PREFECT_HOME (not in the figures above): "
              f"{migration_s:.1f} s")


if __name__ == "__main__":
    main()

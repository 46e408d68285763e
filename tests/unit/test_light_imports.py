"""A config mistake is refused before the ML stack loads: the configs, their validation and the pre-flight import no
torch, transformers, peft, TRL, datasets or bitsandbytes (those load in the functions that train and generate).
Importing them took ~8 s on a 2-core machine, so ``llama2-align run --set sft.epochz=3`` took 10 s to say "no field
'epochz'"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate", "sentencepiece")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "import llama2_align.pipeline",
    "from llama2_align.pipeline import PipelineConfig, resolve; resolve(PipelineConfig())",
    "import llama2_align.preflight, llama2_align.rounds, llama2_align.sweep, llama2_align.seeds",
    "from llama2_align.rounds import RoundsConfig, resolve_rounds; resolve_rounds(RoundsConfig())",
    "import llama2_align.stages.sft, llama2_align.stages.reward, llama2_align.stages.ppo, "
    "llama2_align.stages.rejection_sampling, llama2_align.stages.evaluate, llama2_align.stages.gatt, "
    "llama2_align.stages.context_distillation, llama2_align.stages.adherence, llama2_align.stages.collect, "
    "llama2_align.stages.export",
])
def test_configs_load_without_the_ml_stack(code):
    assert _loaded_after(code) == []


def test_a_config_typo_is_refused_naming_the_field(tmp_path):
    """The command line end to end: a misspelt override exits 2 naming the field, nothing written (how long it takes
    is a figure, not a test: README, "Before a run starts")."""
    exe = Path(sys.executable).with_name("llama2-align")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]
    out = subprocess.run([*cmd, "run", "--runs-root", str(tmp_path), "--set", "sft.epochz=3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2, out.stderr
    assert "sft has no field 'epochz'" in out.stderr
    assert not list(tmp_path.iterdir())  # nothing written

"""The pipeline's one typed config: a named preset plus overrides, resolved into every stage's settings.

``PipelineConfig`` is what a person fills in (the Prefect UI renders it as a form: the preset is a drop-down,
overrides are ``"section.field": value`` pairs). :func:`resolve` turns it into a :class:`ResolvedPipeline` with
every stage's full config, which is what the flow runs and what result.json files record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from .model import LoraSettings
from .stages.evaluate import EvalConfig, eval_config_for
from .stages.ppo import PPOConfig, ppo_config_for
from .stages.reward import RewardConfig, reward_config_for
from .stages.sft import SFTConfig, sft_config_for

PipelinePreset = Literal["demo-tiny", "demo-micro", "llama2-7b-lora", "llama2-7b", "llama2-13b-lora",
                         "llama2-70b-lora"]
PIPELINE_PRESETS: tuple[str, ...] = PipelinePreset.__args__  # type: ignore[attr-defined]


class DataSettings(BaseModel):
    """Where the data comes from: the built-in demo world (default) or your own files (see data_specs/)."""

    source: Literal["demo", "files"] = "demo"
    demo_seed: int = 0
    demo_sizes: Literal["default", "micro"] = "default"
    vocab_size: int = Field(1024, ge=300, description="demo tokenizer vocabulary")
    sft: str | None = None
    preferences: str | None = None
    prompts: str | None = None
    eval: str | None = None
    tokenizer: str | None = Field(None, description="files only; default: the base checkpoint's own tokenizer")


class RejectionSamplingSettings(BaseModel):
    """Optional rejection-sampling fine-tuning between SFT and PPO (the paper's order: SFT -> RS -> PPO)."""

    enabled: bool = False
    k: int = Field(4, ge=1)
    temperature: float = Field(1.0, gt=0)
    max_prompts: int | None = None


class ResolvedPipeline(BaseModel):
    preset: str
    run_dir: str
    base_model: str
    data: DataSettings
    sft: SFTConfig
    reward_helpfulness: RewardConfig
    reward_safety: RewardConfig
    rejection_sampling: RejectionSamplingSettings
    ppo: PPOConfig
    eval: EvalConfig


class PipelineConfig(BaseModel):
    """Run the Llama 2 alignment recipe. Pick a preset; override any field as ``"section.field": value``."""

    preset: PipelinePreset = Field("demo-tiny", description="named defaults for every stage")
    run_name: str = Field("demo", pattern=r"^[A-Za-z0-9._-]+$", description="the run directory's name")
    runs_root: str = Field(default_factory=lambda: os.environ.get("LLAMA2_ALIGN_RUNS_ROOT", "runs"),
                           description="run directories are <runs_root>/<run_name> (default: $LLAMA2_ALIGN_RUNS_ROOT "
                                       "or ./runs)")
    base_model: str | None = Field(None, description="a model preset or a local HF/Meta checkpoint directory")
    data: DataSettings | None = None
    rejection_sampling: bool | None = Field(None, description="run SFT -> RS -> PPO instead of SFT -> PPO")
    concurrent_reward_models: bool | None = Field(
        None, description="train both reward models at once (default: on a GPU machine or a CPU with >= 8 cores)")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description='e.g. {"ppo.iterations": 50, "sft.learning_rate": 1e-5}')


def model_size(preset: str) -> str:
    """The model size a pipeline preset runs (``demo-tiny`` -> ``tiny``, ``llama2-7b-lora`` -> ``llama2-7b``)."""
    return {"demo-tiny": "tiny", "demo-micro": "micro"}.get(preset, preset.removesuffix("-lora"))


def preset_defaults(preset: str) -> dict:
    """Every stage's settings for a named pipeline preset."""
    if preset not in PIPELINE_PRESETS:
        raise ValueError(f"unknown pipeline preset {preset!r}: expected one of {', '.join(PIPELINE_PRESETS)}")
    size = model_size(preset)
    lora = preset.endswith("-lora")
    sft = sft_config_for(size)
    rh, rs = reward_config_for(size, "helpfulness"), reward_config_for(size, "safety")
    ppo = ppo_config_for(size)
    ev = eval_config_for(size)
    data = DataSettings()
    base = size if size in ("tiny", "micro", "small") else f"/models/{preset.removesuffix('-lora')}-hf"
    if lora:
        lora_cfg = LoraSettings(enabled=True, r=16, alpha=32)
        sft, rh, rs = (c.model_copy(update={"lora": lora_cfg}) for c in (sft, rh, rs))
        ppo = ppo.model_copy(update={"lora": lora_cfg})
        if preset == "llama2-70b-lora":
            # The memory plan (llama2-align plan): even on 8 x 80 GiB, PPO's five 70B roles fit only with the policy's
            # and the value model's bases in 4 bits (QLoRA); the reward models stay bf16.
            ppo = ppo.model_copy(update={"lora": lora_cfg.model_copy(update={"quantize": "nf4"})})
    else:
        ppo = ppo.model_copy(update={"lora": LoraSettings(enabled=False)})
    if preset == "demo-micro":
        data = DataSettings(demo_sizes="micro", vocab_size=400)
        sft = sft.model_copy(update={"max_steps": 30, "eval_steps": 10, "save_steps": 10, "logging_steps": 5,
                                     "num_samples": 3, "progress_bar": False})
        rh, rs = (c.model_copy(update={"max_steps": 8, "eval_steps": 4, "save_steps": 4, "logging_steps": 2,
                                       "progress_bar": False}) for c in (rh, rs))
        ppo = ppo.model_copy(update={"iterations": 3, "prompts_per_iteration": 16, "mini_batch_size": 16,
                                     "micro_batch_size": 16, "max_new_tokens": 12, "save_every": 2,
                                     "sample_every": 1, "num_samples": 3})
        ev = ev.model_copy(update={"max_new_tokens": 12, "samples_per_prompt": 1, "max_prompts": 30})
    if preset == "demo-tiny":
        sft = sft.model_copy(update={"progress_bar": False})
        rh, rs = (c.model_copy(update={"progress_bar": False}) for c in (rh, rs))
    return dict(base_model=base, data=data, sft=sft, reward_helpfulness=rh, reward_safety=rs, ppo=ppo, eval=ev,
                rejection_sampling=RejectionSamplingSettings())


def parse_override(item: str) -> tuple[str, Any]:
    """``"ppo.iterations=50"`` -> ("ppo.iterations", 50). Values are read as JSON when they parse, else text."""
    if "=" not in item:
        raise ValueError(f"override {item!r}: expected key=value, e.g. ppo.iterations=50")
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _set_path(tree: dict, dotted: str, value: Any, known: dict) -> None:
    parts = dotted.split(".")
    node, ref = tree, known
    for i, part in enumerate(parts):
        if not isinstance(ref, dict) or part not in ref:
            where = ".".join(parts[:i]) or "the pipeline config"
            options = ", ".join(sorted(ref)) if isinstance(ref, dict) else "(not a section)"
            raise ValueError(f"override {dotted!r}: {where} has no field {part!r}; expected one of: {options}")
        if i == len(parts) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {}) if isinstance(node.get(part), dict) else node[part]
            ref = ref[part]


def resolve(config: PipelineConfig) -> ResolvedPipeline:
    """Preset defaults, then the explicit fields, then the overrides; validated as a whole."""
    d = preset_defaults(config.preset)
    tree: dict = {k: (v.model_dump() if isinstance(v, BaseModel) else v) for k, v in d.items()}
    tree["preset"] = config.preset
    tree["run_dir"] = str(Path(config.runs_root) / config.run_name)
    if config.base_model is not None:
        tree["base_model"] = config.base_model
    if config.data is not None:
        tree["data"] = config.data.model_dump()
    if config.rejection_sampling is not None:
        tree["rejection_sampling"]["enabled"] = config.rejection_sampling
    known = json.loads(json.dumps(tree, default=str))
    for key, value in config.overrides.items():
        _set_path(tree, key, value, known)
    tree["reward_helpfulness"]["kind"] = "helpfulness"
    tree["reward_safety"]["kind"] = "safety"
    resolved = ResolvedPipeline.model_validate(tree)
    if resolved.data.source == "files":
        missing = [k for k in ("sft", "preferences", "prompts", "eval") if not getattr(resolved.data, k)]
        if missing:
            raise ValueError(f"data.source is 'files' but no path is set for: {', '.join('data.' + m for m in missing)}")
    return resolved


def load_config_file(path: str | Path) -> dict:
    """A JSON or YAML file holding PipelineConfig fields."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)

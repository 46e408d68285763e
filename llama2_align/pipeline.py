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

from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError
from .presets import PRESETS
from .stages.adherence import AdherenceConfig
from .stages.context_distillation import ContextDistillationConfig
from .stages.evaluate import EvalConfig
from .stages.export import ExportConfig
from .stages.gatt import GAttConfig
from .stages.ppo import PPOConfig
from .stages.rejection_sampling import RejectionSamplingConfig
from .stages.reward import RewardConfig
from .stages.sft import SFTConfig
from .tracking import DEFAULT_EXPERIMENT, Backend, TrackingSettings, default_settings

PipelinePreset = Literal["demo-tiny", "demo-micro", "llama2-7b-lora", "llama2-7b", "llama2-13b-lora",
                         "llama2-70b-lora"]
PIPELINE_PRESETS: tuple[str, ...] = PipelinePreset.__args__  # type: ignore[attr-defined]
# The stages a run can take from another run directory (``PipelineConfig.shared_from``): what a sweep's trials share.
SHARED_STAGES = ("data", "sft", "reward-helpfulness", "reward-safety")
assert set(PIPELINE_PRESETS) == set(PRESETS), "presets.py and PipelinePreset name the same presets"


#: In ``<run>/data/``: the settings the demo data and tokenizer there were written with (the pre-flight compares them).
DEMO_DATA_RECORD = "demo_settings.json"


def demo_data_record(seed: int, sizes: str, vocab_size: int, dialogues: bool, preprompts: bool,
                     evasive: bool) -> dict:
    """What decides the demo world's data and tokenizer in a run directory, as ``data.*`` field names."""
    return {"demo_seed": seed, "demo_sizes": sizes, "vocab_size": vocab_size, "demo_dialogues": bool(dialogues),
            "demo_preprompts": bool(preprompts), "demo_evasive_pairs": bool(evasive)}


class DataSettings(BaseModel):
    """Where the data comes from: the built-in demo world (default) or your own files (see data_specs/)."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["demo", "files"] = "demo"
    demo_seed: int = 0
    demo_sizes: Literal["default", "micro"] = "default"
    vocab_size: int = Field(1024, ge=300, description="demo tokenizer vocabulary")
    sft: str | None = None
    preferences: str | list[str] | None = Field(
        None, description="one file or several (e.g. HH-RLHF's helpful pairs and PKU-SafeRLHF's safety pairs)")
    prompts: str | None = None
    eval: str | None = None
    tokenizer: str | None = Field(None, description="files only; default: the base checkpoint's own tokenizer")
    instruction_demos: str | None = Field(
        None, description="files only: single-turn SFT records under a system instruction that GAtt's warm-up "
                          "fine-tunes the policy on before it samples (gatt.demonstrations; the demo world writes "
                          "its own)")
    # GAtt and context distillation: the demo world's extra SFT demonstrations (llama2_align/demo_dialogues.py)
    demo_dialogues: bool | None = Field(None, description="demo only: add instruction and multi-turn SFT "
                                                          "demonstrations (default: when gatt is enabled)")
    demo_preprompts: bool | None = Field(None, description="demo only: add safety-preprompt SFT demonstrations "
                                                           "(default: when context_distillation is enabled)")
    demo_evasive_pairs: bool | None = Field(
        None, description="demo only: safety pairs that reject an evasive answer (an answer to another question) to "
                          "an adversarial prompt (default: when gatt or context_distillation is enabled)")


class ResolvedPipeline(BaseModel):
    """Every stage's full config: what the flow runs and what the stages' result.json files record."""

    model_config = ConfigDict(extra="forbid")

    preset: str
    run_dir: str
    base_model: str
    data: DataSettings = Field(default_factory=DataSettings)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    reward_helpfulness: RewardConfig = Field(default_factory=lambda: RewardConfig(kind="helpfulness"))
    reward_safety: RewardConfig = Field(default_factory=lambda: RewardConfig(kind="safety"))
    rejection_sampling: RejectionSamplingConfig = Field(default_factory=RejectionSamplingConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    # where the upstream stages (data, tokenizer, SFT, reward models) live: run_dir, or a shared run's (sweeps)
    shared_dir: str | None = None
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)

    def upstream_dir(self) -> str:
        return self.shared_dir or self.run_dir
    # after RLHF (off by default): context distillation after PPO, then GAtt; the multi-turn evaluation
    context_distillation: ContextDistillationConfig = Field(default_factory=ContextDistillationConfig)
    gatt: GAttConfig = Field(default_factory=GAttConfig)
    adherence: AdherenceConfig = Field(default_factory=AdherenceConfig)

    def runs_adherence(self) -> bool:
        """The multi-turn evaluation runs whenever GAtt does, or on its own switch."""
        return self.gatt.enabled or self.adherence.enabled


class PipelineConfig(BaseModel):
    """Run the Llama 2 alignment recipe. Pick a preset; override any field as ``"section.field": value``."""

    model_config = ConfigDict(extra="forbid")

    preset: PipelinePreset = Field("demo-tiny", description="named defaults for every stage")
    run_name: str = Field("demo", pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$",
                          description="the run directory's name: letters, digits, '.', '_', '-'; not starting with '.'")
    runs_root: str = Field(default_factory=lambda: os.environ.get("LLAMA2_ALIGN_RUNS_ROOT", "runs"),
                           description="run directories are <runs_root>/<run_name> (default: $LLAMA2_ALIGN_RUNS_ROOT "
                                       "or ./runs)")
    base_model: str | None = Field(None, description="a model preset or a local HF/Meta checkpoint directory")
    data: DataSettings | None = None
    rejection_sampling: bool | None = Field(None, description="run SFT -> RS -> PPO instead of SFT -> PPO")
    export: bool | None = Field(None, description="export the final policy (HF directory and GGUF file) at the end")
    context_distillation: bool | None = Field(None, description="after PPO: safety context distillation")
    gatt: bool | None = Field(None, description="after RLHF: Ghost Attention, and the multi-turn evaluation")
    concurrent_reward_models: bool | None = Field(
        None, description="train both reward models at once (default: on a GPU machine or a CPU with >= 8 cores)")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description='e.g. {"ppo.iterations": 50, "sft.learning_rate": 1e-5}')
    # --- experiment tracking and shared upstream stages (README: "Experiment tracking", "Sweeps") ---
    tracking: list[Backend] = Field(default_factory=list, description="log params, metrics and artifacts to mlflow "
                                    "and/or tensorboard (needs the [tracking] extra)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: sqlite:///<runs_root>/mlflow.db)")
    tracking_experiment: str | None = Field(None, description="MLflow experiment (default: llama2-align)")
    shared_from: str | None = Field(None, description="a run directory whose data, tokenizer, SFT and reward models "
                                                      "this run uses and writes (sweeps share them); default: its own")


def parse_override(item: str) -> tuple[str, Any]:
    """``"ppo.iterations=50"`` -> ("ppo.iterations", 50). Values are read as JSON when they parse, else text."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. ppo.iterations=50")
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
        if not isinstance(ref, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:i])} is a field, not a section: it has no "
                              f"{part!r}")
        if part not in ref:
            where = ".".join(parts[:i]) or "the pipeline config"
            raise ConfigError(f"override {dotted!r}: {where} has no field {part!r}; expected one of: "
                              f"{', '.join(sorted(ref))}")
        if i == len(parts) - 1:
            if (i == 0 and isinstance(ref[part], dict)) or dotted in SEEDED_SECTIONS:  # a stage's whole section
                if not isinstance(value, dict):
                    raise ConfigError(f"override {dotted!r}: {dotted} is a section, not a field: set one of its "
                                      f"fields ({dotted}.<field>=...) or give it an object, e.g. "
                                      f"{dotted}={{\"seed\": 1}}")
                for key, item in value.items():  # an object sets those fields and keeps the others
                    _set_path(tree, f"{dotted}.{key}", item, known)
                return
            node[part] = value
        else:
            node = node.setdefault(part, {}) if isinstance(node.get(part), dict) else node[part]
            ref = ref[part]


#: The sections whose ``seed`` follows the demo world's seed.
SEEDED_SECTIONS = ("sft", "reward_helpfulness", "reward_safety", "rejection_sampling", "rejection_sampling.sft", "ppo",
                   "eval", "context_distillation", "context_distillation.sft", "gatt", "gatt.sft", "adherence")


def _derive_seeds(tree: dict, overrides: dict) -> None:
    """On the demo world, every stage's seed (model initialisation, data order, sampling) is its preset seed plus
    ``data.demo_seed``, so ``data.demo_seed=N`` is a whole independent run, and seed 0 is the preset as it is. A seed
    set explicitly (``--set ppo.seed=7``) is kept."""
    offset = int(tree["data"]["demo_seed"])
    for section in SEEDED_SECTIONS:
        node = tree
        for part in section.split("."):
            node = node[part]
        if f"{section}.seed" not in overrides:
            node["seed"] = int(node["seed"]) + offset


def _defaults() -> dict:
    """The paper's recipe: every stage config's own defaults, as a tree of plain values."""
    return ResolvedPipeline(preset="", run_dir="", base_model="").model_dump(
        exclude={"preset", "run_dir", "shared_dir", "tracking"})


def resolve(config: PipelineConfig) -> ResolvedPipeline:
    """Stage defaults, then the preset's overrides, then the explicit fields, then the overrides; validated whole."""
    tree = _defaults()
    known = json.loads(json.dumps(tree, default=str))
    for key, value in PRESETS[config.preset].items():
        _set_path(tree, key, value, known)
    tree["preset"] = config.preset
    tree["run_dir"] = str(Path(config.runs_root) / config.run_name)
    if config.base_model is not None:
        tree["base_model"] = config.base_model
    if config.data is not None:
        tree["data"] = config.data.model_dump()
    if config.rejection_sampling is not None:
        tree["rejection_sampling"]["enabled"] = config.rejection_sampling
    if config.export is not None:
        tree["export"]["enabled"] = config.export
    for flag in ("context_distillation", "gatt"):
        if getattr(config, flag) is not None:
            tree[flag]["enabled"] = getattr(config, flag)
    for key, value in config.overrides.items():
        _set_path(tree, key, value, known)
    _resolve_post_rlhf(tree)
    if tree["data"]["source"] == "demo":
        _derive_seeds(tree, config.overrides)
    tree["shared_dir"] = config.shared_from
    tree["tracking"] = default_settings(config.tracking, config.runs_root, config.tracking_uri,
                                        config.tracking_experiment or DEFAULT_EXPERIMENT)
    tree["reward_helpfulness"]["kind"] = "helpfulness"
    tree["reward_safety"]["kind"] = "safety"
    resolved = ResolvedPipeline.model_validate(tree)
    if resolved.data.source == "files":
        missing = [k for k in ("sft", "preferences", "prompts", "eval") if not getattr(resolved.data, k)]
        if missing:
            raise ConfigError(f"data.source is 'files' but no path is set for: "
                              f"{', '.join('data.' + m for m in missing)}")
    return resolved


def _resolve_post_rlhf(tree: dict) -> None:
    """What GAtt and context distillation imply when left unset: the demo world's extra SFT demonstrations they
    need (instruction and multi-turn dialogues for GAtt, safety preprompts for context distillation), and SFT
    batches grouped by length when the long dialogues are in its data."""
    data = tree["data"]
    if data.get("demo_dialogues") is None:
        data["demo_dialogues"] = bool(tree["gatt"]["enabled"])
    if data.get("demo_preprompts") is None:
        data["demo_preprompts"] = bool(tree["context_distillation"]["enabled"])
    if data.get("demo_evasive_pairs") is None:
        # their SFT data teach the policy to answer off-topic, and without these pairs PPO hacked the safety RM with
        # it (README, "What the demo shows with both stages on"); the default pipeline keeps the world as measured
        data["demo_evasive_pairs"] = bool(tree["gatt"]["enabled"] or tree["context_distillation"]["enabled"])
    if tree["sft"].get("group_by_length") is None:
        tree["sft"]["group_by_length"] = data["source"] == "demo" and data["demo_dialogues"]


def preset_config(preset: str) -> ResolvedPipeline:
    """A preset resolved with no other change (``preset_config("demo-tiny").ppo`` is the demo's PPO config)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown pipeline preset {preset!r}: expected one of {', '.join(PIPELINE_PRESETS)}")
    return resolve(PipelineConfig(preset=preset))


def load_config_file(path: str | Path) -> dict:
    """A JSON or YAML file holding PipelineConfig fields. A syntax error is refused with the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: is a directory; expected a JSON or YAML config file" if path.is_dir()
                          else f"{path}: no such config file")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            context, opened = getattr(err, "context", None), getattr(err, "context_mark", None)
            # an unclosed bracket is found at the end of the file: say where it was opened
            since = f" ({context} opened at line {opened.line + 1}, column {opened.column + 1})" \
                if context and opened is not None else ""
            raise ConfigError(f"{path}{where}: not valid YAML: {getattr(err, 'problem', None) or err}{since}") \
                from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{err.lineno}:{err.colno}: not valid JSON: {err.msg}") from None
    if not isinstance(data, dict):  # an empty YAML file (or only comments) is None: likely the wrong file
        got = "an empty file" if data is None else type(data).__name__
        raise ConfigError(f"{path}: expected a mapping of pipeline fields (preset, run_name, data, overrides, ...), "
                          f"got {got} ({{}} for the defaults)")
    return data

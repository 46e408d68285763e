"""The pre-flight: everything about a pipeline run that can be checked before any stage runs, in one place.

The command line (``llama2-align run``), the ``rlhf-pipeline`` flow (so also a deployment started from the Prefect
UI) and the other flows built on the pipeline call :func:`preflight` first; ``llama2-align rounds`` and the
``rlhf-rounds`` flow call :func:`preflight_rounds` (round 0's pipeline, the rounds' prompts and state). It writes
nothing: a refused run leaves no run directory behind. What it checks:

- the whole config: unknown fields at every level and bad values (``pipeline.resolve``; config files, ``--set`` and
  the Prefect form all arrive as a ``PipelineConfig``, which refuses unknown fields);
- where the run writes: the run name, and the run directory inside the runs root;
- every input path: the base checkpoint (a preset or a model directory of a known kind), the tokenizer, the data
  files (each exists and is a file);
- every data file against its contract (``data.read_records``: every bad record as ``file:line: field: ...``), the
  preference data holding pairs of both categories, and one judge for the eval records (``evaluate.judge_kind``);
- settings that cannot work together (PPO prompts that do not divide among its processes);
- a run directory whose finished stages were run with other settings (a changed ``--set`` on an existing run name):
  refused with the stage and the fields named, before anything runs (the stage frame would refuse it later);
- on GPUs, the memory plan (``llama2-align plan``): a run whose stages cannot fit is refused with the numbers.

Problems are collected, not stopped at the first, and raised as one error: a :class:`ConfigError` when any of them
is about the config itself (the command line exits 2), else an :class:`InputError` (exit 1).
"""

from __future__ import annotations

import json
from pathlib import Path

from .data import DataValidationError, read_records
from .errors import ConfigError, InputError
from .pipeline import PipelineConfig, ResolvedPipeline, resolve

MAX_SHOWN_ISSUES = 20  # bad records listed per data file (the count says how many more)

DATA_KINDS = {"sft": "sft", "preferences": "preference", "prompts": "prompts", "eval": "eval",
              "instruction_demos": "sft"}


class Problems:
    """The problems found, each a usage problem (the config) or an input problem (files, data)."""

    def __init__(self):
        self.usage: list[str] = []
        self.inputs: list[str] = []

    def raise_if_any(self) -> None:
        if not (self.usage or self.inputs):
            return
        lines = self.usage + self.inputs
        head = "the run was refused before any stage ran" + (f" ({len(lines)} problems)" if len(lines) > 1 else "")
        raise (ConfigError if self.usage else InputError)(head + ":\n" + "\n".join(f"  {line}" for line in lines))


def preflight(config: PipelineConfig) -> ResolvedPipeline:
    """The resolved pipeline, once everything that can be checked before a run holds; raises otherwise."""
    cfg = resolve(config)  # unknown fields and bad values: refused here already, with the field named
    problems = Problems()
    check_pipeline(config, cfg, problems)
    problems.raise_if_any()
    check_memory(cfg)
    return cfg


def check_pipeline(config: PipelineConfig, cfg: ResolvedPipeline, problems: Problems) -> None:
    """Every check of :func:`preflight` but the memory plan, its problems recorded in ``problems``."""
    check_run_location(config, cfg, problems)
    check_model_inputs(cfg, problems)
    if cfg.data.source == "files":
        check_data_files(cfg, problems)
    elif any(getattr(cfg.data, field) for field in DATA_KINDS):
        given = ", ".join(f"data.{f}" for f in DATA_KINDS if getattr(cfg.data, f))
        problems.usage.append(f"{given} given but data.source is 'demo': set data.source=files to use your files")
    check_stage_settings(cfg, problems)
    check_finished_stages(cfg, problems)


def preflight_rounds(config):
    """The resolved rounds plan (``rounds.ResolvedRounds``) of a ``rounds.RoundsConfig``, once what can be checked
    before round 0 holds: the config (``rounds.resolve_rounds``), round 0's pipeline as :func:`preflight` checks a
    run (run location, base checkpoint, tokenizer, data files, finished stages and demo data), the rounds' own stage
    settings, every prompts file of the rounds against the prompts contract (a prompt pool with enough prompts for
    every round), and a run directory holding a rounds run with another config (``rounds.check_state``): a round
    that would fail on its prompts is refused now, not after the rounds before it ran."""
    from .rounds import check_state, resolve_rounds

    plan = resolve_rounds(config)  # the config: refused here already (a ConfigError)
    problems = Problems()
    check_pipeline(config.pipeline_config(), plan.round0, problems)
    check_stage_settings(plan.stages, problems)
    n, rounds = plan.prompts_per_round, config.rounds
    for r, path in enumerate(config.prompt_files[:rounds], start=1):
        _read_checked(f"prompt_files[{r - 1}]", path, "prompts", problems, prefix="")
    if config.prompt_pool:
        pool = _read_checked("prompt_pool", config.prompt_pool, "prompts", problems, prefix="")
        if pool and len(pool) < rounds * n:
            problems.inputs.append(f"prompt_pool: {config.prompt_pool}: {len(pool)} prompts; {rounds} rounds of "
                                   f"{n} need {rounds * n} (none used twice)")
    problems.raise_if_any()
    check_memory(plan.round0)
    check_state(plan)
    return plan


#: The pipeline's stage directories and the config section each one runs with.
STAGE_SECTIONS = {"sft": "sft", "reward-helpfulness": "reward_helpfulness", "reward-safety": "reward_safety",
                  "rejection-sampling": "rejection_sampling", "ppo": "ppo",
                  "context-distillation": "context_distillation", "gatt": "gatt", "eval": "eval",
                  "adherence": "adherence", "export": "export"}


def check_finished_stages(cfg: ResolvedPipeline, problems: Problems) -> None:
    """The demo data of a run with a finished SFT stage were written with this run's data settings (a changed seed,
    size or vocabulary would overwrite them or be ignored), and each finished stage directory of the run (the shared
    upstream ones included) was run with this run's config section: a finished stage is otherwise refused when the
    run reaches it (``stages.common.check_same_run``), after the stages before it ran. Stages this run does not run
    (switched off) are not checked."""
    from .pipeline import DEMO_DATA_RECORD, SHARED_STAGES, demo_data_record
    from .stages.common import RESULT_FILE, config_differences, load_result

    upstream = Path(cfg.upstream_dir())
    record = upstream / "data" / DEMO_DATA_RECORD
    if cfg.data.source == "demo" and record.is_file() and (upstream / "sft" / RESULT_FILE).is_file():
        d = cfg.data
        now = demo_data_record(d.demo_seed, d.demo_sizes, d.vocab_size, bool(d.demo_dialogues),
                               bool(d.demo_preprompts), bool(d.demo_evasive_pairs))
        try:
            then = json.loads(record.read_text())
        except ValueError:
            then = {}
        diff = [f"data.{k}" for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
        if diff:
            problems.inputs.append(f"{upstream} holds a finished run on demo data made with other settings "
                                   f"({', '.join(diff)}): use another run name, or delete {upstream} to run it again")
    for name, section in STAGE_SECTIONS.items():
        config = getattr(cfg, section)
        if not (cfg.runs_adherence() if name == "adherence" else getattr(config, "enabled", True)):
            continue
        where = Path(cfg.upstream_dir() if name in SHARED_STAGES else cfg.run_dir) / name
        if not (where / RESULT_FILE).is_file():
            continue
        try:
            done = load_result(where)
        except ValueError as err:
            problems.inputs.append(f"{where / RESULT_FILE}: not a stage result: {str(err).splitlines()[0]}")
            continue
        diff = config_differences(done, config) if done is not None else []
        if diff:
            shown = ", ".join(f"{section}.{d}" for d in diff[:8]) + (" ..." if len(diff) > 8 else "")
            problems.inputs.append(f"{where} holds a finished {name} stage run with other settings ({shown}): use "
                                   f"another run name, or delete {where} and the stages after it to run it again")


def check_run_location(config: PipelineConfig, cfg: ResolvedPipeline, problems: Problems) -> None:
    """The run directory is a directory strictly inside the runs root (no '..', no symlink out of it)."""
    root, run_dir = Path(config.runs_root), Path(cfg.run_dir)
    if root.exists() and not root.is_dir():
        problems.inputs.append(f"runs_root {str(root)!r} exists and is not a directory")
        return
    inside = run_dir.resolve().is_relative_to(root.resolve()) and run_dir.resolve() != root.resolve()
    if not inside:
        problems.usage.append(f"run_name {config.run_name!r}: the run directory {str(run_dir)!r} resolves to "
                              f"{str(run_dir.resolve())!r}, outside the runs root {str(root.resolve())!r}")
    elif run_dir.exists() and not run_dir.is_dir():
        problems.inputs.append(f"run directory {str(run_dir)!r} exists and is not a directory")


def check_model_inputs(cfg: ResolvedPipeline, problems: Problems) -> None:
    """The base checkpoint is a preset or a model directory; the tokenizer can be found."""
    from .model import is_preset, read_llama_config, source_kind

    try:
        if source_kind(cfg.base_model) == "hf":
            read_llama_config(cfg.base_model)
    except InputError as err:
        problems.inputs.append(f"base_model: {err}")
    if cfg.data.source != "files":
        return  # the demo world's tokenizer is trained in the run
    tokenizer = cfg.data.tokenizer or cfg.base_model
    if is_preset(tokenizer):
        problems.usage.append(f"data.tokenizer: base_model {cfg.base_model!r} is a preset (random weights, no "
                              "tokenizer): with data.source=files set data.tokenizer to a tokenizer directory or "
                              "tokenizer.model file")
        return
    path = Path(tokenizer)
    found = (path.is_file() and path.suffix == ".model") or \
        (path.is_dir() and any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model")))
    if not found:
        what = "data.tokenizer" if cfg.data.tokenizer else "base_model (its tokenizer)"
        problems.inputs.append(f"{what}: {tokenizer!r}: no tokenizer.json or tokenizer.model there")


def check_data_files(cfg: ResolvedPipeline, problems: Problems) -> None:
    """Every data file exists and holds valid records of its kind; both reward models have pairs; one eval judge."""
    for field, kind in DATA_KINDS.items():
        paths = getattr(cfg.data, field)
        if not paths:
            continue  # resolve() already refused a missing one
        records = []
        for path in [paths] if isinstance(paths, str) else paths:
            records += _read_checked(field, path, kind, problems)
        if kind == "preference" and records:
            categories = {r.category for r in records}
            for needed in ("helpfulness", "safety"):
                if needed not in categories:
                    problems.inputs.append(f"data.preferences: {paths}: no {needed} pairs: the {needed} reward "
                                           "model would have nothing to learn")
        if kind == "eval" and records:
            from .stages.evaluate import judge_kind

            try:
                judge_kind(records, cfg.eval)
            except InputError as err:
                problems.inputs.append(f"data.eval: {paths}: {err}")


def _read_checked(field: str, path: str, kind: str, problems: Problems, prefix: str = "data.") -> list:
    """The records of one data file, or [] with its problems recorded (``prefix`` + ``field`` names the setting)."""
    try:
        return read_records(path, kind)
    except DataValidationError as err:
        shown = [str(i) for i in err.issues[:MAX_SHOWN_ISSUES]]
        more = len(err.issues) - len(shown)
        count = f"{len(err.issues)} problem{'s' if len(err.issues) != 1 else ''}"
        problems.inputs.append(f"{prefix}{field}: {path}: {count}; nothing was loaded:\n    " +
                               "\n    ".join(shown) + (f"\n    ... and {more} more" if more else ""))
    except InputError as err:
        problems.inputs.append(f"{prefix}{field}: {err}")
    return []


def check_memory(cfg: ResolvedPipeline, gpus: int | None = None, gpu_memory: int | None = None) -> None:
    """On GPUs, the memory plan (``llama2_align.plan``, what ``llama2-align plan`` prints): a run that cannot fit is
    refused with its table (``PlanRefused``, an input error) instead of running out of memory hours in. ``gpus`` and
    ``gpu_memory`` default to this machine's (CUDA); on a machine without CUDA there is nothing to check."""
    import torch

    from .plan import check_plan

    if gpus is None:
        if not torch.cuda.is_available():
            return
        gpus = torch.cuda.device_count()
        gpu_memory = torch.cuda.get_device_properties(0).total_memory
    nodes = max(getattr(cfg, s).launch.num_nodes for s in ("sft", "reward_helpfulness", "reward_safety",
                                                                        "ppo"))
    check_plan(cfg, gpus=gpus, gpu_memory=gpu_memory, nodes=nodes)


def check_stage_settings(cfg: ResolvedPipeline, problems: Problems) -> None:
    """Settings of one stage that only fail when it runs."""
    if cfg.ppo.prompts_per_iteration % cfg.ppo.num_processes:
        problems.usage.append(f"ppo.prompts_per_iteration ({cfg.ppo.prompts_per_iteration}) must divide among "
                              f"ppo.num_processes ({cfg.ppo.num_processes})")
    if cfg.gatt.enabled and cfg.gatt.demonstrations:
        if cfg.data.source == "files" and not cfg.data.instruction_demos:
            problems.usage.append(f"gatt.demonstrations ({cfg.gatt.demonstrations}) trains instruction "
                                  "demonstrations and none are given: set data.instruction_demos to a file of them, "
                                  "or gatt.demonstrations=0")
        elif cfg.data.source == "demo" and not cfg.data.demo_dialogues:
            problems.usage.append(f"gatt.demonstrations ({cfg.gatt.demonstrations}) trains the demo world's "
                                  "instruction demonstrations, written with its dialogues: set "
                                  "data.demo_dialogues=true, or gatt.demonstrations=0")

"""The ``llama2-align`` command (also ``python -m flows.cli``): the library's commands plus the ones that run flows.

``llama2_align`` imports neither Prefect nor the flows (the layers run flows -> tasks -> llama2_align), so the
commands that start a flow are added here, on the flows' layer, to the library's command line
(``llama2_align.cli``); this module is the console script's entry point.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from llama2_align.cli import EXIT_CODES_HELP, EXIT_REFUSED, EXIT_USAGE, PIPELINE_PANEL, app, fail


def _preflight(config: Path | None, set_: list[str] | None, given: dict, check_inputs: bool = True):
    """The PipelineConfig from a config file and the command line, and its pre-flight (``llama2_align.preflight``;
    the config alone when not ``check_inputs``). ``given``: the fields set by command-line options (None: not set).
    A config problem exits 2, an input problem (a missing file, a bad record) exits 1; nothing has been written."""
    from pydantic import ValidationError

    from llama2_align.errors import ConfigError, InputError
    from llama2_align.pipeline import PipelineConfig, load_config_file, parse_override, resolve
    from llama2_align.preflight import preflight

    try:
        fields = load_config_file(config) if config is not None else {}
        fields.update({k: v for k, v in given.items() if v is not None})
        if not isinstance(fields.get("overrides") or {}, dict):
            raise ConfigError(f"{config or 'config'}: overrides: expected a mapping of field to value, e.g. "
                              f"{{\"ppo.iterations\": 50}}; got {type(fields['overrides']).__name__}")
        overrides = dict(fields.get("overrides") or {})
        overrides.update(parse_override(item) for item in (set_ or []))
        fields["overrides"] = overrides
        pipeline_config = PipelineConfig.model_validate(fields)
        return pipeline_config, preflight(pipeline_config) if check_inputs else resolve(pipeline_config)
    except ValidationError as err:
        fail(f"invalid pipeline config{_validation_message(err, config)}", EXIT_USAGE)
    except ConfigError as err:
        where = f" (from {config}'s overrides or --set)" if config is not None and str(err).startswith("override ") \
            else ""
        fail(f"{err}{where}", EXIT_USAGE)
    except InputError as err:
        fail(str(err), EXIT_REFUSED)


def _section_model(root, loc: tuple):
    """The pydantic model that holds the last part of ``loc``, walking ``root``'s fields (PipelineConfig's ``data``
    is a DataSettings, SweepConfig's ``pipeline`` a PipelineConfig, ...)."""
    import typing

    from pydantic import BaseModel

    model = root
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        inner = [a for a in (field.annotation, *typing.get_args(field.annotation))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            break
        model = inner[0]
    return model


def _validation_message(err, config_file: Path | None, root=None) -> str:
    """pydantic's errors as ``field: message`` lines, naming where they came from; an unknown field lists the
    known ones of its section (``root``: the config's model, PipelineConfig by default)."""
    from llama2_align.pipeline import PipelineConfig

    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        if e.get("type") == "extra_forbidden":
            model = _section_model(root or PipelineConfig, tuple(e["loc"]))
            lines.append(f"{loc}: unknown field; expected one of: {', '.join(model.model_fields)}")
        else:
            got = "" if e.get("type") == "missing" or isinstance(e.get("input"), dict) else f", got {e['input']!r}"
            msg = e["msg"]
            if ", got" in msg:  # pydantic's own "got a number with a fractional part"
                got = f" ({e['input']!r})" if got else ""
            if e.get("type") == "string_pattern_mismatch" and str(e["loc"][-1]) in ("name", "run_name"):
                msg = "a directory's name: letters, digits, '.', '_' and '-', not starting with '.'"
            lines.append(f"{loc}: {msg}{got}")
    where = f" ({config_file} or the command line)" if config_file else ""
    return where + ":\n  " + "\n  ".join(lines)


def _start_local_api():
    """Prefect's settings for a command-line flow run, then the local API server (when no API URL is set), started
    while torch imports; returns ``flows.local_api``."""
    # A new PREFECT_HOME's SQLite database takes 15-20 s to migrate on a small machine: more than Prefect's default
    # 20 s wait for its embedded server on a first run.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Run logs go to the API at INFO (the UI's Logs tab); the console keeps to warnings: a line per stage is printed.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    from flows import local_api

    local_api.start_early()
    return local_api


def _load_ml_stack() -> None:
    """torch and transformers' Llama load here, while the local API server starts: the configs and the pre-flight
    do without them (a refusal takes a second), the stages need them."""
    import torch  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401


TrackingOption = Annotated[Optional[list[str]], typer.Option(
    "--tracking", help="Track the run in mlflow and/or tensorboard (repeatable; needs the \\[tracking] extra).")]
TrackingUriOption = Annotated[Optional[str], typer.Option(
    "--tracking-uri", help="MLflow tracking URI (default: sqlite:///<runs-root>/mlflow.db).")]


@app.command("run", rich_help_panel=PIPELINE_PANEL, epilog=EXIT_CODES_HELP)
def run(
    preset: Annotated[Optional[str], typer.Option(
        "--preset", help="Pipeline preset: demo-tiny (default), demo-micro, llama2-7b-lora, llama2-7b, "
                         "llama2-13b-lora, llama2-70b-lora.")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="JSON or YAML file with pipeline fields (preset, run_name, base_model, data, overrides).")
    ] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a field, e.g. --set ppo.iterations=50 (repeatable; values parsed as JSON).")] = None,
    run_name: Annotated[Optional[str], typer.Option("--run-name", help="Run directory name (default: demo).")] = None,
    runs_root: Annotated[Optional[str], typer.Option("--runs-root", help="Parent of run directories.")] = None,
    rejection_sampling: Annotated[Optional[bool], typer.Option(
        "--rejection-sampling/--no-rejection-sampling", help="SFT -> RS -> PPO instead of SFT -> PPO.")] = None,
    export: Annotated[Optional[bool], typer.Option(
        "--export/--no-export", help="Export the final policy (an HF directory and a GGUF file) at the end.")] = None,
    tracking: TrackingOption = None,
    tracking_uri: TrackingUriOption = None,
    seeds: Annotated[Optional[str], typer.Option(
        "--seeds", help="Run the pipeline once per demo seed, e.g. --seeds 0,1,2 (runs <run-name>-s<seed>) and "
                        "write <run-name>-seeds/summary.{json,md}: every headline metric per seed, its spread, "
                        "the demo bar per seed.")] = None,
    context_distillation: Annotated[Optional[bool], typer.Option(
        "--context-distillation/--no-context-distillation", help="After PPO: safety context distillation.")] = None,
    gatt: Annotated[Optional[bool], typer.Option(
        "--gatt/--no-gatt", help="After RLHF: Ghost Attention, and the multi-turn adherence evaluation.")] = None,
    print_config: Annotated[bool, typer.Option(
        "--print-config", help="Print the fully resolved config (every stage's settings) as JSON and exit.")] = False,
) -> None:
    """Run the whole pipeline (the rlhf-pipeline flow): data, tokenizer, SFT, both reward models, PPO, eval, report.

    Everything that can be checked is checked first (config, paths, data files); a refused run writes nothing. A
    stage that fails prints one paragraph (the stage, the error, the log file with the traceback, how to resume)."""
    given = {"preset": preset, "run_name": run_name, "runs_root": runs_root, "rejection_sampling": rejection_sampling,
             "export": export, "tracking": tracking or None, "tracking_uri": tracking_uri,
             "context_distillation": context_distillation, "gatt": gatt}
    seed_list = _parse_seeds(seeds)
    if print_config:
        pipeline_config, resolved = _preflight(config, set_, given, check_inputs=False)
        if seed_list is not None:
            _check_seeds(pipeline_config, seed_list)
        typer.echo(json.dumps(resolved.model_dump(mode="json"), indent=2))
        return
    local_api = _start_local_api()
    try:
        pipeline_config, resolved = _preflight(config, set_, given)
    except typer.Exit:
        local_api.stop()  # refused: nothing was written, and no server is left behind
        raise

    from flows.common import StageFailed
    from flows.pipeline import rlhf_pipeline
    from llama2_align.errors import InputError
    from llama2_align.report import headline_text
    from llama2_align.stages.common import FinishedWithOtherSettings

    if seed_list is not None:
        return _run_seeds(pipeline_config, seed_list)
    log_file = _log_to_file(Path(resolved.run_dir))
    typer.echo(f"run directory {resolved.run_dir}; full log: {log_file}")
    _load_ml_stack()
    local_api.adopt()
    try:
        result = rlhf_pipeline(config=pipeline_config)
    except StageFailed as err:
        if isinstance(err.error, FinishedWithOtherSettings):  # a refusal, not a failure: resuming would not help
            fail(f"stage {err.stage!r}: {err.error}", EXIT_REFUSED)
        _explain_failure(f"stage {err.stage!r} failed: {_first_lines(err.error)}", log_file,
                         f"Its dependents did not run. Fix the cause, then run the same command again: finished "
                         f"stages are served from the cache and {err.stage!r} resumes from its newest checkpoint.")
    except InputError as err:  # refused while running (another run holds the run directory, ...)
        fail(str(err), EXIT_REFUSED)
    except KeyboardInterrupt:
        _explain_failure("interrupted", log_file, "run the same command again to resume.")
    except Exception as err:  # a bug outside any stage
        _explain_failure(f"the pipeline failed: {type(err).__name__}: {_first_lines(err)}", log_file,
                         "finished stages are kept; run the same command again to resume.")
    typer.echo("\n" + headline_text(json.loads(Path(result["report_json"]).read_text())))
    typer.echo(f"report: {result['report_md']} (and report.json beside it)")
    if local_api.adopted() or not os.environ.get("PREFECT_API_URL"):
        typer.echo(f"artifacts (summaries, metrics, curves, samples, the report) are in the Prefect database under "
                   f"{os.environ.get('PREFECT_HOME', '~/.prefect')}: `make server`, then open http://127.0.0.1:4200 "
                   "(Runs -> rlhf-pipeline -> Artifacts)")


def _parse_seeds(seeds: str | None) -> list[int] | None:
    if seeds is None:
        return None
    try:
        return [int(s) for s in seeds.replace(" ", ",").split(",") if s]
    except ValueError:
        fail(f"--seeds {seeds!r}: expected integers separated by commas, e.g. --seeds 0,1,2", EXIT_USAGE)


def _check_seeds(pipeline_config, seeds: list[int]) -> None:
    """The seed sweep's own checks (distinct seeds, a demo world): exit 2."""
    from llama2_align.errors import InputError
    from llama2_align.seeds import seed_configs

    try:
        seed_configs(pipeline_config, seeds)
    except InputError as err:
        fail(str(err), EXIT_USAGE)


def _run_seeds(pipeline_config, seeds: list[int]) -> None:
    """The rlhf-seeds flow: the pipeline once per seed, then the summary across seeds (printed, and on disk)."""
    from flows import local_api
    from flows.seeds import rlhf_seeds
    from llama2_align.errors import InputError
    from llama2_align.seeds import seeds_dir, table_rows

    try:
        _check_seeds(pipeline_config, seeds)
    except typer.Exit:
        local_api.stop()
        raise
    log_file = _log_to_file(seeds_dir(pipeline_config))
    typer.echo(f"seeds {', '.join(map(str, seeds))} -> {seeds_dir(pipeline_config)}; full log: {log_file}")
    _load_ml_stack()
    local_api.adopt()
    try:
        out = rlhf_seeds(config=pipeline_config, seeds=seeds)
    except InputError as err:
        fail(str(err), EXIT_REFUSED)
    except Exception as err:
        _explain_failure(f"the seed sweep failed: {type(err).__name__}: {_first_lines(err)}", log_file,
                         "finished runs and stages are kept; run the same command again to resume.")
    summary = json.loads(Path(out["summary_json"]).read_text())
    rows = table_rows(summary)
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    typer.echo("\n" + "  ".join(c.ljust(widths[c]) for c in cols))
    typer.echo("\n".join("  ".join(r[c].ljust(widths[c]) for c in cols) for r in rows))
    typer.echo(f"\ndemo bar on every seed: {'PASSED' if summary['bar_passed_all'] else 'NOT MET'}")
    typer.echo(f"summary: {out['summary_md']} (and summary.json beside it)")


def _first_lines(error: BaseException, n: int = 6) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return "\n  ".join(lines[:n] + ([f"... ({len(lines) - n} more lines in the log)"] if len(lines) > n else []))


def _explain_failure(what: str, log_file: Path, then: str) -> None:
    """One paragraph on stderr, no traceback (it is in the log file and in the UI's logs); exit 1."""
    typer.echo(f"\nerror: {what}\n  The traceback and every log line are in {log_file} (and in the flow run's "
               f"logs in the Prefect UI).\n  {then}", err=True)
    raise typer.Exit(EXIT_REFUSED)


class _ConsoleFilter(logging.Filter):
    """What the console shows of the log: warnings, one line each. Errors and tracebacks go to the log file (and
    the UI); the command line sums a failure up in one paragraph. Python's warnings go to the log file only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or record.name == "py.warnings":
            return False
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _log_to_file(run_dir: Path) -> Path:
    """Every log line of the run at INFO and above, tracebacks included, into ``<run_dir>/logs/run-<time>.log``;
    the console keeps warnings without tracebacks (``_ConsoleFilter``)."""
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    root = logging.getLogger()
    for console in [h for h in root.handlers if isinstance(h, logging.StreamHandler)
                    and not isinstance(h, logging.FileHandler)]:
        console.addFilter(_ConsoleFilter())
    root.addHandler(handler)
    logging.captureWarnings(True)
    return path


def _sweep_config(name, grid, optuna_trials, space, objective, seed, pipeline_config, check_inputs: bool = True):
    """The SweepConfig from the command line, every trial resolved once to refuse a bad value now, and (unless
    only printing the plan) the first trial's pre-flight: a bad input exits 1, a bad setting 2, before any trial."""
    from pydantic import ValidationError

    from llama2_align.errors import ConfigError, InputError
    from llama2_align.sweep import SweepConfig, check_sweep, parse_grid

    try:
        fields: dict = {"name": name, "pipeline": pipeline_config, "grid": dict(parse_grid(g) for g in grid or [])}
        if optuna_trials is not None or space:
            opt: dict = {"trials": 8 if optuna_trials is None else optuna_trials, "seed": seed,
                         "space": dict(item.split("=", 1) if "=" in item else (item, "") for item in space or [])}
            if objective:
                opt["objectives"] = objective
            fields["optuna"] = opt
        elif objective:
            raise ValueError("--objective: a grid has no objective (its summary ranks every metric); it goes with "
                             "--optuna")
        sweep = SweepConfig.model_validate(fields)
        return sweep, check_sweep(sweep, check_inputs=check_inputs)
    except ConfigError as err:
        fail(f"invalid sweep: {err}", EXIT_USAGE)
    except InputError as err:
        fail(str(err), EXIT_REFUSED)
    except ValidationError as err:
        fail(f"invalid sweep{_validation_message(err, None, SweepConfig)}", EXIT_USAGE)
    except ValueError as err:
        fail(f"invalid sweep: {err}", EXIT_USAGE)


@app.command("sweep", rich_help_panel=PIPELINE_PANEL, epilog=EXIT_CODES_HELP)
def sweep(
    name: Annotated[str, typer.Option("--name", help="The sweep directory's name: <runs-root>/<name>.")] = "sweep",
    grid: Annotated[Optional[list[str]], typer.Option(
        "--grid", help="A grid axis, e.g. --grid ppo.kl_beta=0.01,0.02,0.05 (repeatable: every combination).")
    ] = None,
    optuna_trials: Annotated[Optional[int], typer.Option(
        "--optuna", help="Run an Optuna study (TPE) of this many trials over --space instead of a grid.")] = None,
    space: Annotated[Optional[list[str]], typer.Option(
        "--space", help="A study's parameter: KEY=float:LO:HI, log:LO:HI, int:LO:HI or cat:A,B (repeatable).")
    ] = None,
    objective: Annotated[Optional[list[str]], typer.Option(
        "--objective", help="METRIC:max|min (repeatable; default helpfulness_accuracy:max, violation_rate:min).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="The study's sampler seed.")] = 0,
    preset: Annotated[Optional[str], typer.Option("--preset", help="Pipeline preset of every trial.")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="JSON or YAML file with the trials' pipeline fields.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a field in every trial, e.g. --set ppo.iterations=50 (repeatable).")] = None,
    runs_root: Annotated[Optional[str], typer.Option("--runs-root", help="Parent of the sweep directory.")] = None,
    rejection_sampling: Annotated[Optional[bool], typer.Option(
        "--rejection-sampling/--no-rejection-sampling", help="SFT -> RS -> PPO in every trial.")] = None,
    tracking: TrackingOption = None,
    tracking_uri: TrackingUriOption = None,
    print_plan: Annotated[bool, typer.Option(
        "--print-plan", help="Print the trials (name, run directory, overrides) as JSON and exit.")] = False,
) -> None:
    """Run a sweep (the rlhf-sweep flow): a grid or an Optuna study over ppo.*, rejection_sampling.* and eval.*
    settings, as pipeline runs that share SFT and the reward models; writes <runs-root>/<name>/sweep.json and .md."""
    pipeline_config, _ = _preflight(config, set_, {"preset": preset, "runs_root": runs_root,
                                                    "rejection_sampling": rejection_sampling,
                                                    "tracking": tracking or None, "tracking_uri": tracking_uri},
                                    check_inputs=False)
    sweep_config, trials = _sweep_config(name, grid, optuna_trials, space, objective, seed, pipeline_config,
                                         check_inputs=not print_plan)
    if print_plan:
        typer.echo(json.dumps({"sweep_dir": str(sweep_config.dir), "method": "optuna" if sweep_config.optuna else
                               "grid", "optuna": sweep_config.optuna and sweep_config.optuna.model_dump(),
                               "trials": [{"name": t.run_name, "run_dir": str(Path(t.runs_root) / t.run_name),
                                           "overrides": t.overrides} for t in trials]}, indent=2))
        return
    local_api = _start_local_api()
    from flows.sweep import rlhf_sweep
    from llama2_align.sweep import table_rows

    _load_ml_stack()
    local_api.adopt()
    out = rlhf_sweep(sweep=sweep_config)
    summary = json.loads(Path(out["sweep_json"]).read_text())
    rows = table_rows(summary)
    if rows:
        cols = list(rows[0])
        widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
        typer.echo("\n" + "  ".join(c.ljust(widths[c]) for c in cols))
        typer.echo("\n".join("  ".join(r[c].ljust(widths[c]) for c in cols) for r in rows))
    for front in summary["pareto"].values():
        typer.echo(f"Pareto front, {front['title']}: {', '.join(front['front']) or 'none'}")
    t = summary["timing"]
    typer.echo(f"wall time {t['wall_s']:.0f} s; the shared stages ({t['shared_s']:.0f} s) ran once: "
               f"{100 * t['saved_fraction']:.0f}% saved against {t['trials']} independent runs (estimate)")
    typer.echo(f"summary: {out['sweep_md']} (and sweep.json, the Pareto plots beside it)")
    failed = [t["name"] for t in summary["trials"] if t["status"] != "completed"]
    if failed:
        typer.echo(f"\nerror: {len(failed)} of {len(summary['trials'])} trials failed ({', '.join(failed)}); each "
                   "one's error is in the summary. Run the same command again to resume them.", err=True)
        raise typer.Exit(EXIT_REFUSED)


# --------------------------------------------------------------------------------------------------------------
# rounds: iterative RLHF (the rlhf-rounds flow), and resuming a round that waits for labels
# --------------------------------------------------------------------------------------------------------------

rounds_app = typer.Typer(help="Iterative RLHF rounds (the rlhf-rounds flow): round 0 is SFT and both reward models; "
                              "each later round collects pairs, annotates them, retrains both reward models, improves "
                              "the policy and promotes it only if its gates hold.",
                         epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(rounds_app, name="rounds", rich_help_panel=PIPELINE_PANEL)


def _rounds_config(config, fields: dict, set_, round_set, check_inputs: bool = True):
    """The RoundsConfig from a config file and the command line and its pre-flight
    (``llama2_align.preflight.preflight_rounds``; the config and the run's state alone when not ``check_inputs``).
    A config problem exits 2, an input problem (a missing file, a bad record, a finished stage run with other
    settings) exits 1; nothing has been written."""
    from pydantic import ValidationError

    from llama2_align.errors import ConfigError, InputError
    from llama2_align.pipeline import load_config_file, parse_override
    from llama2_align.preflight import preflight_rounds
    from llama2_align.rounds import RoundsConfig, check_state, resolve_rounds

    try:
        base: dict = {}
        if config is not None:
            base = load_config_file(config)
        base.update({k: v for k, v in fields.items() if v is not None})
        for key, items in (("overrides", set_), ("round_overrides", round_set)):
            base[key] = {**(base.get(key) or {}), **dict(parse_override(i) for i in (items or []))}
        rounds_config = RoundsConfig.model_validate(base)
        if check_inputs:
            return rounds_config, preflight_rounds(rounds_config)
        plan = resolve_rounds(rounds_config)
        check_state(plan)
        return rounds_config, plan
    except ConfigError as err:
        fail(str(err), EXIT_USAGE)
    except InputError as err:
        fail(str(err), EXIT_REFUSED)
    except ValidationError as err:
        fail(f"invalid rounds config{_validation_message(err, config, RoundsConfig)}", EXIT_USAGE)
    except ValueError as err:
        fail(f"invalid rounds config: {err}", EXIT_USAGE)


@rounds_app.callback(invoke_without_command=True)
def rounds(
    ctx: typer.Context,
    preset: Annotated[Optional[str], typer.Option("--preset", help="Pipeline preset (default demo-tiny).")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="JSON or YAML file with RoundsConfig fields (rounds, methods, gates, overrides...).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="A pipeline override for every round, e.g. --set eval.samples_per_prompt=2.")] = None,
    round_set: Annotated[Optional[list[str]], typer.Option(
        "--round-set", help="An override for rounds >= 1 only, e.g. --round-set reward_helpfulness.epochs=1 or "
                            "--round-set collect.temperatures=[0.7,1.0].")] = None,
    n_rounds: Annotated[Optional[int], typer.Option("--rounds", help="Rounds after round 0 (default 3).")] = None,
    methods: Annotated[Optional[str], typer.Option(
        "--methods", help="Each round's method, comma-separated: rs, ppo or rs+ppo; the last repeats "
                          "(default rs,rs,rs+ppo).")] = None,
    prompts_per_round: Annotated[Optional[int], typer.Option("--prompts-per-round")] = None,
    samples_per_prompt: Annotated[Optional[int], typer.Option("--samples-per-prompt")] = None,
    annotator: Annotated[Optional[str], typer.Option(
        "--annotator", help="simulated (the demo world's preference process) or human (the run waits for labels).")
    ] = None,
    run_name: Annotated[Optional[str], typer.Option("--run-name", help="Run directory name (default rounds).")] = None,
    runs_root: Annotated[Optional[str], typer.Option("--runs-root", help="Parent of run directories.")] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config and exit.")] = False,
) -> None:
    """Run iterative RLHF rounds; `rounds resume RUN --labels FILE` gives a waiting round its labels."""
    if ctx.invoked_subcommand is not None:
        return
    fields = {"preset": preset, "rounds": n_rounds, "prompts_per_round": prompts_per_round,
              "samples_per_prompt": samples_per_prompt, "annotator": annotator, "run_name": run_name,
              "runs_root": runs_root,
              "methods": [m.strip() for m in methods.split(",") if m.strip()] if methods is not None else None}
    rounds_config, plan = _rounds_config(config, fields, set_, round_set, check_inputs=not print_config)
    if print_config:
        typer.echo(json.dumps(plan.model_dump(mode="json"), indent=2))
        return
    local_api = _start_local_api()
    from flows.common import StageFailed
    from flows.rounds import rlhf_rounds
    from llama2_align.rounds_report import round_rows, staleness_rows, text_table

    from llama2_align.errors import InputError

    _load_ml_stack()
    local_api.adopt()
    try:
        result = rlhf_rounds(config=rounds_config)
    except (StageFailed, InputError) as exc:
        fail(f"{exc}\n(the run's status: {plan.rounds_dir / 'state.json'}; the same command goes on from here)")
    report = json.loads(Path(result["report_json"]).read_text())
    typer.echo("\n" + text_table(round_rows(report)) + "\n\n" + text_table(staleness_rows(report)))
    typer.echo(f"\nlast promoted: round {report['last_promoted']}; report: {result['report_md']} "
               f"(and report.json, {report['figure']} beside it)")


@rounds_app.command("resume", epilog=EXIT_CODES_HELP)
def rounds_resume(
    run: Annotated[str, typer.Argument(help="The rounds run's name (its directory under --runs-root).")],
    labels: Annotated[Path, typer.Option("--labels", help="The labelled file (native preference format).")],
    runs_root: Annotated[Optional[str], typer.Option("--runs-root", help="Parent of run directories.")] = None,
) -> None:
    """Give the round that waits for labels its labelled file: validated first (a bad file is refused and the run
    stays paused), put in place as the round's labels.jsonl, then the paused flow run is resumed."""
    from llama2_align.rounds import ROUNDS_DIR, accept_labels, read_state

    root = Path(runs_root or os.environ.get("LLAMA2_ALIGN_RUNS_ROOT", "runs"))
    state = read_state(root / run / ROUNDS_DIR)
    if state is None:
        fail(f"{root / run}: no rounds run there (no {ROUNDS_DIR}/state.json)")
    paused = state.get("paused")
    if not paused:
        fail(f"rounds run {run} is not waiting for labels (status: {state.get('status')})")
    if not labels.is_file():
        fail(f"{labels}: " + ("a directory; expected the labelled .jsonl file" if labels.is_dir() else "no such file"))
    try:
        records = accept_labels(labels, Path(paused["labels"]))
    except Exception as err:  # InputError: the contract's problems, every one named
        fail(f"labels refused; round {paused['round']} of {run} still waits:\n{err}")
    typer.echo(f"{len(records)} labelled pairs accepted; round {paused['round']}'s labels: {paused['labels']}")
    if paused.get("api_url") and not os.environ.get("PREFECT_API_URL"):
        os.environ["PREFECT_API_URL"] = paused["api_url"]  # the server the waiting run talks to
    from uuid import UUID

    from prefect.flow_runs import resume_flow_run

    try:
        resume_flow_run(UUID(paused["flow_run_id"]), run_input={"labels": str(labels.resolve())})
    except Exception as err:
        typer.echo(f"could not resume flow run {paused['flow_run_id']} ({type(err).__name__}: {err}). The labels "
                   f"are in place: run `llama2-align rounds --run-name {run}` with the same config again, and round "
                   f"{paused['round']} goes on from them.", err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    typer.echo(f"resumed flow run {paused['flow_run_id']}: round {paused['round']} goes on")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""The ``llama2-align`` command (also ``python -m flows.cli``): the library's commands plus the ones that run flows.

``llama2_align`` imports neither Prefect nor the flows (the layers run flows -> tasks -> llama2_align), so the
commands that start a flow are added here, on the flows' layer, to the library's command line
(``llama2_align.cli``); this module is the console script's entry point.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from llama2_align.cli import EXIT_CODES_HELP, EXIT_USAGE, PIPELINE_PANEL, app, fail


def _pipeline_config(preset, config, set_, run_name, runs_root, rejection_sampling, tracking=None, tracking_uri=None):
    """The PipelineConfig from a config file and the command line, resolved once to refuse a bad field now."""
    from pydantic import ValidationError

    from llama2_align.pipeline import PipelineConfig, load_config_file, parse_override, resolve

    fields: dict = {}
    try:
        if config is not None:
            if not config.is_file():
                fail(f"{config}: no such config file")
            fields = load_config_file(config)
        given = {"preset": preset, "run_name": run_name, "runs_root": runs_root,
                 "rejection_sampling": rejection_sampling, "tracking": tracking or None, "tracking_uri": tracking_uri}
        fields.update({k: v for k, v in given.items() if v is not None})
        overrides = dict(fields.get("overrides") or {})
        overrides.update(parse_override(item) for item in (set_ or []))
        fields["overrides"] = overrides
        pipeline_config = PipelineConfig.model_validate(fields)
        return pipeline_config, resolve(pipeline_config)
    except (ValidationError, ValueError) as err:
        fail(f"invalid pipeline config: {err}", EXIT_USAGE)


TrackingOption = Annotated[Optional[list[str]], typer.Option(
    "--tracking", help="Track the run in mlflow and/or tensorboard (repeatable; needs the [tracking] extra).")]
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
    tracking: TrackingOption = None,
    tracking_uri: TrackingUriOption = None,
    print_config: Annotated[bool, typer.Option(
        "--print-config", help="Print the fully resolved config (every stage's settings) as JSON and exit.")] = False,
) -> None:
    """Run the whole pipeline (the rlhf-pipeline flow): data, tokenizer, SFT, both reward models, PPO, eval, report."""
    if print_config:
        _, resolved = _pipeline_config(preset, config, set_, run_name, runs_root, rejection_sampling, tracking,
                                       tracking_uri)
        typer.echo(json.dumps(resolved.model_dump(mode="json"), indent=2))
        return
    # A new PREFECT_HOME's SQLite database takes 15-20 s to migrate on a small machine: more than Prefect's default
    # 20 s wait for its embedded server on a first run.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Run logs go to the API at INFO (the UI's Logs tab); the console keeps to warnings: a line per stage is printed.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    from flows import local_api

    local_api.start_early()  # the local API server (when no API URL is set) starts while torch imports
    pipeline_config, _ = _pipeline_config(preset, config, set_, run_name, runs_root, rejection_sampling, tracking,
                                          tracking_uri)

    from flows.pipeline import rlhf_pipeline
    from llama2_align.report import headline_text

    local_api.adopt()
    result = rlhf_pipeline(config=pipeline_config)
    typer.echo("\n" + headline_text(json.loads(Path(result["report_json"]).read_text())))
    typer.echo(f"report: {result['report_md']} (and report.json beside it)")
    if local_api.adopted() or not os.environ.get("PREFECT_API_URL"):
        typer.echo(f"artifacts (summaries, metrics, curves, samples, the report) are in the Prefect database under "
                   f"{os.environ.get('PREFECT_HOME', '~/.prefect')}: `make server`, then open http://127.0.0.1:4200 "
                   "(Runs -> rlhf-pipeline -> Artifacts)")


def _sweep_config(name, grid, optuna_trials, space, objective, seed, pipeline_config):
    """The SweepConfig from the command line, every trial resolved once to refuse a bad value now."""
    from pydantic import ValidationError

    from llama2_align.sweep import SweepConfig, check_sweep, parse_grid

    try:
        fields: dict = {"name": name, "pipeline": pipeline_config, "grid": dict(parse_grid(g) for g in grid or [])}
        if optuna_trials is not None or space:
            opt: dict = {"trials": optuna_trials or 8, "seed": seed,
                         "space": dict(item.split("=", 1) if "=" in item else (item, "") for item in space or [])}
            if objective:
                opt["objectives"] = objective
            fields["optuna"] = opt
        sweep = SweepConfig.model_validate(fields)
        return sweep, check_sweep(sweep)
    except (ValidationError, ValueError) as err:
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
    pipeline_config, _ = _pipeline_config(preset, config, set_, None, runs_root, rejection_sampling, tracking,
                                          tracking_uri)
    sweep_config, trials = _sweep_config(name, grid, optuna_trials, space, objective, seed, pipeline_config)
    if print_plan:
        typer.echo(json.dumps({"sweep_dir": str(sweep_config.dir), "method": "optuna" if sweep_config.optuna else
                               "grid", "optuna": sweep_config.optuna and sweep_config.optuna.model_dump(),
                               "trials": [{"name": t.run_name, "run_dir": str(Path(t.runs_root) / t.run_name),
                                           "overrides": t.overrides} for t in trials]}, indent=2))
        return
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    from flows import local_api

    local_api.start_early()
    from flows.sweep import rlhf_sweep
    from llama2_align.sweep import table_rows

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()

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


def _pipeline_config(preset, config, set_, run_name, runs_root, rejection_sampling, gatt=None,
                     context_distillation=None):
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
                 "rejection_sampling": rejection_sampling, "gatt": gatt, "context_distillation": context_distillation}
        fields.update({k: v for k, v in given.items() if v is not None})
        overrides = dict(fields.get("overrides") or {})
        overrides.update(parse_override(item) for item in (set_ or []))
        fields["overrides"] = overrides
        pipeline_config = PipelineConfig.model_validate(fields)
        return pipeline_config, resolve(pipeline_config)
    except (ValidationError, ValueError) as err:
        fail(f"invalid pipeline config: {err}", EXIT_USAGE)


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
    context_distillation: Annotated[Optional[bool], typer.Option(
        "--context-distillation/--no-context-distillation", help="After PPO: safety context distillation.")] = None,
    gatt: Annotated[Optional[bool], typer.Option(
        "--gatt/--no-gatt", help="After RLHF: Ghost Attention, and the multi-turn adherence evaluation.")] = None,
    print_config: Annotated[bool, typer.Option(
        "--print-config", help="Print the fully resolved config (every stage's settings) as JSON and exit.")] = False,
) -> None:
    """Run the whole pipeline (the rlhf-pipeline flow): data, tokenizer, SFT, both reward models, PPO, eval, report."""
    if print_config:
        _, resolved = _pipeline_config(preset, config, set_, run_name, runs_root, rejection_sampling, gatt,
                                         context_distillation)
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
    pipeline_config, _ = _pipeline_config(preset, config, set_, run_name, runs_root, rejection_sampling, gatt,
                                         context_distillation)

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()

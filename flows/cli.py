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


def _pipeline_config(preset, config, set_, run_name, runs_root, rejection_sampling):
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
                 "rejection_sampling": rejection_sampling}
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
    print_config: Annotated[bool, typer.Option(
        "--print-config", help="Print the fully resolved config (every stage's settings) as JSON and exit.")] = False,
) -> None:
    """Run the whole pipeline (the rlhf-pipeline flow): data, tokenizer, SFT, both reward models, PPO, eval, report."""
    if print_config:
        _, resolved = _pipeline_config(preset, config, set_, run_name, runs_root, rejection_sampling)
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
    pipeline_config, _ = _pipeline_config(preset, config, set_, run_name, runs_root, rejection_sampling)

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


# --------------------------------------------------------------------------------------------------------------
# rounds: iterative RLHF (the rlhf-rounds flow), and resuming a round that waits for labels
# --------------------------------------------------------------------------------------------------------------

rounds_app = typer.Typer(help="Iterative RLHF rounds (the rlhf-rounds flow): round 0 is SFT and both reward models; "
                              "each later round collects pairs, annotates them, retrains both reward models, improves "
                              "the policy and promotes it only if its gates hold.",
                         epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(rounds_app, name="rounds", rich_help_panel=PIPELINE_PANEL)


def _rounds_config(config, fields: dict, set_, round_set):
    """The RoundsConfig from a config file and the command line, resolved once to refuse a bad field now."""
    from pydantic import ValidationError

    from llama2_align.pipeline import load_config_file, parse_override
    from llama2_align.rounds import RoundsConfig, check_state, resolve_rounds

    try:
        base: dict = {}
        if config is not None:
            if not config.is_file():
                fail(f"{config}: no such config file")
            base = load_config_file(config)
        base.update({k: v for k, v in fields.items() if v is not None})
        for key, items in (("overrides", set_), ("round_overrides", round_set)):
            base[key] = {**(base.get(key) or {}), **dict(parse_override(i) for i in (items or []))}
        rounds_config = RoundsConfig.model_validate(base)
        plan = resolve_rounds(rounds_config)
        check_state(plan)
        return rounds_config, plan
    except (ValidationError, ValueError) as err:
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
    rounds_config, plan = _rounds_config(config, fields, set_, round_set)
    if print_config:
        typer.echo(json.dumps(plan.model_dump(mode="json"), indent=2))
        return
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    from flows import local_api

    local_api.start_early()
    from flows.common import StageFailed
    from flows.rounds import rlhf_rounds
    from llama2_align.rounds_report import round_rows, staleness_rows, text_table

    from llama2_align.errors import InputError

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
        fail(f"{labels}: no such file")
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
                   f"{paused['round']} goes on from them.")
        return
    typer.echo(f"resumed flow run {paused['flow_run_id']}: round {paused['round']} goes on")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

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
        overrides = dict(fields.get("overrides") or {})
        overrides.update(parse_override(item) for item in (set_ or []))
        fields["overrides"] = overrides
        pipeline_config = PipelineConfig.model_validate(fields)
        return pipeline_config, preflight(pipeline_config) if check_inputs else resolve(pipeline_config)
    except ValidationError as err:
        fail(f"invalid pipeline config{_validation_message(err, config)}", EXIT_USAGE)
    except ConfigError as err:
        fail(str(err), EXIT_USAGE)
    except InputError as err:
        fail(str(err), EXIT_REFUSED)


def _validation_message(err, config_file: Path | None) -> str:
    """pydantic's errors as ``field: message`` lines, naming where they came from; an unknown field lists the
    known ones."""
    from llama2_align.pipeline import DataSettings, PipelineConfig

    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        if e.get("type") == "extra_forbidden":
            model = DataSettings if e["loc"][:1] == ("data",) else PipelineConfig
            lines.append(f"{loc}: unknown field; expected one of: {', '.join(model.model_fields)}")
        else:
            got = "" if e.get("type") == "missing" or isinstance(e.get("input"), dict) else f", got {e['input']!r}"
            lines.append(f"{loc}: {e['msg']}{got}")
    where = f" ({config_file} or the command line)" if config_file else ""
    return where + ":\n  " + "\n  ".join(lines)


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
    print_config: Annotated[bool, typer.Option(
        "--print-config", help="Print the fully resolved config (every stage's settings) as JSON and exit.")] = False,
) -> None:
    """Run the whole pipeline (the rlhf-pipeline flow): data, tokenizer, SFT, both reward models, PPO, eval, report.

    Everything that can be checked is checked first (config, paths, data files); a refused run writes nothing. A
    stage that fails prints one paragraph (the stage, the error, the log file with the traceback, how to resume)."""
    given = {"preset": preset, "run_name": run_name, "runs_root": runs_root, "rejection_sampling": rejection_sampling,
             "export": export}
    if print_config:
        _, resolved = _preflight(config, set_, given, check_inputs=False)
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
    try:
        pipeline_config, resolved = _preflight(config, set_, given)
    except typer.Exit:
        local_api.stop()  # refused: nothing was written, and no server is left behind
        raise

    from flows.common import StageFailed
    from flows.pipeline import rlhf_pipeline
    from llama2_align.errors import InputError
    from llama2_align.report import headline_text

    log_file = _log_to_file(Path(resolved.run_dir))
    typer.echo(f"run directory {resolved.run_dir}; full log: {log_file}")
    local_api.adopt()
    try:
        result = rlhf_pipeline(config=pipeline_config)
    except StageFailed as err:
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()

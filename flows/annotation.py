"""Human annotation inside a rounds flow: write the pairs to label, wait for the labelled file, validate it.

The flow waits with Prefect's wait-for-input: run locally it **pauses** (the process blocks and polls); run from a
deployment it **suspends** (the process exits, no worker is held while people label; on resume the run is
rescheduled, every finished task is served from its cache or its files, and the suspend returns the input). A
person resumes it from the UI (the form asks for the labelled file's path) or with ``llama2-align rounds resume RUN
--labels FILE``. The file is validated against the preference contract before the round goes on; a bad file is
refused with every problem named (in the log, the ``rounds-label-errors`` artifact, the next form's description and
``rounds/state.json``), and the run waits again.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput
from pydantic import Field

from flows.common import say
from llama2_align import rounds as lib
from llama2_align.errors import InputError
from tasks.rounds import to_label_task


class LabelsInput(RunInput):
    labels: str = Field(description="Path of the labelled file: the round's to_label.jsonl (or a copy) with every "
                                    "rating filled in, chosen/rejected swapped where the second answer is better, and "
                                    "the safety flags set on safety pairs (native preference format).")


def _form_text(r: int, to_label: str, labels: str, errors: str | None) -> str:
    text = (f"**Round {r} waits for labels.** Label the pairs in `{to_label}`: for each, keep `chosen` as the better "
            "answer (swap `chosen` and `rejected` when the second is better), set `rating` to significantly_better, "
            "better, slightly_better or negligibly_better, and on safety pairs set `chosen_safe` and `rejected_safe`. "
            f"Give the labelled file's path below; it is validated before the round goes on and kept as `{labels}`.")
    if errors:
        text += f"\n\n**The last file was refused:**\n\n```\n{errors}\n```"
    return text


def wait_for_labels(plan: lib.ResolvedRounds, key: str, description: str, default: str) -> LabelsInput:
    """Pause (a local run) or suspend (a deployment's run) until a person gives the labelled file's path."""
    form = LabelsInput.with_initial_data(description=description, labels=default)
    timeout = int(plan.config.annotation_timeout_h * 3600)
    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None and ctx.flow_run.deployment_id is not None:
        return suspend_flow_run(wait_for_input=form, key=key, timeout=timeout)
    return pause_flow_run(wait_for_input=form, key=key, timeout=timeout, poll_interval=plan.config.annotation_poll_s)


def human_labels(plan: lib.ResolvedRounds, r: int, collect_dir: str) -> str:
    """The round's labels from people: ``rounds/<r>/labels.jsonl`` once a valid labelled file was given. A file
    already in place (put there by ``llama2-align rounds resume`` when the run had stopped) is used as it is."""
    from prefect.settings import PREFECT_API_URL

    out = plan.round_dir(r) / "labels.jsonl"
    summary = plan.round_dir(r) / "annotation.json"
    errors = None
    if out.exists():
        try:
            lib.write_annotation_summary(lib.accept_labels(out, out), summary, "human")
            return str(out)
        except InputError as err:
            errors = str(err)
    to_label = to_label_task(plan, r, collect_dir)
    ctx = FlowRunContext.get()
    for attempt in itertools.count(1):
        key = f"round-{r}-labels-{attempt}"
        lib.update_state(plan, status="paused", paused={
            "round": r, "attempt": attempt, "key": key, "flow_run_id": str(ctx.flow_run.id) if ctx else None,
            "api_url": PREFECT_API_URL.value(), "to_label": to_label, "labels": str(out), "errors": errors,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        say(f"round {r}: waiting for labels of {to_label} (llama2-align rounds resume {plan.config.run_name} "
            f"--labels FILE, or Resume in the UI)")
        given = wait_for_labels(plan, key, _form_text(r, to_label, str(out), errors), to_label)
        try:
            records = lib.accept_labels(Path(given.labels), out)
        except InputError as err:
            errors = str(err)
            say(f"round {r}: the labelled file {given.labels} was refused; the run waits again:\n{errors}")
            create_markdown_artifact(f"# Round {r}: labelled file refused\n\n`{given.labels}`\n\n```\n{errors}\n```\n",
                                     key="rounds-label-errors", description=f"round {r}: why the labels were refused")
            continue
        lib.write_annotation_summary(records, summary, "human")
        lib.update_state(plan, status="running", paused=None)
        say(f"round {r}: {len(records)} labelled pairs accepted from {given.labels}")
        return str(out)
    raise AssertionError("unreachable")

"""Prefect artifacts for a finished stage: summary, metrics table, training curves, samples.

Keys are stable (``<stage>-summary``, ``<stage>-metrics``, ``<stage>-curves``, ``<stage>-samples``, and for reward
models ``<stage>-accuracy``), so the UI's artifact page for a key shows its history across runs. Plots are embedded
in markdown as ``data:image/png;base64,`` URIs: they render with no network and no file server
(ARCHITECTURE.md, "Artifacts").
The builders are pure functions of the StageResult; :func:`publish_stage_artifacts` sends them.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

from llama2_align.stages.common import StageResult

_KEY_BAD = re.compile(r"[^a-z0-9-]+")


def artifact_key(stage: str, kind: str) -> str:
    """``<stage>-<kind>`` in the alphabet Prefect accepts for keys: lowercase letters, digits, dashes."""
    key = _KEY_BAD.sub("-", f"{stage}-{kind}".lower()).strip("-")
    return re.sub(r"-{2,}", "-", key)


def png_data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _stage_file(result: StageResult, name: str) -> Path | None:
    rel = result.artifacts.get(name)
    if not rel:
        return None
    path = Path(result.out_dir) / rel
    return path if path.exists() else None


def summary_markdown(result: StageResult, tracking_link: str | None = None) -> str:
    prov = result.provenance or {}
    lines = [
        f"# {result.stage}: {result.status}",
        "",
        f"- **output**: `{result.final or result.out_dir}`",
        f"- **stage directory**: `{result.out_dir}`",
        f"- **steps**: {result.steps}",
        f"- **wall time**: {result.duration_s:.1f} s",
    ]
    if tracking_link:
        lines.append(f"- **MLflow run**: {tracking_link}")
    if prov.get("device") is not None:
        lines.append(f"- **device**: {_fmt(prov['device'])}")
    if prov.get("world_size"):
        lines.append(f"- **processes**: {prov['world_size']}")
    if prov.get("resumed_from"):
        lines.append(f"- **resumed from**: `{prov['resumed_from']}`")
    if prov.get("git_commit"):
        lines.append(f"- **git commit**: `{prov['git_commit']}`")
    lines += ["", "## Inputs", "", "| input | value | content hash |", "|---|---|---|"]
    for name, value in result.inputs.items():
        if isinstance(value, dict) and "path" in value:
            lines.append(f"| {name} | `{value['path']}` | `{str(value.get('hash', ''))[:24]}` |")
        else:
            lines.append(f"| {name} | `{value}` | |")
    headline = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if headline:
        lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in headline.items()]
    versions = prov.get("versions") or {}
    if versions:
        lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items() if v)]
    lines += ["", "## Config", "", "```json", json.dumps(result.config, indent=2, sort_keys=True, default=str), "```"]
    return "\n".join(lines) + "\n"


def metrics_rows(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """One row per metric; nested dicts one level deep become ``outer.inner`` rows."""
    rows = []
    for name, value in metrics.items():
        if isinstance(value, dict) and all(not isinstance(v, dict) for v in value.values()):
            rows += [{"metric": f"{name}.{k}", "value": _fmt(v)} for k, v in value.items()]
        elif not isinstance(value, dict):
            rows.append({"metric": name, "value": _fmt(value)})
    return rows


def accuracy_rows(table: dict[str, dict[str, float | None]], counts: dict[str, dict[str, int]] | None = None,
                  by_category: dict[str, float | None] | None = None) -> list[dict[str, Any]]:
    """The paper's Table 8 layout: one row per preference category, one column per rating (plus the average)."""
    rows = []
    for category, by_rating in table.items():
        row: dict[str, Any] = {"category": category}
        for rating, acc in by_rating.items():
            cell = "n/a" if acc is None else f"{100 * acc:.1f}"
            n = (counts or {}).get(category, {}).get(rating)
            row[rating.replace("_", " ")] = cell if n is None else f"{cell} (n={n})"
        overall = (by_category or {}).get(category)
        row["avg"] = "n/a" if overall is None else f"{100 * overall:.1f}"
        rows.append(row)
    return rows


def curves_markdown(result: StageResult, png: Path) -> str:
    return (f"# {result.stage}: training curves\n\n"
            f"![{result.stage} training curves]({png_data_uri(png)})\n\n"
            f"Source: `{png}` (from `{Path(result.out_dir) / 'metrics.jsonl'}`).\n")


def sample_rows(samples: list[dict], max_chars: int = 400) -> list[dict[str, str]]:
    return [{k: str(v)[:max_chars] for k, v in s.items()} for s in samples]


def publish_stage_artifacts(result: StageResult, tracking_link: str | None = None) -> dict[str, str]:
    """Create the stage's artifacts in the current Prefect run; returns ``{kind: key}``. ``tracking_link``: where
    the stage's MLflow run is (``llama2_align.tracking.run_link``), shown in the summary."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    stage = result.stage
    keys: dict[str, str] = {}

    def key(kind: str) -> str:
        keys[kind] = artifact_key(stage, kind)
        return keys[kind]

    create_markdown_artifact(summary_markdown(result, tracking_link), key=key("summary"),
                             description=f"{stage}: what was trained, from what, how, where the output is")
    create_table_artifact(metrics_rows(result.metrics), key=key("metrics"), description=f"{stage}: final metrics")
    if isinstance(result.metrics.get("accuracy_table"), dict):
        create_table_artifact(
            accuracy_rows(result.metrics["accuracy_table"], result.metrics.get("heldout_counts"),
                          result.metrics.get("accuracy_by_category")),
            key=key("accuracy"), description=f"{stage}: held-out accuracy (%) by category x rating (paper Table 8)")
    png = _stage_file(result, "curves")
    if png is not None:
        create_markdown_artifact(curves_markdown(result, png), key=key("curves"),
                                 description=f"{stage}: training curves")
    for name in result.artifacts:  # other plots a stage writes (e.g. the RS reward distribution)
        png = _stage_file(result, name)
        if name != "curves" and png is not None and png.suffix == ".png":
            create_markdown_artifact(f"# {stage}: {name.replace('_', ' ')}\n\n![{name}]({png_data_uri(png)})\n",
                                     key=key(name), description=f"{stage}: {name.replace('_', ' ')}")
    samples = _stage_file(result, "samples")
    if samples is not None:
        create_table_artifact(sample_rows(json.loads(samples.read_text())), key=key("samples"),
                              description=f"{stage}: sample generations on held-out prompts")
    return keys

"""Dataset records: the four kinds of docs_internal/SCHEMAS.md, their validation, readers and writers.

Every data set that enters the pipeline passes through :func:`read_records`. It reads JSONL, a JSON list,
Parquet, a ``datasets.Dataset`` or a list of dicts, converts the two public preference formats we support
(Anthropic HH-RLHF, PKU-SafeRLHF) into native records, and validates every record. A file with any bad record
is refused as a whole: :class:`DataValidationError` lists every problem as ``path:line: field: expected X, got Y``
so that a person can fix the file in one pass. Blank lines are skipped.

Line numbers are file lines for JSONL; for a JSON list, Parquet, a Dataset or a list of dicts they are the
1-based row number. For the adapters the number is the source row and fields are named after the converted
native record (for example ``messages[2].role``) unless the problem is in a source column.

This module imports neither torch nor Prefect; ``datasets`` is imported only when a Dataset is passed in.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from .errors import InputError, InputNotFoundError
from .io import atomic_write

__all__ = [
    "KINDS",
    "RATINGS",
    "CATEGORIES",
    "EVAL_CATEGORIES",
    "FORMATS",
    "Message",
    "SFTRecord",
    "PreferenceRecord",
    "PromptRecord",
    "EvalRecord",
    "Record",
    "RECORD_MODELS",
    "DataIssue",
    "DataValidationError",
    "read_records",
    "validate_records",
    "summarize",
    "write_jsonl",
    "write_parquet",
    "export_json_schemas",
]

KINDS = ("sft", "preference", "prompts", "eval")
# Llama 2 paper order: the margin of the reward-model loss falls from the first to the last.
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
CATEGORIES = ("helpfulness", "safety")
EVAL_CATEGORIES = ("helpful", "adversarial", "borderline")
ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "native", "hh-rlhf", "pku-saferlhf")

_MAX_ISSUES_SHOWN = 50


# --------------------------------------------------------------------------------------------------------------
# Record models
# --------------------------------------------------------------------------------------------------------------


def _non_empty(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty_string", "a non-empty string")
    return value


# minLength shows in the schema
NonEmptyStr = Annotated[str, StringConstraints(min_length=1), AfterValidator(_non_empty)]


def _rule_error(field: str, expected: str, got: str | None = None) -> PydanticCustomError:
    # A cross-field rule broken: the context carries the field so the issue can name it (loc would be empty).
    return PydanticCustomError("record_rule", "{expected}", {"field": field, "expected": expected, "got": got or ""})


class _Record(BaseModel):
    # strict: JSON 1 is not a bool, 3 is not a string. ignore: newer writers may add fields.
    model_config = ConfigDict(strict=True, extra="ignore")


class Message(_Record):
    """One dialogue turn."""

    role: Literal["system", "user", "assistant"]
    content: NonEmptyStr
    weight: int | None = Field(None, ge=0, le=1, strict=True,
                               description="assistant messages of an SFT dialogue only: 0, the answer is context and "
                                           "gets no loss; 1 or absent, it is trained")


def _dialogue_problem(messages: list[Message], end_with: str) -> tuple[str, str, str | None] | None:
    """Check the turn order of SCHEMAS.md: optional leading system, then user/assistant alternating from user."""
    if not messages:
        return ("messages", "a non-empty list of messages", "[]")
    start = 1 if messages[0].role == "system" else 0
    for i, msg in enumerate(messages):
        if msg.weight is not None and (msg.role != "assistant" or end_with != "assistant"):
            return (f"messages[{i}].weight", "no weight (only an SFT dialogue's assistant messages have one)",
                    repr(msg.weight))
    for i, msg in enumerate(messages[start:], start=start):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if msg.role != want:
            why = " (system is allowed only as the first message)" if msg.role == "system" else ""
            return (f"messages[{i}].role", f"'{want}'{why}", repr(msg.role))
    if len(messages) == start:
        return ("messages", "at least one user turn after the system message", None)
    last = messages[-1].role
    if last != end_with:
        return (f"messages[{len(messages) - 1}].role", f"'{end_with}' (the dialogue must end with {end_with})",
                repr(last))
    if end_with == "assistant" and all(m.weight == 0 for m in messages if m.role == "assistant"):
        return ("messages", "an assistant message without weight 0 (nothing would be trained)", "every weight 0")
    return None


class _HasContext(_Record):
    """Shared by preference and prompt records: the context is a prompt string or a dialogue ending with user."""

    id: NonEmptyStr | None = None
    prompt: NonEmptyStr | None = None
    messages: list[Message] | None = None

    def _check_context(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            got = "both" if self.prompt is not None else "neither"
            raise _rule_error("prompt/messages", "exactly one of 'prompt' or 'messages'", got)
        if self.messages is not None:
            problem = _dialogue_problem(self.messages, end_with="user")
            if problem:
                raise _rule_error(*problem)

    def context_messages(self) -> list[dict]:
        """The context as a list of ``{"role", "content"}`` dicts; a prompt string becomes one user turn."""
        if self.messages is not None:
            return [m.model_dump(exclude_none=True) for m in self.messages]
        return [{"role": "user", "content": self.prompt}]


class SFTRecord(_Record):
    """A demonstration: a dialogue (optional leading system turn, then user/assistant alternating) ending with the assistant."""  # noqa: E501 - the schema's description

    id: NonEmptyStr | None = None
    category: NonEmptyStr | None = None
    messages: list[Message]

    @model_validator(mode="after")
    def _check(self) -> "SFTRecord":
        problem = _dialogue_problem(self.messages, end_with="assistant")
        if problem:
            raise _rule_error(*problem)
        return self


class PreferenceRecord(_HasContext):
    """A preference pair: a context (prompt or messages ending with user), a chosen and a rejected answer, a rating."""

    chosen: NonEmptyStr
    rejected: NonEmptyStr
    rating: Literal["significantly_better", "better", "slightly_better", "negligibly_better"]
    category: Literal["helpfulness", "safety"]
    chosen_safe: bool | None = None
    rejected_safe: bool | None = None
    harm_category: NonEmptyStr | None = None

    @model_validator(mode="after")
    def _check(self) -> "PreferenceRecord":
        self._check_context()
        if self.chosen.strip() == self.rejected.strip():
            raise _rule_error("rejected", "an answer different from 'chosen'", "the same text as 'chosen'")
        return self


class PromptRecord(_HasContext):
    """A prompt for PPO or rejection sampling; is_safety picks the safety reward model in the PPO reward."""

    is_safety: bool
    category: NonEmptyStr | None = None

    @model_validator(mode="after")
    def _check(self) -> "PromptRecord":
        self._check_context()
        return self


class EvalRecord(_Record):
    """A held-out evaluation prompt; oracle holds the demo world's data to judge an answer."""

    id: NonEmptyStr
    prompt: NonEmptyStr
    category: Literal["helpful", "adversarial", "borderline"]
    harm_category: NonEmptyStr | None = None
    task: NonEmptyStr | None = None
    oracle: dict[str, Any] | None = None


Record = Union[SFTRecord, PreferenceRecord, PromptRecord, EvalRecord]
RECORD_MODELS: dict[str, type[_Record]] = {
    "sft": SFTRecord,
    "preference": PreferenceRecord,
    "prompts": PromptRecord,
    "eval": EvalRecord,
}


# --------------------------------------------------------------------------------------------------------------
# Issues
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataIssue:
    """One problem in one record. ``line`` is the file line (JSONL) or 1-based row; None for whole-file problems."""

    path: str
    line: int | None
    field: str
    expected: str
    got: str | None = None

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.field}: expected {self.expected}" + (f", got {self.got}" if self.got else "")


class DataValidationError(InputError):
    """The data were refused. ``issues`` holds every problem found; the message shows the first 50."""

    def __init__(self, issues: list[DataIssue]):
        self.issues = list(issues)
        super().__init__(self._message())

    def _message(self) -> str:
        n = len(self.issues)
        paths = sorted({i.path for i in self.issues})
        head = f"{n} data problem{'s' if n != 1 else ''} in {', '.join(paths)}; nothing was loaded:"
        lines = [head] + [f"  {issue}" for issue in self.issues[:_MAX_ISSUES_SHOWN]]
        if n > _MAX_ISSUES_SHOWN:
            lines.append(f"  ... and {n - _MAX_ISSUES_SHOWN} more")
        return "\n".join(lines)

    def __reduce__(self):  # picklable across processes (Prefect, multiprocessing)
        return (type(self), (self.issues,))


def _show(value: Any, limit: int = 80) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_EXPECTED_BY_TYPE = {
    "string_type": "a string",
    "bool_type": "a boolean (true/false)",
    "int_type": "an integer",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "empty_string": "a non-empty string",
    "string_too_short": "a non-empty string",
}


def _field_name(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<record>"


def _issues_from_validation(err: ValidationError, path: str, line: int | None) -> list[DataIssue]:
    issues = []
    for e in err.errors(include_url=False):
        kind, ctx = e["type"], e.get("ctx") or {}
        if kind == "record_rule":
            issues.append(DataIssue(path, line, ctx["field"], ctx["expected"], ctx.get("got") or None))
            continue
        field = _field_name(tuple(e["loc"]))
        if kind == "missing":
            issues.append(DataIssue(path, line, field, "a value (required field)", "missing"))
        elif kind == "literal_error":
            issues.append(DataIssue(path, line, field, f"one of {ctx['expected']}", _show(e["input"])))
        else:
            expected = _EXPECTED_BY_TYPE.get(kind, e["msg"])
            issues.append(DataIssue(path, line, field, expected, _show(e["input"])))
    return issues


# --------------------------------------------------------------------------------------------------------------
# Loading raw rows
# --------------------------------------------------------------------------------------------------------------

Row = tuple[int, Any]  # (line or row number, parsed value)


def _read_jsonl(path: Path, label: str) -> tuple[list[Row], list[DataIssue]]:
    rows, issues = [], []
    data = path.read_bytes()
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = raw[exc.start]
            issues.append(DataIssue(label, n, "<encoding>", "UTF-8 text",
                                    f"byte 0x{bad:02x} at column {exc.start + 1}"))
            continue
        if not text.strip():
            continue
        try:
            rows.append((n, json.loads(text)))
        except json.JSONDecodeError as exc:
            issues.append(DataIssue(label, n, "<json>", "valid JSON", f"{exc.msg} at column {exc.colno}"))
    return rows, issues


def _read_json(path: Path, label: str) -> tuple[list[Row], list[DataIssue]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        return [], [DataIssue(label, line, "<encoding>", "UTF-8 text", f"byte 0x{exc.object[exc.start]:02x}")]
    if not text.strip():
        return [], []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return [], [DataIssue(label, exc.lineno, "<json>", "valid JSON", f"{exc.msg} at column {exc.colno}")]
    if not isinstance(value, list):
        return [], [DataIssue(label, None, "<file>", "a JSON list of records", type(value).__name__)]
    return list(enumerate(value, start=1)), []


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    except (pa.ArrowException, OSError) as err:  # not Parquet, truncated, unreadable: the file is refused
        raise DataValidationError([DataIssue(str(path), None, "file", "a readable Parquet file",
                                             " ".join(str(err).split())[:200])]) from None


def _load_rows(source: Any, name: str | None) -> tuple[str, list[Row], list[DataIssue]]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or str(path)
        if not path.exists():
            raise InputNotFoundError(f"{path}: no such file")
        if path.is_dir():
            raise InputNotFoundError(f"{path}: is a directory; expected a .jsonl, .json or .parquet file")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return (label, *_read_jsonl(path, label))
        if suffix == ".json":
            return (label, *_read_json(path, label))
        if suffix == ".parquet":
            return label, _read_parquet(path), []
        raise InputError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    if isinstance(source, list):
        return name or "<records>", list(enumerate(source, start=1)), []
    if hasattr(source, "to_list") and hasattr(source, "column_names"):  # datasets.Dataset, without importing it
        return name or "<dataset>", list(enumerate(source.to_list(), start=1)), []
    raise TypeError(f"cannot read records from {type(source).__name__}; give a path, a list of dicts or a Dataset")


# --------------------------------------------------------------------------------------------------------------
# Adapters for public preference data sets
# --------------------------------------------------------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ASSISTANT = "\n\nAssistant:"


def _detect_format(rows: list[Row]) -> str:
    first = next((obj for _, obj in rows if isinstance(obj, dict)), None)
    if first is None:
        return "native"
    if {"response_0", "response_1", "better_response_id"} <= first.keys():
        return "pku-saferlhf"
    chosen, rejected = first.get("chosen"), first.get("rejected")
    if (isinstance(chosen, str) and isinstance(rejected, str) and "\n\nHuman:" in chosen
            and "\n\nHuman:" in rejected and "rating" not in first):
        return "hh-rlhf"
    return "native"


def _parse_hh_context(text: str) -> list[dict] | str:
    """Split an HH transcript prefix into messages; returns an error description instead on failure."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        return "a transcript starting with '\\n\\nHuman:'"
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def _adapt_hh(obj: dict, n: int, label: str, category: str) -> tuple[list[dict], list[DataIssue]]:
    """Anthropic HH-RLHF: ``{"chosen": transcript, "rejected": transcript}``.

    The shared transcript up to the last ``\\n\\nAssistant:`` is the context (messages, ending with the user);
    the two final assistant texts are chosen and rejected. HH has no ratings: every pair gets "better", the
    middle of the scale. The category is "helpfulness" unless the caller passes another (harmless-base: safety).
    """
    issues = []
    for key in ("chosen", "rejected"):
        if not isinstance(obj.get(key), str):
            got = "missing" if key not in obj else _show(obj[key])
            issues.append(DataIssue(label, n, key, "a string (an HH-RLHF transcript)", got))
    if issues:
        return [], issues
    contexts, answers = [], []
    for key in ("chosen", "rejected"):
        text = obj[key]
        cut = text.rfind(_HH_ASSISTANT)
        if cut < 0:
            issues.append(DataIssue(label, n, key, "a transcript with a final '\\n\\nAssistant:' turn", _show(text)))
            continue
        answer = text[cut + len(_HH_ASSISTANT):]
        if "\n\nHuman:" in answer:
            issues.append(DataIssue(label, n, key, "a transcript ending with an Assistant turn", _show(answer)))
        contexts.append(text[:cut])
        answers.append(answer.strip())
    if issues:
        return [], issues
    if contexts[0] != contexts[1]:
        return [], [DataIssue(label, n, "rejected", "the same dialogue as 'chosen' before the final Assistant turn",
                              "a different dialogue")]
    messages = _parse_hh_context(contexts[0])
    if isinstance(messages, str):
        return [], [DataIssue(label, n, "chosen", messages, _show(contexts[0]))]
    record = {"id": obj.get("id") if isinstance(obj.get("id"), str) else f"hh-{n:06d}",
              "messages": messages, "chosen": answers[0], "rejected": answers[1],
              "rating": "better", "category": category}
    return [record], []


def _adapt_pku(obj: dict, n: int, label: str) -> tuple[list[dict], list[DataIssue]]:
    """PKU-SafeRLHF: one row becomes up to two preference records.

    - helpfulness (when ``better_response_id`` is 0 or 1): chosen = the better response, rating "better"
      (PKU has no graded helpfulness rating).
    - safety (when ``safer_response_id`` is 0 or 1): chosen = the safer response, ``chosen_safe`` and
      ``rejected_safe`` from ``is_response_N_safe``; rating "significantly_better" when exactly one response is
      safe, "slightly_better" when both are safe or both unsafe. A row whose safer response is the unsafe one
      while the other is safe contradicts itself and is reported as bad.
    A null id skips that record; a row with neither id is bad. Severity and harm-category columns are ignored.
    """
    issues = []

    def need(key: str, types: tuple, expected: str, nullable: bool = False) -> None:
        value = obj.get(key)
        if value is None:
            ok = nullable and key in obj
        elif bool in types or isinstance(value, bool):  # JSON true is not an id, 1 is not a flag
            ok = bool in types and isinstance(value, bool)
        else:
            ok = isinstance(value, types)
        if not ok:
            issues.append(DataIssue(label, n, key, expected, "missing" if key not in obj else _show(value)))

    need("prompt", (str,), "a string")
    need("response_0", (str,), "a string")
    need("response_1", (str,), "a string")
    need("better_response_id", (int,), "0 or 1", nullable=True)
    need("safer_response_id", (int,), "0 or 1", nullable=True)
    need("is_response_0_safe", (bool,), "a boolean (true/false)")
    need("is_response_1_safe", (bool,), "a boolean (true/false)")
    for key in ("better_response_id", "safer_response_id"):
        if not any(i.field == key for i in issues) and obj.get(key) not in (None, 0, 1):
            issues.append(DataIssue(label, n, key, "0 or 1", _show(obj[key])))
    if issues:
        return [], issues
    better, safer = obj["better_response_id"], obj["safer_response_id"]
    if better is None and safer is None:
        return [], [DataIssue(label, n, "better_response_id/safer_response_id", "at least one of them set", "null")]
    responses = (obj["response_0"], obj["response_1"])
    safe = (obj["is_response_0_safe"], obj["is_response_1_safe"])
    base_id = obj["id"] if isinstance(obj.get("id"), str) else f"pku-{n:06d}"
    records = []
    if better is not None:
        records.append({"id": f"{base_id}-helpfulness", "prompt": obj["prompt"], "chosen": responses[better],
                        "rejected": responses[1 - better], "rating": "better", "category": "helpfulness"})
    if safer is not None:
        if safe[safer] is False and safe[1 - safer] is True:
            return [], [DataIssue(label, n, "safer_response_id", "the id of the safe response "
                                  f"(is_response_{1 - safer}_safe is true, is_response_{safer}_safe is false)",
                                  str(safer))]
        rating = "significantly_better" if safe[0] != safe[1] else "slightly_better"
        records.append({"id": f"{base_id}-safety", "prompt": obj["prompt"], "chosen": responses[safer],
                        "rejected": responses[1 - safer], "rating": rating, "category": "safety",
                        "chosen_safe": safe[safer], "rejected_safe": safe[1 - safer]})
    return records, []


# --------------------------------------------------------------------------------------------------------------
# Reading and validating
# --------------------------------------------------------------------------------------------------------------


def _validate_rows(rows: Iterable[Row], kind: str, label: str) -> tuple[list[Record], list[DataIssue]]:
    model = RECORD_MODELS[kind]
    records, issues = [], []
    for n, obj in rows:
        if not isinstance(obj, dict):
            issues.append(DataIssue(label, n, "<record>", "a JSON object", _show(obj)))
            continue
        try:
            records.append(model.model_validate(obj))
        except ValidationError as err:
            issues.extend(_issues_from_validation(err, label, n))
    return records, issues


def validate_records(rows: Iterable[dict], kind: str, path: str = "<records>") -> list[Record]:
    """Validate native dicts (row numbers from 1); raise :class:`DataValidationError` listing every problem."""
    return read_records(list(rows), kind, format="native", name=path)


def read_records(source: Any, kind: str, format: str = "auto", *, category: str | None = None,
                 name: str | None = None) -> list[Record]:
    """Read and validate records of one kind; all or nothing.

    Args:
        source: a path (``.jsonl``/``.ndjson``, ``.json`` holding a list, ``.parquet``), a ``datasets.Dataset``
            or a list of dicts.
        kind: one of :data:`KINDS`.
        format: "native" (SCHEMAS.md), "hh-rlhf", "pku-saferlhf" (both only for kind "preference"), or "auto":
            native unless the first record looks like HH (string chosen/rejected containing "\\n\\nHuman:" and no
            rating) or PKU (response_0, response_1, better_response_id).
        category: HH-RLHF only: the category of every pair (default "helpfulness"; "safety" for harmless-base).
        name: how to name the source in issues (default: the path, "<dataset>" or "<records>").

    Raises:
        DataValidationError: any problem in any record, or no records at all; ``issues`` lists them all.
        ValueError: an unknown kind, format or file type, or an adapter asked for a kind other than preference.
    """
    if kind not in KINDS:
        raise InputError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if format not in FORMATS:
        raise InputError(f"unknown format {format!r}; expected one of {FORMATS}")
    if format in ("hh-rlhf", "pku-saferlhf") and kind != "preference":
        raise InputError(f"format {format!r} holds preference pairs; it cannot be read as kind {kind!r}")
    if category is not None and category not in CATEGORIES:
        raise InputError(f"unknown category {category!r}; expected one of {CATEGORIES}")

    label, rows, issues = _load_rows(source, name)
    if format == "auto":
        format = _detect_format(rows) if kind == "preference" else "native"
    if format == "native":
        native_rows = rows
    else:
        native_rows = []
        for n, obj in rows:
            if not isinstance(obj, dict):
                issues.append(DataIssue(label, n, "<record>", "a JSON object", _show(obj)))
                continue
            if format == "hh-rlhf":
                converted, bad = _adapt_hh(obj, n, label, category or "helpfulness")
            else:
                converted, bad = _adapt_pku(obj, n, label)
            issues.extend(bad)
            native_rows.extend((n, rec) for rec in converted)
    records, bad = _validate_rows(native_rows, kind, label)
    issues.extend(bad)
    if not rows and not issues:
        issues.append(DataIssue(label, None, "<file>", "at least one record", "none (file has no records)"))
    if issues:
        # One problem reported once (PKU rows give two records that can share one); file order.
        unique = list(dict.fromkeys(issues))
        unique.sort(key=lambda i: (i.line is not None, i.line or 0))
        raise DataValidationError(unique)
    return records


# --------------------------------------------------------------------------------------------------------------
# Summaries and writing
# --------------------------------------------------------------------------------------------------------------


def _get(record: Any, key: str) -> Any:
    return record.get(key) if isinstance(record, dict) else getattr(record, key, None)


def summarize(records: Iterable[Record | dict], kind: str) -> dict:
    """Counts for reports: ``{"kind", "records", "by_category"}``, plus ``by_rating`` (preference) and
    ``by_harm_category`` (eval). A missing category or harm category counts under "none"."""
    if kind not in KINDS:
        raise InputError(f"unknown kind {kind!r}; expected one of {KINDS}")
    records = list(records)
    out: dict[str, Any] = {
        "kind": kind,
        "records": len(records),
        "by_category": dict(sorted(Counter(_get(r, "category") or "none" for r in records).items())),
    }
    if kind == "preference":
        counts = Counter(_get(r, "rating") for r in records)
        out["by_rating"] = {rating: counts[rating] for rating in RATINGS if counts[rating]}
    if kind == "eval":
        out["by_harm_category"] = dict(sorted(Counter(_get(r, "harm_category") or "none" for r in records).items()))
    return out


def _as_dict(record: Any) -> dict:
    if isinstance(record, BaseModel):
        return record.model_dump(mode="json", exclude_none=True)
    if isinstance(record, dict):
        return record
    raise TypeError(f"cannot write {type(record).__name__}; give dicts or record models")


def plain_messages(messages: Iterable[dict]) -> list[dict]:
    """Messages as ``{"role", "content"}`` dicts in that key order, whatever order they were read in (a samples file
    written with sorted keys): a data file a stage writes from reused samples then has the same bytes, and so the
    same content hash, as the one it wrote from fresh ones."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def write_jsonl(records: Iterable[Record | dict], path: str | os.PathLike) -> Path:
    """Write records (models or dicts) as UTF-8 JSONL, atomically; creates parent directories.

    Models are written with ``model_dump(exclude_none=True)``; non-ASCII text is kept as is. If a record cannot be
    serialised, the error is raised and an existing file at ``path`` is left untouched.
    """
    def write(fh):
        for record in records:
            fh.write(json.dumps(_as_dict(record), ensure_ascii=False) + "\n")

    return atomic_write(path, write)


def write_parquet(records: Iterable[Record | dict], path: str | os.PathLike) -> Path:
    """Write records as Parquet, atomically; columns are the union of all records' keys (absent = null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_as_dict(r) for r in records]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = pa.table({c: pa.array([row.get(c) for row in rows]) for c in columns})
    return atomic_write(path, lambda fh: pq.write_table(table, fh), mode="wb")


def export_json_schemas(out_dir: str | os.PathLike) -> list[Path]:
    """Write ``{kind}.schema.json`` (JSON Schema of each record model) into ``out_dir``; returns the paths.

    Cross-field rules (exactly one of prompt/messages, turn order, chosen != rejected) are not expressible in the
    generated schema; they are documented in data_specs/README.md and enforced by :func:`read_records`.
    """
    paths = []
    for kind, model in RECORD_MODELS.items():
        schema = model.model_json_schema()
        text = json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
        paths.append(atomic_write(Path(out_dir) / f"{kind}.schema.json", lambda fh, t=text: fh.write(t)))
    return paths


if __name__ == "__main__":
    # python -m llama2_align.data: regenerate data_specs/*.schema.json and the Parquet sample (from its JSONL twin).
    specs = Path(__file__).resolve().parent.parent / "data_specs"
    for p in export_json_schemas(specs):
        print(p)
    print(write_parquet(read_records(specs / "preference.sample.jsonl", "preference", "native"),
                        specs / "preference.sample.parquet"))

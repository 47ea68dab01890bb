"""Reduced records: what the audit keeps of a row it cannot keep as given, instead of dropping it.

A decision record the store cannot hold as given (a JSON column too large or too deeply nested to
encode, text the store refuses, a number past the column's range) is written in a reduced form:
each value that could not be kept is replaced, and the record's ``reasons`` say what was cut, with
the size and SHA-256 of what JSON could still encode. Should the store refuse even that, the
record is written as its ``skeleton``: who, when, what endpoint, which outcome, and why the rest
is missing. A span is reduced the same way (its attributes and events). docs/audit.md.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import orjson

MAX_ROW_BYTES = 1024 * 1024  # a journaled row longer than this is reduced before it is queued
MAX_JSON_BYTES = 512 * 1024  # a JSON column kept as given, in a reduced record
MAX_TEXT_CHARS = 4096  # a text column kept as given, in a reduced record
INT64 = (-(2**63), 2**63 - 1)
DECISION_JSON = ("policy_input", "decision", "content", "shadow")
SPAN_JSON = ("attributes", "events")
# What a skeleton keeps: enough to find the call and see it was served, refused or failed.
IDENTITY = ("id", "trace_id", "created_at", "outcome", "status_code", "endpoint", "key_id", "user", "team", "org",
            "requested_model", "routed_model", "provider", "stream", "approval_id", "policy_revision",
            "failed_open")
MARK = "lockgate.reduced"
# Columns the store requires: a value cut from one of them is stored as this (the reasons keep it).
REQUIRED: dict[str, Any] = {"outcome": "unknown", "endpoint": "unknown", "trace_id": "0" * 32, "status_code": 0,
                            "input_tokens": 0, "output_tokens": 0, "cost_micro_usd": 0, "duration_ms": 0.0,
                            "stream": False}


def _text(value: str) -> str:
    """Text any store holds: no NUL, no lone surrogate, at most MAX_TEXT_CHARS."""
    clean = value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    return clean if len(clean) <= MAX_TEXT_CHARS else clean[:MAX_TEXT_CHARS] + "…"


def _encoded(value: Any) -> bytes | None:
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)
    except (orjson.JSONEncodeError, TypeError, ValueError):
        return None


def _json_kept(value: Any) -> tuple[Any, str | None]:
    """A JSON column's value as kept, and what was cut (None: kept as given)."""
    encoded = _encoded(value)
    if encoded is not None and len(encoded) <= MAX_JSON_BYTES and b"\\u0000" not in encoded:
        return value, None
    if encoded is None:
        return {MARK: "it could not be encoded as JSON (too deeply nested, or values JSON cannot hold)"}, \
            "could not be encoded as JSON"
    digest = hashlib.sha256(encoded).hexdigest()
    why = f"{len(encoded)} bytes (more than {MAX_JSON_BYTES})" if len(encoded) > MAX_JSON_BYTES \
        else "it holds NUL characters"
    return {MARK: why, "bytes": len(encoded), "sha256": digest}, f"{why}, sha256 {digest}"


def _scalar(value: Any) -> tuple[Any, bool]:
    """A scalar column's value as kept, and whether it was changed."""
    if isinstance(value, str):
        kept = _text(value)
        return kept, kept != value
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value, False
    if isinstance(value, int):
        return (value, False) if INT64[0] <= value <= INT64[1] else (None, True)
    if hasattr(value, "isoformat"):  # a datetime
        return value, False
    return _text(str(value)), True


def _reasons(value: Any) -> list[str]:
    if not isinstance(value, list):
        return [_text(str(value))] if value is not None else []
    return [_text(str(item)) for item in value[:64]]


def reduce_decision(row: dict[str, Any], why: str) -> dict[str, Any]:
    """The record with every value the store may not hold replaced; ``reasons`` say what was cut."""
    kept: dict[str, Any] = {}
    cut: list[str] = []
    for name, value in row.items():
        if name == "reasons":
            continue
        if name in DECISION_JSON:
            kept[name], what = _json_kept(value)
            if what:
                cut.append(f"{name} ({what})")
        else:
            kept[name], changed = _scalar(value)
            if changed:
                cut.append(f"{name} (was {_text(repr(value))[:200]})")
    kept["reasons"] = [*_reasons(row.get("reasons")),
                       f"audit record reduced, {why}: " + ("; ".join(cut) if cut else "nothing cut")]
    return _required(kept)


def _required(kept: dict[str, Any]) -> dict[str, Any]:
    for name, empty in REQUIRED.items():
        if kept.get(name) is None:
            kept[name] = empty
    if kept.get("created_at") is None:
        kept["created_at"] = datetime.now(UTC)
    return kept


def skeleton(row: dict[str, Any], why: str) -> dict[str, Any]:
    """The least of a record: who, when, where and the outcome; every other column is empty."""
    kept: dict[str, Any] = {}
    for name in IDENTITY:
        if name in row:
            kept[name], _ = _scalar(row[name])
    kept["reasons"] = [f"audit record reduced to who, when and the outcome, {why}; everything else was cut"]
    return _required(kept)


def reduce_span(row: dict[str, Any], why: str) -> dict[str, Any]:
    kept = {name: (_scalar(value)[0] if name not in SPAN_JSON else value) for name, value in row.items()}
    for name in SPAN_JSON:
        value, what = _json_kept(row.get(name))
        if what:
            kept[name] = value if name == "attributes" else [{"name": MARK, "attributes": value}]
    attributes = kept.get("attributes")
    if isinstance(attributes, dict):
        kept["attributes"] = {**attributes, MARK + "_because": why}
    return kept

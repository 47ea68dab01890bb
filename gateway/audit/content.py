"""Prompt and reply content in the audit: off unless the policy's ``audit.content`` asks for it.

- ``hash``: the SHA-256 of the request body and of the reply (its JSON, or a stream's events), so
  a reviewer holding a copy can prove it was this call's, and the store holds none of the text.
- ``redacted``: the request body and the reply, with every secret-looking or personal string cut
  out: API keys and tokens (OpenAI, Anthropic, Lockgate, AWS, GitHub, Slack, Google, JWTs,
  ``Bearer ...``, ``password=...``), e-mail addresses and card numbers (Luhn-checked).
- ``full``: both as they were.

What is kept goes to the decision record's ``content`` column (never to spans, so never to an
OTLP collector); a stream's reply is kept up to ``MAX_REPLY_BYTES``. docs/audit.md.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

MODES = ("off", "hash", "redacted", "full")
MAX_REPLY_BYTES = 256 * 1024  # a streamed reply is kept up to this much (whole replies are kept whole)

_SECRETS = [
    ("api_key", re.compile(r"\b(?:sk|rk|pk)-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_\-]{16,}")),  # OpenAI, Anthropic (sk-ant-)
    ("api_key", re.compile(r"\blg[_-][A-Za-z0-9_\-]{16,}")),  # Lockgate's own keys
    ("api_key", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),  # AWS access key ids
    ("api_key", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b")),  # GitHub
    ("api_key", re.compile(r"\bgithub_pat_[A-Za-z0-9_]{30,}\b")),
    ("api_key", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}")),  # Slack
    ("api_key", re.compile(r"\bAIza[0-9A-Za-z_\-]{35}\b")),  # Google
    ("token", re.compile(r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}")),  # JWT
    ("token", re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/\-]{12,}=*")),
    ("secret", re.compile(r"(?i)\b(password|passwd|pwd|secret|api[_-]?key|access[_-]?token|token)(\s*[:=]\s*)"
                          r"(\"[^\"]+\"|'[^']+'|\S+)")),
    ("email", re.compile(r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}\b")),
]
_CARD = re.compile(r"\b\d(?:[ \-]?\d){12,18}\b")


def _luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"[ \-]", "", match.group(0))
    return "[REDACTED:card]" if 13 <= len(digits) <= 19 and _luhn(digits) else match.group(0)


def redact_text(text: str) -> str:
    for kind, pattern in _SECRETS:
        if kind == "secret":  # keep the name, cut the value
            text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}[REDACTED:secret]", text)
        else:
            text = pattern.sub(f"[REDACTED:{kind}]", text)
    return _CARD.sub(_card, text)


def redact(value: Any) -> Any:
    """Every string in a JSON value (keys included) with secrets and personal data cut out."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact_text(k) if isinstance(k, str) else k: redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")


def stream_events(raw: bytes) -> list[Any]:
    """A stream's relayed events as JSON values (their ``data:`` lines), in order."""
    return [_json(line[5:].strip()) for line in raw.splitlines()
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]"]


def captured(mode: str, request: bytes, reply: bytes | None, streamed: bool, truncated: bool = False
             ) -> dict[str, Any]:
    """The record's ``content`` for ``mode`` (not "off"), from the request body and the reply as
    the client sent and got them (a stream: the bytes of its events)."""
    if mode == "hash":
        return {"mode": "hash", "request_sha256": hashlib.sha256(request).hexdigest(),
                "reply_sha256": None if reply is None else hashlib.sha256(reply).hexdigest(),
                **({"reply_truncated": True} if truncated else {})}
    kept: dict[str, Any] = {"mode": mode, "request": _json(request),
                            "reply": None if reply is None else stream_events(reply) if streamed else _json(reply)}
    if truncated:
        kept["reply_truncated"] = True
    return redact(kept) if mode == "redacted" else kept

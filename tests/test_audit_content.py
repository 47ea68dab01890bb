"""Prompt and reply content in the audit (gateway/audit/content.py): none by default; the policy's
audit.content keeps a hash, a redacted copy or the whole of it, per call. A canary key, e-mail
address and card number in a prompt must never reach the store, its journal or the spans unless
the policy asked for full content."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.audit.content import redact_text
from gateway.settings import load_settings
from tests.conftest import InProcessGateway, in_process

POLICY = """package lockgate

import rego.v1

decision := {"allow": true, "reasons": ["ok"], "route": {"model": input.request.model},
             "audit": {"content": object.get(input.request.metadata, "capture", "off")}}
"""
CANARY_KEY = "sk-proj-CANARYc4n4ryC4N4RY0123456789abcdef"
CANARY_MAIL = "ana.canary@example.org"
CANARY_CARD = "4111 1111 1111 1111"
PROMPT = f"My key is {CANARY_KEY}, mail me at {CANARY_MAIL}, card {CANARY_CARD}. Say hi."
CANARIES = (CANARY_KEY, CANARY_MAIL, CANARY_CARD, "CANARYc4n4ry")


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[InProcessGateway, Path]]:
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "lockgate.rego").write_text(POLICY)
    settings = load_settings(environ={"LOCKGATE_DATABASE_URL": f"sqlite:///{tmp_path}/lockgate.db",
                                      "LOCKGATE_POLICY_DIR": str(tmp_path / "policy"),
                                      "LOCKGATE_AUDIT_JOURNAL_DIR": str(tmp_path / "journal")})
    with in_process(settings) as served:
        yield served, tmp_path


def call(gateway: InProcessGateway, key: str, capture: str | None, stream: bool = False) -> tuple[bytes, str]:
    body: dict[str, Any] = {"model": "mock-fast", "messages": [{"role": "user", "content": PROMPT}], "stream": stream}
    if capture:
        body["metadata"] = {"capture": capture}
    raw = orjson.dumps(body)
    response = gateway.client.post("/v1/chat/completions", content=raw,
                                   headers={"Authorization": f"Bearer {key}", "content-type": "application/json"})
    assert response.status_code == 200, response.text
    return raw, response.headers["lockgate-decision-id"]


def stored_bytes(folder: Path) -> bytes:
    """Every byte the store and the journal hold on disk."""
    return b"".join(path.read_bytes() for path in sorted(folder.rglob("*"))
                    if path.is_file() and (path.name.startswith("lockgate.db") or path.suffix == ".jsonl"))


def test_content_is_off_by_default_and_the_canary_appears_nowhere(gateway: tuple[InProcessGateway, Path]) -> None:
    served, folder = gateway
    key = served.create_key()
    _, whole = call(served, key, None)
    _, streamed = call(served, key, None, stream=True)
    records = {r["id"]: r for r in served.decisions()}
    assert records[whole]["content"] is None and records[streamed]["content"] is None
    on_disk = stored_bytes(folder)
    assert b"Say hi" not in on_disk
    assert not [c for c in CANARIES if c.encode() in on_disk]


def test_redacted_content_keeps_the_text_without_keys_mails_or_cards(gateway: tuple[InProcessGateway, Path]) -> None:
    served, folder = gateway
    key = served.create_key()
    _, whole = call(served, key, "redacted")
    _, streamed = call(served, key, "redacted", stream=True)
    records = {r["id"]: r for r in served.decisions()}
    for decision_id in (whole, streamed):
        content = records[decision_id]["content"]
        assert content["mode"] == "redacted"
        said = content["request"]["messages"][0]["content"]
        assert said == ("My key is [REDACTED:api_key], mail me at [REDACTED:email], card [REDACTED:card]. Say hi.")
        assert content["reply"]  # the reply is kept too
    assert records[whole]["content"]["reply"]["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(records[streamed]["content"]["reply"], list)  # a stream: its events
    on_disk = stored_bytes(folder)
    assert b"Say hi" in on_disk
    assert not [c for c in CANARIES if c.encode() in on_disk]


def test_hashed_content_proves_the_exchange_without_keeping_it(gateway: tuple[InProcessGateway, Path]) -> None:
    served, folder = gateway
    key = served.create_key()
    raw, decision_id = call(served, key, "hash")
    content = next(r for r in served.decisions() if r["id"] == decision_id)["content"]
    assert content["mode"] == "hash"
    assert content["request_sha256"] == hashlib.sha256(raw).hexdigest()
    assert len(content["reply_sha256"]) == 64
    on_disk = stored_bytes(folder)
    assert b"Say hi" not in on_disk and not [c for c in CANARIES if c.encode() in on_disk]


def test_full_content_keeps_the_exchange_as_it_was(gateway: tuple[InProcessGateway, Path]) -> None:
    served, _ = gateway
    key = served.create_key()
    _, decision_id = call(served, key, "full")
    content = next(r for r in served.decisions() if r["id"] == decision_id)["content"]
    assert content["request"]["messages"][0]["content"] == PROMPT


def test_a_policy_asking_for_an_unknown_content_mode_denies_the_call(gateway: tuple[InProcessGateway, Path]) -> None:
    served, _ = gateway
    key = served.create_key()
    response = served.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "mock-fast", "messages": [{"role": "user", "content": "hi"}],
                                        "metadata": {"capture": "everything"}})
    assert response.status_code == 503 and response.json()["error"]["code"] == "policy_error"


@pytest.mark.parametrize(("text", "expected"), [
    ("key sk-ant-api03-AbCdEfGhIjKlMnOpQrStUv here", "key [REDACTED:api_key] here"),
    ("aws AKIAIOSFODNN7EXAMPLE ok", "aws [REDACTED:api_key] ok"),
    ("Authorization: Bearer abcdefghijklmnop.qrstu", "Authorization: [REDACTED:token]"),
    ("password=hunter2 and more", "password=[REDACTED:secret] and more"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
     "jwt [REDACTED:token]"),
    ("write to bob.smith+tag@mail.example.co.uk", "write to [REDACTED:email]"),
    ("card 5500-0000-0000-0004 exp", "card [REDACTED:card] exp"),
    ("order 1234 5678 9012 3456 is no card", "order 1234 5678 9012 3456 is no card"),  # fails the Luhn check
    ("nothing secret here", "nothing secret here"),
])
def test_redaction(text: str, expected: str) -> None:
    assert redact_text(text) == expected

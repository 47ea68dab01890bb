"""Reviewing the audit: ``lockgate traces list`` filters (and pipes into ``head``), and
``GET /admin/traces`` pages through the records of the reviewer's own org only."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Gateway, start_gateway, stop_gateway


@pytest.fixture
def reviewed(store_url: str, tmp_path: Path) -> Iterator[tuple[Gateway, str, str]]:
    """Calls by ana and bob (org acme) and by olga (org other); a reviewer key of each org."""
    gateway = start_gateway(store_url, tmp_path)
    callers = {name: gateway.create_key(team="research", user=name, org=org)
               for name, org in (("ana", "acme"), ("bob", "acme"), ("olga", "other"))}
    for name, count in (("ana", 3), ("bob", 2), ("olga", 2)):
        sdk = openai.OpenAI(base_url=gateway.v1, api_key=callers[name], max_retries=0)
        for i in range(count):
            sdk.chat.completions.create(model="fast", messages=[{"role": "user", "content": f"{name} {i}"}])
    with pytest.raises(openai.PermissionDeniedError):  # a denied call of ana's
        openai.OpenAI(base_url=gateway.v1, api_key=callers["ana"], max_retries=0).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "no"}])
    deadline = time.monotonic() + 10
    while len(gateway.decisions()) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    acme = gateway.create_key(team="audit", user="rita", org="acme", roles=("reviewer",))
    other = gateway.create_key(team="audit", user="otto", org="other", roles=("reviewer",))
    yield gateway, acme, other
    stop_gateway(gateway)


def api(gateway: Gateway, key: str, path: str) -> httpx.Response:
    return httpx.get(gateway.base_url + path, headers={"authorization": f"Bearer {key}"}, timeout=10)


def test_a_reviewer_pages_through_her_own_orgs_records_only(reviewed: tuple[Gateway, str, str]) -> None:
    gateway, acme, other = reviewed
    first = api(gateway, acme, "/admin/traces?limit=4").json()
    assert len(first["data"]) == 4 and first["has_more"] and first["next_before"]
    rest = api(gateway, acme, f"/admin/traces?limit=4&before={first['next_before']}").json()
    records = first["data"] + rest["data"]
    users = sorted(r["user"] for r in records if r["endpoint"] == "chat.completions")
    assert users == ["ana"] * 4 + ["bob"] * 2 and not rest["has_more"]
    assert {r["org"] for r in api(gateway, other, "/admin/traces").json()["data"]} == {"other"}

    denied = api(gateway, acme, "/admin/traces?user=ana&outcome=denied").json()["data"]
    assert [(r["user"], r["outcome"], r["requested_model"]) for r in denied] == [("ana", "denied", "gpt-4o")]
    assert len(api(gateway, acme, "/admin/traces?model=mock-fast&user=bob").json()["data"]) == 2

    trace_id = denied[0]["trace_id"]
    detail = api(gateway, acme, f"/admin/traces/{trace_id}").json()
    assert detail["decisions"][0]["id"] == denied[0]["id"] and detail["spans"]
    refused = api(gateway, other, f"/admin/traces/{trace_id}")  # another org's trace is unknown to her
    assert (refused.status_code, refused.json()["error"]["code"]) == (404, "trace_not_found")
    caller = api(gateway, gateway.create_key(team="research", user="ana", org="acme"), "/admin/traces")
    assert (caller.status_code, caller.json()["error"]["code"]) == (403, "reviewer_role_required")


def test_traces_list_filters_and_pipes_into_head(reviewed: tuple[Gateway, str, str]) -> None:
    gateway, _, _ = reviewed
    listed = gateway.cli("traces", "list", "--user", "bob")
    assert listed.returncode == 0 and "TIME (UTC)" in listed.stdout
    assert len([line for line in listed.stdout.splitlines()[1:] if " bob " in line]) == 2
    assert gateway.cli("traces", "list", "--outcome", "denied").stdout.count("denied") == 1
    # A reader that is gone before the first line (as `| head -0` leaves it): no traceback, exit 0.
    gone = ("import os, sys; r, w = os.pipe(); os.close(r); os.dup2(w, 1); "
            "from gateway.cli import main; sys.exit(main(['traces', 'list']))")
    piped = subprocess.run([sys.executable, "-c", gone], capture_output=True, text=True, env=gateway.env, timeout=60)
    assert (piped.returncode, piped.stderr) == (0, "")


def test_traces_export_writes_jsonl_and_csv_with_the_same_filters(reviewed: tuple[Gateway, str, str]) -> None:
    import csv
    import io
    import json

    gateway, _, _ = reviewed
    lines = gateway.cli("traces", "export", "--user", "ana").stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["user"] for r in records if r["endpoint"] == "chat.completions"] == ["ana"] * 4
    assert records == sorted(records, key=lambda r: r["created_at"])  # oldest first
    assert all(r["created_at"].endswith("Z") and r["record_hash"] for r in records)

    exported = gateway.cli("traces", "export", "--format", "csv", "--outcome", "denied")
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert [(r["user"], r["outcome"]) for r in rows] == [("ana", "denied")]
    assert json.loads(rows[0]["reasons"]) and "exported 1 records" in exported.stderr

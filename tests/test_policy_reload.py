"""Hot reload and shadow mode (gateway/policy/reload.py, docs/policies.md).

A gateway under load gets a new policy folder: every call is answered, the records show the old
revision and then the new one, never a mix within a call; a broken folder is rejected while the
previous policy keeps serving; both events are spans in the audit store. A shadow policy is
evaluated beside the live one on every call and recorded, never applied."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.settings import load_settings
from gateway.store import async_url
from tests.conftest import in_process, run, start_gateway, stop_gateway

POLICY = """package lockgate

import rego.v1

decision := {
	"allow": allowed, "reasons": [sprintf("%s: %s", [version, verdict])],
	"route": {"model": input.request.model},
}

version := "VERSION"

default allowed := false

allowed if not input.request.model in data.lockgate.denied_models

verdict := "allowed" if allowed
else := "denied"
"""


def write(folder: Path, version: str, denied: list[str] | None = None, rego: str = POLICY) -> None:
    """Replace the folder's files the way a deployment does: each written aside, then renamed."""
    folder.mkdir(exist_ok=True)
    for name, content in (("data.json", json.dumps({"lockgate": {"denied_models": denied or []}})),
                          ("lockgate.rego", rego.replace("VERSION", version))):
        aside = folder / f".{name}.tmp"
        aside.write_text(content)
        os.replace(aside, folder / name)


async def stored(url: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as connection:
            records = [dict(r._mapping) for r in (await connection.execute(text(
                "SELECT id, status_code, reasons, policy_revision FROM decision_records"))).all()]
            spans = [dict(r._mapping) for r in (await connection.execute(text(
                "SELECT name, status, attributes FROM spans WHERE name LIKE 'lockgate.policy.%'"))).all()]
    finally:
        await engine.dispose()
    for record in records:
        if isinstance(record["reasons"], str):
            record["reasons"] = json.loads(record["reasons"])
    for span in spans:
        if isinstance(span["attributes"], str):
            span["attributes"] = json.loads(span["attributes"])
    return records, spans


def test_a_changed_policy_is_swapped_in_under_load_and_a_broken_one_rejected(store_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "policy"
    write(folder, "v1")
    gateway = start_gateway(store_url, tmp_path, policy_dir=str(folder), policy_reload_interval_s="0.1")
    key = gateway.create_key()
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=gateway.base_url, timeout=30) as client:
            while not stop.is_set() and len(answers) < 50_000:
                reply = client.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                    json={"model": "mock-fast", "messages": [{"role": "user", "content": "hi"}]})
                answers.append((reply.status_code, reply.headers.get("lockgate-decision-id", "")))

    workers = [threading.Thread(target=load) for _ in range(4)]
    try:
        for worker in workers:
            worker.start()
        time.sleep(0.5)
        write(folder, "v2")
        time.sleep(1.0)
        write(folder, "v3", rego="package lockgate\n\ndecision := {\"allow\": true  # a syntax error\n")
        time.sleep(1.0)
        write(folder, "v4", denied=["mock-fast"])
        deadline = time.monotonic() + 10
        while not (answers and answers[-1][0] == 403):  # v4 denies the model the load asks for
            assert time.monotonic() < deadline, (len(answers), answers[-3:], gateway.log.read_text()[-3000:])
            time.sleep(0.05)
        stop.set()
        for worker in workers:
            worker.join(30)
    finally:
        stop.set()
        stop_gateway(gateway)

    statuses = [status for status, _ in answers]
    first_denied = statuses.index(403)
    assert set(statuses[:first_denied]) == {200} and set(statuses[first_denied:]) == {403}, "no call failed"
    records, spans = run(stored(gateway.store_url))
    by_id = {r["id"]: r for r in records}
    versions = [by_id[i]["reasons"][0].split(":")[0] for _, i in answers]
    assert set(versions) == {"v1", "v2", "v4"}  # v3 never served
    revision_of = {v: {by_id[i]["policy_revision"] for (_, i), w in zip(answers, versions, strict=True) if w == v}
                   for v in ("v1", "v2", "v4")}
    assert all(len(r) == 1 for r in revision_of.values()), "one revision per version"
    reloaded = [s["attributes"] for s in spans if s["name"] == "lockgate.policy.reloaded"]
    assert [(a["lockgate.policy.previous_revision"], a["lockgate.policy.revision"]) for a in reloaded] == [
        (next(iter(revision_of["v1"])), next(iter(revision_of["v2"]))),
        (next(iter(revision_of["v2"])), next(iter(revision_of["v4"])))]
    [rejected] = [s for s in spans if s["name"] == "lockgate.policy.reload_rejected"]
    assert rejected["status"] == "ERROR"
    assert rejected["attributes"]["lockgate.policy.previous_revision"] == next(iter(revision_of["v2"]))


def test_a_shadow_policy_is_recorded_beside_the_live_one_and_never_applied(tmp_path: Path) -> None:
    live, shadow = tmp_path / "live", tmp_path / "shadow"
    write(live, "live")
    write(shadow, "candidate", denied=["mock-smart"])
    settings = load_settings(environ={"LOCKGATE_POLICY_DIR": str(live), "LOCKGATE_POLICY_SHADOW_DIR": str(shadow),
                                      "LOCKGATE_DATABASE_URL": f"sqlite:///{tmp_path}/lockgate.db"})
    with in_process(settings) as gateway:
        key = gateway.create_key()
        answers = {model: gateway.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                              json={"model": model, "messages": [{"role": "user", "content": "x"}]})
                   for model in ("mock-fast", "mock-smart")}
        shadow_revision = gateway.runtime.shadow.revision
        records = {r["id"]: r for r in gateway.decisions()}
    assert {m: a.status_code for m, a in answers.items()} == {"mock-fast": 200, "mock-smart": 200}  # never applied
    fast, smart = (records[answers[m].headers["lockgate-decision-id"]] for m in ("mock-fast", "mock-smart"))
    assert fast["shadow"]["allow"] is True and fast["shadow"]["reasons"] == ["candidate: allowed"]
    assert smart["shadow"]["allow"] is False and smart["shadow"]["reasons"] == ["candidate: denied"]
    assert smart["reasons"] == ["live: allowed"] and smart["shadow"]["revision"] == shadow_revision
    assert smart["policy_revision"] != shadow_revision and smart["shadow"]["error"] is None

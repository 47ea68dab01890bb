"""Stage 1, authenticate: virtual API keys, stored only as hashes, become Principals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.auth import KEY_PREFIX, KeyStore, bearer_token, hash_key
from gateway.errors import AuthenticationFailed
from gateway.store import create_store_engine
from gateway.types import Principal
from tests.conftest import run, start_gateway, stop_gateway


async def all_rows(engine: AsyncEngine, table: str) -> list[dict[str, Any]]:
    async with engine.connect() as connection:
        return [dict(row._mapping) for row in (await connection.execute(text(f"SELECT * FROM {table}"))).all()]


def dump(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, default=str)


# --- KeyStore -----------------------------------------------------------------------------------


async def test_a_created_key_is_stored_only_as_its_hash(engine: AsyncEngine) -> None:
    keys = KeyStore(engine, 0)

    issued = await keys.create(user="ana", team="research", org="acme", roles=("developer",))

    assert issued.key.startswith(KEY_PREFIX) and len(issued.key) > 40
    assert issued.record.id.startswith("k_")
    [row] = await all_rows(engine, "api_keys")
    assert row["key_hash"] == hash_key(issued.key) and len(row["key_hash"]) == 64
    assert row["prefix"] == issued.key[:10]  # enough to recognise a key in a listing, not to use it
    assert issued.key not in dump([row])
    assert issued.key[len(row["prefix"]):] not in dump([row])


async def test_authenticate_returns_the_keys_principal(engine: AsyncEngine) -> None:
    keys = KeyStore(engine, 0)
    issued = await keys.create(user="ana", team="research", org="acme", roles=("developer", "admin"),
                               labels={"cost_center": "r-17"})
    await keys.create(user="bo", team="support")

    principal = await keys.authenticate(issued.key)

    assert principal == Principal(key_id=issued.record.id, user="ana", team="research", org="acme",
                                  roles=("developer", "admin"), labels={"cost_center": "r-17"})
    assert (await keys.authenticate(issued.key)) == principal


@pytest.mark.parametrize("key", [None, "", "lg-not-a-real-key", "sk-someone-elses-key"])
async def test_missing_and_unknown_keys_are_refused(engine: AsyncEngine, key: str | None) -> None:
    keys = KeyStore(engine, 60)
    await keys.create(user="ana", team="research")

    with pytest.raises(AuthenticationFailed) as caught:
        await keys.authenticate(key)

    assert caught.value.status == 401 and caught.value.code == "invalid_api_key"
    if key:
        assert key not in caught.value.message


async def test_a_revoked_key_is_refused_at_once_without_a_cache(engine: AsyncEngine) -> None:
    keys = KeyStore(engine, 0)
    issued = await keys.create(user="ana", team="research")
    assert (await keys.authenticate(issued.key)).user == "ana"

    assert await keys.revoke(issued.record.id)

    with pytest.raises(AuthenticationFailed):
        await keys.authenticate(issued.key)
    assert not await keys.revoke(issued.record.id)  # already revoked
    assert not await keys.revoke("k_unknown")
    [listed] = await keys.list()
    assert listed.revoked_at is not None


async def test_a_cached_key_outlives_its_revocation_for_the_cache_ttl(engine: AsyncEngine) -> None:
    # By design: a replica serves verified keys from memory for auth_cache_ttl_s, so a revocation
    # takes effect within that time ("Running gateways refuse it within auth_cache_ttl_s seconds").
    cached = KeyStore(engine, 3600)
    issued = await cached.create(user="ana", team="research")
    principal = await cached.authenticate(issued.key)

    assert await KeyStore(engine, 0).revoke(issued.record.id)

    assert await cached.authenticate(issued.key) == principal  # the designed revocation delay
    with pytest.raises(AuthenticationFailed):
        await KeyStore(engine, 3600).authenticate(issued.key)  # a replica without it cached refuses it


@pytest.mark.parametrize(("authorization", "x_api_key", "expected"), [
    ("Bearer lg-abc", None, "lg-abc"),
    ("bearer lg-abc", None, "lg-abc"),
    ("BEARER lg-abc", None, "lg-abc"),
    ("Bearer   lg-abc  ", None, "lg-abc"),
    ("Bearer lg-abc", "lg-other", "lg-abc"),  # Authorization wins
    (None, "lg-xyz", "lg-xyz"),  # the Anthropic SDKs send x-api-key
    ("", "lg-xyz", "lg-xyz"),
    ("Basic dXNlcjpwYXNz", "lg-xyz", None),  # a malformed Authorization is not ignored in favour of x-api-key
    ("Bearer", None, None),
    ("Bearer ", None, None),
    ("Bearer    ", None, None),
    ("lg-abc", None, None),
    ("Token lg-abc", None, None),
    (None, None, None),
    (None, "", None),
])
def test_bearer_token(authorization: str | None, x_api_key: str | None, expected: str | None) -> None:
    assert bearer_token(authorization, x_api_key) == expected


# --- end to end ---------------------------------------------------------------------------------


async def _audit_tables(url: str) -> str:
    engine = create_store_engine(url)
    try:
        return dump(await all_rows(engine, "decision_records")) + dump(await all_rows(engine, "spans"))
    finally:
        await engine.dispose()


def test_the_key_never_reaches_the_log_or_the_audit(store_url: str, tmp_path: Path) -> None:
    # The most talkative settings: every request line and every debug message goes to the log.
    server = start_gateway(store_url, tmp_path, log_level="debug", access_log="true")
    try:
        key = server.create_key(team="support", user="bo")
        sdk = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
        sdk.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hello"}])
        list(sdk.chat.completions.create(model="fast", stream=True, messages=[{"role": "user", "content": "hi"}]))
        with pytest.raises(openai.PermissionDeniedError):  # denied by policy: support may not use mock-smart
            sdk.chat.completions.create(model="mock-smart", messages=[{"role": "user", "content": "x"}])
        assert [m.id for m in sdk.models.list()] == ["mock-fast", "fast"]  # and the policy's alias of it
        anthropic_style = httpx.post(server.v1 + "/chat/completions", headers={"x-api-key": key}, timeout=30,
                                     json={"model": "fast", "messages": [{"role": "user", "content": "hey"}]})
        assert anthropic_style.status_code == 200
        bad = httpx.post(server.v1 + "/chat/completions", headers={"Authorization": f"Basic {key}"}, timeout=30,
                         json={"model": "fast", "messages": [{"role": "user", "content": "x"}]})
        assert bad.status_code == 401

        decisions, _ = server.trace(bad.headers["lockgate-trace-id"])
        assert decisions and len(server.decisions()) == 6  # the models listing is recorded too
        server.trace(anthropic_style.headers["lockgate-trace-id"], spans=3)
        server.trace(bad.headers["lockgate-trace-id"], spans=1)
        audit = str(run(_audit_tables(store_url)))
        assert "bo" in audit and audit.count('"outcome"') == 6  # the rows are there to search
        stop_gateway(server)  # flushes and closes the log
        log = server.log.read_text()
        assert "POST /v1/chat/completions" in log  # the access log is on
        for secret in (key, key[len(KEY_PREFIX):]):
            assert secret not in audit
            assert secret not in log
        # The hash is no secret (it cannot be turned back into the key; debug logs of the SQL
        # driver show it), but the audit identifies the key by its id only.
        assert hash_key(key) not in audit
    finally:
        stop_gateway(server)


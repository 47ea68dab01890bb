"""Shared fixtures: a store on SQLite or PostgreSQL, the gateway as a real server, keys, audit reads.

Every test that takes ``store_url`` runs twice, on SQLite and on PostgreSQL. PostgreSQL tests
skip when no server answers, unless LG_TEST_REQUIRE_POSTGRES=1 (set by .ci/run), where they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from opentelemetry.sdk.trace import SpanProcessor
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.audit.reader import list_decisions, read_trace
from gateway.auth import KeyStore
from gateway.budgets import BudgetLedgerStore
from gateway.runtime import Runtime
from gateway.settings import Settings
from gateway.store import DirectStatements, create_store_engine, create_tables

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = os.environ.get("LG_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_POSTGRES = os.environ.get("LG_TEST_REQUIRE_POSTGRES") == "1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def write_policy(folder: Path, data: dict[str, Any] | None = None, **rego: str) -> Path:
    """A policy folder for a gateway: a copy of the shipped policy set (every module, test and
    data file, subfolders too), with ``data`` as its whole ``lockgate`` data instead of the
    shipped data files when given, and more rego files by name, replacing a shipped one of that
    name (``review=REVIEW`` writes review.rego, in place of the shipped reply review)."""
    shutil.copytree(ROOT / "policies", folder)
    if data is not None:
        for path in folder.rglob("*.json"):
            path.unlink()
        (folder / "data.json").write_text(json.dumps({"lockgate": data}))
    for name, text in rego.items():
        (folder / f"{name}.rego").write_text(text)
    return folder


def shipped_policy_data() -> dict[str, Any]:
    """The shipped policy set's ``lockgate`` data, every data file merged: to change and pass to
    ``write_policy``."""
    from gateway.policy.source import load_policy_source

    data = load_policy_source(ROOT / "policies", ()).data["lockgate"]
    del data["catalog"]  # the gateway adds its own
    return data


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    name = "lockgate_test_" + secrets.token_hex(4)
    try:
        run(_postgres_admin(f"CREATE DATABASE {name}"))
    except Exception as exc:
        if REQUIRE_POSTGRES:
            pytest.fail(f"PostgreSQL is required (LG_TEST_REQUIRE_POSTGRES=1) but unreachable: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    run(_postgres_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


async def _postgres_admin(statement: str, url: str = POSTGRES_ADMIN_URL) -> None:
    connection = await asyncpg.connect(url, timeout=5)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def _truncate_all(url: str) -> None:
    connection = await asyncpg.connect(url, timeout=5)
    try:
        tables = [r["tablename"] for r in await connection.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        if tables:
            await connection.execute("TRUNCATE " + ", ".join(tables))
    finally:
        await connection.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/lockgate.db"
        return
    url = request.getfixturevalue("postgres_url")
    run(_truncate_all(url))  # each test starts from empty tables
    yield url


@pytest.fixture
async def engine(store_url: str) -> AsyncIterator[AsyncEngine]:
    """An async engine on ``store_url`` with the tables created."""
    engine = create_store_engine(store_url)
    await create_tables(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
async def direct(engine: AsyncEngine, store_url: str) -> AsyncIterator[DirectStatements]:
    """The driver-level connection of the hot path and the audit writer (after ``engine`` made the tables)."""
    statements = await DirectStatements.open(store_url)
    yield statements
    await statements.close()


@pytest.fixture
def ledger(engine: AsyncEngine, direct: DirectStatements) -> BudgetLedgerStore:
    return BudgetLedgerStore(engine, direct, 0)


async def _create_key(url: str, team: str, user: str, org: str, roles: tuple[str, ...] = ()) -> str:
    engine = create_store_engine(url)
    try:
        await create_tables(engine)
        return (await KeyStore(engine, 0).create(user=user, team=team, org=org, roles=roles)).key
    finally:
        await engine.dispose()


async def _decisions(url: str, limit: int) -> list[dict[str, Any]]:
    engine = create_store_engine(url)
    try:
        return await list_decisions(engine, limit=limit)
    finally:
        await engine.dispose()


async def _trace(url: str, trace_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    engine = create_store_engine(url)
    try:
        return await read_trace(engine, trace_id)
    finally:
        await engine.dispose()


@dataclass
class Gateway:
    """A ``lockgate serve`` process on a loopback port, and ways to look into its store."""

    base_url: str
    store_url: str
    process: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def create_key(self, team: str = "research", user: str = "ana", org: str = "acme",
                   roles: tuple[str, ...] = ()) -> str:
        return str(run(_create_key(self.store_url, team, user, org, roles)))

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True,
                              env=self.env, timeout=60)

    def trace(self, trace_id: str, *, spans: int = 1, timeout_s: float = 10.0) -> tuple[list[dict], list[dict]]:
        """The decision records and spans of a trace, waiting for the audit writer to flush them."""
        deadline = time.monotonic() + timeout_s
        while True:
            decisions, found = run(_trace(self.store_url, trace_id))
            if (decisions and len(found) >= spans) or time.monotonic() > deadline:
                return decisions, found
            time.sleep(0.05)

    def decisions(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(run(_decisions(self.store_url, limit)))


def start_gateway(store_url: str, tmp_path: Path, **settings: str) -> Gateway:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("LOCKGATE_")}
    env.update({"LOCKGATE_DATABASE_URL": store_url, "LOCKGATE_PORT": str(port),
                "LOCKGATE_AUDIT_FLUSH_INTERVAL_S": "0.05", "PYTHONPATH": str(ROOT)})
    env.update({"LOCKGATE_" + key.upper(): value for key, value in settings.items()})
    log = tmp_path / f"gateway-{port}.log"
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], env=env, cwd=tmp_path,
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(base_url + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"gateway did not become ready:\n{log.read_text()}")
        time.sleep(0.05)
    return Gateway(base_url=base_url, store_url=store_url, process=process, log=log, env=env)


def stop_gateway(gateway: Gateway) -> None:
    gateway.process.terminate()
    try:
        gateway.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        gateway.process.kill()
        gateway.process.wait()


@pytest.fixture
def gateway(store_url: str, tmp_path: Path) -> Iterator[Gateway]:
    """The gateway on its defaults (default policy, mock provider) against ``store_url``."""
    server = start_gateway(store_url, tmp_path)
    yield server
    stop_gateway(server)


@dataclass
class InProcessGateway:
    """The app in process (Starlette's TestClient): for routing, policy and error-shape tests.

    The app runs on the TestClient's own event loop thread; ``call`` runs a coroutine there,
    which is where the store engine and the policy engine belong.
    """

    client: TestClient

    @property
    def runtime(self) -> Runtime:
        return self.client.app_state["runtime"]  # type: ignore[no-any-return]

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.portal.call(fn, *args)  # type: ignore[union-attr]

    def create_key(self, team: str = "research", user: str = "ana") -> str:
        async def create() -> str:
            return (await KeyStore(self.runtime.engine, 0).create(user=user, team=team)).key

        return str(self.call(create))

    def decisions(self) -> list[dict[str, Any]]:
        """Every decision record, newest first, after flushing the audit buffer."""
        async def read() -> list[dict[str, Any]]:
            await self.runtime.audit.flush()
            return await list_decisions(self.runtime.engine, limit=1000)

        return list(self.call(read))


@contextmanager
def in_process(settings: Settings, span_processors: Sequence[SpanProcessor] = ()) -> Iterator[InProcessGateway]:
    with TestClient(create_app(settings, span_processors)) as client:
        yield InProcessGateway(client)

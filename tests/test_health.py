"""Liveness and readiness."""

from __future__ import annotations

from pathlib import Path

from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import load_settings


def test_healthz_and_readyz(tmp_path: Path) -> None:
    settings = load_settings(environ={"LOCKGATE_DATABASE_URL": f"sqlite:///{tmp_path}/lockgate.db"})
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready"}
        client.portal.call(client.app_state["runtime"].engine.dispose)  # type: ignore[union-attr]
        (tmp_path / "lockgate.db").unlink()
        (tmp_path / "lockgate.db").mkdir()  # the store's file is now unusable
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {"status": "unavailable", "store": "unreachable"}


def test_readyz_fails_when_the_hot_paths_own_connection_is_gone(tmp_path: Path) -> None:
    settings = load_settings(environ={"LOCKGATE_DATABASE_URL": f"sqlite:///{tmp_path}/lockgate.db"})
    with TestClient(create_app(settings)) as client:
        client.portal.call(client.app_state["runtime"].direct.close)  # type: ignore[union-attr]
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {"status": "unavailable", "store": "unreachable"}

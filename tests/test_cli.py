"""The ``lockgate`` command (gateway/cli.py): ``serve`` refuses what cannot serve with one line
before the port is bound, and ``traces`` shows which API each call came in on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.settings import load_settings
from tests.conftest import ROOT, free_port, in_process


@pytest.mark.parametrize(("setting", "value", "reason"), [
    ("LOCKGATE_DATABASE_URL", "postgresql://lockgate:s3cret-pw@127.0.0.1:1/lockgate", "cannot open the store"),
    ("LOCKGATE_MODELS", json.dumps([{"name": "m", "provider": "no-such-provider"}]), "unknown providers"),
])
def test_serve_refuses_what_cannot_serve_in_one_line(tmp_path: Path, setting: str, value: str, reason: str) -> None:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin", "LOCKGATE_PORT": str(free_port()), setting: value}
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "serve"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path, env=env)

    assert result.returncode == 2, result.stderr
    assert reason in result.stderr and "Traceback" not in result.stderr
    assert "serving" not in result.stderr and "s3cret-pw" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_traces_show_the_endpoint_of_each_call(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path}/lockgate.db"
    with in_process(load_settings(environ={"LOCKGATE_DATABASE_URL": url})) as gateway:
        key = {"authorization": f"Bearer {gateway.create_key()}"}
        embedded = gateway.client.post("/v1/embeddings", headers=key, json={"model": "fast", "input": "hi"})
        gateway.client.get("/v1/models", headers=key)
        gateway.decisions()  # flushes the audit writer
    monkeypatch.setenv("LOCKGATE_DATABASE_URL", url)

    assert main(["traces", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert main(["traces", "show", embedded.headers["lockgate-trace-id"]]) == 0
    shown = capsys.readouterr().out.splitlines()

    assert listed[0].split()[:5] == ["TRACE", "TIME", "(UTC)", "ENDPOINT", "OUTCOME"]
    assert [line.split()[3] for line in listed[1:]] == ["models.list", "embeddings"]  # newest first
    assert shown[0].split()[:3] == ["decision", embedded.headers["lockgate-decision-id"], "embeddings"]

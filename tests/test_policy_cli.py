"""``lockgate policy check|test|eval|replay|shadow-report`` (gateway/cli.py): each reads the
configured policy folder and says which folder and revision it used; replay and the shadow report
read decision records written by real calls through a gateway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from tests.conftest import ROOT, Gateway, shipped_policy_data, start_gateway, stop_gateway, write_policy

WARNING = "package lockgate\nimport rego.v1\n\npricey if input.estimate.cost_usd_max > 0.5\n"
REFUSED = 'package lockgate\nimport rego.v1\n\nx := http.send({"method": "get", "url": "http://intra/#a"})\n'
FAILING_TEST = ("package extra_test\nimport rego.v1\nimport data.lockgate\n\n"
                "test_support_may_use_smart if {\n"
                '  d := lockgate.decision with input as {"principal": {"team": "support"}, '
                '"request": {"model": "mock-smart", "tools": []}}\n  d.allow\n}\n')


def lockgate(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOCKGATE_")}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**clean, "PYTHONPATH": str(ROOT), **env})


def shipped_copy(folder: Path, **rego: str) -> Path:
    return write_policy(folder, **rego)


def test_every_policy_command_says_which_folder_it_read_flag_over_environment_over_yaml(tmp_path: Path) -> None:
    in_yaml, in_env, in_flag = (shipped_copy(tmp_path / n, marker=f"package {n}\n") for n in ("yaml", "env", "flag"))
    config = tmp_path / "lockgate.yaml"
    config.write_text(f"policy_dir: {in_yaml}\n")
    given = tmp_path / "input.json"
    given.write_text('{"principal": {"team": "research"}, "request": {"model": "fast", "tools": []}}')

    for command in (["check"], ["test"], ["eval", "--input", str(given)]):
        from_yaml = lockgate("--config", str(config), "policy", *command, cwd=tmp_path)
        from_env = lockgate("--config", str(config), "policy", *command, cwd=tmp_path, LOCKGATE_POLICY_DIR=str(in_env))
        from_flag = lockgate("--config", str(config), "policy", *command, "--policy-dir", str(in_flag), cwd=tmp_path,
                             LOCKGATE_POLICY_DIR=str(in_env))
        shipped = lockgate("policy", *command, cwd=tmp_path)

        for result, folder, origin in ((from_yaml, in_yaml, f"policy_dir in {config}"),
                                       (from_env, in_env, "LOCKGATE_POLICY_DIR"), (from_flag, in_flag, "--policy-dir"),
                                       (shipped, ROOT / "policies", "the shipped policies")):
            assert result.returncode == 0, result.stdout + result.stderr
            first = result.stderr.splitlines()[0]
            assert first.startswith(f"lockgate: policy folder {folder} (from {origin}), revision sha256:"), first
        revisions = {r.stderr.split("revision ")[1].split()[0] for r in (from_yaml, from_env, from_flag, shipped)}
        assert len(revisions) == 4


def test_check_prints_errors_and_warnings_with_file_line_and_column(tmp_path: Path) -> None:
    refused = shipped_copy(tmp_path / "refused", extra=REFUSED, money=WARNING.replace("lockgate", "money"))
    warned = shipped_copy(tmp_path / "warned", money=WARNING.replace("lockgate", "money"))

    bad = lockgate("policy", "check", "--policy-dir", str(refused), cwd=tmp_path)
    good = lockgate("policy", "check", "--policy-dir", str(warned), cwd=tmp_path)

    assert bad.returncode == 1
    assert bad.stdout.splitlines() == [
        f"{refused}/extra.rego:4:6: error: http.send is not allowed in a Lockgate policy: a decision must not "
        "depend on the network or the engine's runtime",
        f"{refused}/money.rego:4:11: warning: compares float dollars (input.estimate.cost_usd_max); regorus does "
        "float arithmetic in binary: use integer micro-dollars (input.estimate.cost_micro_usd_max)",
        "1 error, 1 warning: refused: the gateway would not load it"]
    assert good.returncode == 0 and good.stdout.splitlines()[-1] == "0 errors, 1 warning: it loads"


def test_check_refuses_a_recursive_rule_and_a_parse_error(tmp_path: Path) -> None:
    recursive = shipped_copy(tmp_path / "r", loop="package loop\nimport rego.v1\n\nf(x) := f(x) if input.request."
                                                  "metadata.loop\n")
    broken = shipped_copy(tmp_path / "b", broken="package broken\n\nx := {\n")

    loop = lockgate("policy", "check", "--policy-dir", str(recursive), cwd=tmp_path)
    parse = lockgate("policy", "check", "--policy-dir", str(broken), cwd=tmp_path)

    assert loop.returncode == 1 and loop.stdout.startswith(f"{recursive}/loop.rego:4:1: error: recursive rules")
    assert parse.returncode == 1 and parse.stdout.startswith(f"{broken}/broken.rego:")
    assert "Traceback" not in loop.stderr + parse.stderr


def test_test_reports_each_test_and_fails_with_one_failing_test(tmp_path: Path) -> None:
    folder = shipped_copy(tmp_path / "p")
    (folder / "extra_test.rego").write_text(FAILING_TEST)

    result = lockgate("policy", "test", cwd=tmp_path, LOCKGATE_POLICY_DIR=str(folder))

    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "FAIL data.extra_test.test_support_may_use_smart: evaluated to None" in lines
    assert "PASS data.lockgate_test.test_research_may_use_mock_fast" in lines
    passed = sum(1 for line in lines if line.startswith("PASS "))
    assert passed > 50  # every shipped test ran
    assert lines[-1] == f"{passed} passed, 1 failed"


def test_eval_prints_the_decision_as_json(tmp_path: Path) -> None:
    given = tmp_path / "input.json"
    given.write_text(json.dumps({"principal": {"team": "support"}, "request": {"model": "smart", "tools": []}}))

    result = lockgate("policy", "eval", "--input", str(given), cwd=tmp_path)
    from_stdin = subprocess.run([sys.executable, "-m", "gateway.cli", "policy", "eval", "--input", "-"],
                                input=given.read_text(), capture_output=True, text=True, timeout=60,
                                env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"})

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"allow": False, "reasons": [
        "team support may not use model mock-smart (allowed: mock-fast)"]}
    assert json.loads(from_stdin.stdout) == json.loads(result.stdout)


def test_eval_of_a_file_that_is_not_json_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    given = tmp_path / "input.json"
    given.write_bytes(b"\xff\xfe{")

    result = lockgate("policy", "eval", "--input", str(given), cwd=tmp_path)

    assert result.returncode == 2 and "input.json is not JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_never_evaluates_a_policy_the_guard_refuses(tmp_path: Path) -> None:
    folder = shipped_copy(tmp_path / "p", loop="package lockgate\nimport rego.v1\n\nloop := loop + 1\n")
    given = tmp_path / "input.json"
    given.write_text("{}")

    result = lockgate("policy", "eval", "--input", str(given), "--rule", "data.lockgate.loop", "--policy-dir",
                      str(folder), cwd=tmp_path)

    assert result.returncode == 1 and "loop.rego:4:1: error: recursive rules" in result.stderr
    assert result.stdout == ""


def denies_research(folder: Path) -> Path:
    data = shipped_policy_data()
    del data["teams"]["research"]
    return write_policy(folder, data)


@pytest.fixture
def shadowed(store_url: str, tmp_path: Path) -> tuple[Gateway, Path]:
    """A gateway on the shipped policy with a candidate that denies team research as its shadow,
    after three calls: two of research's, one of support's."""
    candidate = denies_research(tmp_path / "candidate")
    gateway = start_gateway(store_url, tmp_path, policy_shadow_dir=str(candidate))
    try:
        for team in ("research", "support", "research"):
            client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.create_key(team=team), max_retries=0)
            client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
        deadline = time.monotonic() + 10
        while len(gateway.decisions()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield gateway, candidate  # type: ignore[misc]
    finally:
        stop_gateway(gateway)


def test_replay_lists_the_decisions_a_candidate_would_change(shadowed: tuple[Gateway, Path]) -> None:
    gateway, candidate = shadowed
    records = {r["id"]: r for r in gateway.decisions()}

    result = gateway.cli("policy", "replay", "--since", "1h", "--policy-dir", str(candidate))

    assert result.returncode == 0, result.stderr
    assert f"policy folder {candidate} (from --policy-dir)" in result.stderr
    assert "replaying 3 recorded calls" in result.stderr
    header, *changed, summary = result.stdout.splitlines()
    assert header.split()[:2] == ["RECORD", "TIME"]
    assert len(changed) == 2
    for line in changed:
        record = records[line.split()[0]]
        assert record["team"] == "research"
        assert "allow mock-fast -> deny" in line and line.endswith("allow→deny")
    assert summary == "3 decisions compared, 2 would change (allow→deny 2)"


def test_replay_of_the_live_policy_changes_nothing(shadowed: tuple[Gateway, Path]) -> None:
    gateway, _ = shadowed
    result = gateway.cli("policy", "replay", "--since", "1h")

    assert result.returncode == 0, result.stderr
    assert "(from the shipped policies)" in result.stderr
    assert result.stdout.splitlines()[1:] == ["3 decisions compared, 0 would change"]


def test_shadow_report_lists_where_the_shadow_disagreed(shadowed: tuple[Gateway, Path]) -> None:
    gateway, _ = shadowed

    result = gateway.cli("policy", "shadow-report", "--since", "1h")
    later = gateway.cli("policy", "shadow-report", "--since", "2099-01-01")

    assert result.returncode == 0, result.stderr
    header, *changed, summary = result.stdout.splitlines()
    assert len(changed) == 2 and all(line.endswith("allow→deny") for line in changed)
    assert "LIVE -> SHADOW" in header
    assert summary == "3 decisions compared, 2 disagree (allow→deny 2)"
    assert later.stdout.splitlines()[1:] == ["0 decisions compared, 0 disagree"]

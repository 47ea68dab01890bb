"""Settings: declared once, documented, parsed from file and environment, loud on bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import SETTINGS, SettingsError, describe_settings, load_settings

DOCS = Path(__file__).resolve().parents[1] / "docs" / "settings.md"


def test_every_setting_is_documented_in_docs() -> None:
    assert describe_settings() in DOCS.read_text(), "docs/settings.md is stale: regenerate it with `lockgate settings`"
    for setting in SETTINGS:
        assert setting.help.strip(), f"setting {setting.name} has no help text"


def test_defaults_need_no_file_or_environment() -> None:
    settings = load_settings(environ={})
    assert settings.database_url == "sqlite:///lockgate.db"
    assert [m.name for m in settings.models] == ["mock-fast", "mock-smart"]
    assert all(m.provider == "mock" for m in settings.models)


def test_environment_beats_file_beats_default(tmp_path: Path) -> None:
    config = tmp_path / "lockgate.yaml"
    config.write_text("port: 9000\nupstream_retries: 3\nmodels:\n  - {name: local, provider: openai, "
                      "base_url: 'http://127.0.0.1:11434/v1', upstream_model: llama3}\n")
    settings = load_settings(environ={"LOCKGATE_CONFIG": str(config), "LOCKGATE_PORT": "9100"})
    assert settings.port == 9100
    assert settings.upstream_retries == 3
    [model] = settings.models
    assert (model.name, model.upstream_model, model.base_url) == ("local", "llama3", "http://127.0.0.1:11434/v1")
    assert load_settings(config, environ={}, port=9200).port == 9200


@pytest.mark.parametrize(("environ", "message"), [
    ({"LOCKGATE_PORT": "eighty"}, "LOCKGATE_PORT"),
    ({"LOCKGATE_UPSTREAM_RETRIES": "-1"}, "must be zero or more"),
    ({"LOCKGATE_ACCESS_LOG": "maybe"}, "expected true or false"),
    ({"LOCKGATE_LOG_LEVEL": "loud"}, "expected one of"),
    ({"LOCKGATE_MODELS": '[{"name": "x"}]'}, "name and provider"),
    ({"LOCKGATE_MODELS": '[{"name": "x", "provider": "mock", "colour": "red"}]'}, "colour"),
    ({"LOCKGATE_PROT": "8080"}, "unknown environment settings LOCKGATE_PROT"),
])
def test_bad_values_fail_loudly(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(environ=environ)


def test_unknown_settings_in_file_fail(tmp_path: Path) -> None:
    config = tmp_path / "lockgate.yaml"
    config.write_text("prot: 1\n")
    with pytest.raises(SettingsError, match="unknown settings prot"):
        load_settings(config, environ={})


def test_provider_keys_come_from_the_named_variable_only() -> None:
    settings = load_settings(environ={"OPENAI_API_KEY": "sk-test"})
    assert settings.secret("OPENAI_API_KEY") == "sk-test"
    assert settings.secret("") == ""


@pytest.mark.parametrize("environ, message", [
    ({"LOCKGATE_POLICY_ENGINE": "opa"}, "opa_url must name the OPA server"),
    ({"LOCKGATE_POLICY_ENGINE": "rego"}, "expected one of embedded, opa"),
    ({"LOCKGATE_OPA_URL": "127.0.0.1:8181"}, "expected http://HOST:PORT"),
    ({"LOCKGATE_OPA_URL": "http://opa:8181/v1"}, "takes no path"),
    ({"LOCKGATE_OPA_URL": "http://user:pw@opa:8181"}, "takes no path, query or credentials"),
    ({"LOCKGATE_OPA_MODE": "pull"}, "expected one of push, bundle"),
    ({"LOCKGATE_OPA_TIMEOUT_S": "0"}, "must be more than zero"),
])
def test_opa_engine_settings_are_checked(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(environ=environ)


def test_opa_engine_settings_parse() -> None:
    settings = load_settings(environ={"LOCKGATE_POLICY_ENGINE": "opa", "LOCKGATE_OPA_URL": "https://opa.internal:8181/",
                                      "LOCKGATE_OPA_TOKEN": "t"})
    assert (settings.policy_engine, settings.opa_url, settings.opa_mode, settings.opa_timeout_s) == (
        "opa", "https://opa.internal:8181", "push", 1.0)
    assert settings.secret(settings.opa_token_env) == "t"

"""Every setting, declared once with its default and help text.

Values come from, lowest to highest precedence: the defaults below, a YAML file (``--config``
or ``LOCKGATE_CONFIG``), and ``LOCKGATE_<NAME>`` environment variables. Bad values fail loudly
at start-up. This is the only module that reads the environment.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from gateway.types import CatalogModel, Deployment

ENV_PREFIX = "LOCKGATE_"


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    parse: Callable[[Any], Any]


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _positive(kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        number = kind(value)
        if not number >= 0:  # NaN too: a timer at NaN seconds would disorder the event loop's timers
            raise ValueError(f"must be zero or more, got {value!r}")
        return number

    return parse


def _above_zero(kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        number = kind(value)
        if not number > 0:
            raise ValueError(f"must be more than zero, got {value!r}")
        return number

    return parse


# JSON serialisers stop at 255 levels (orjson among them); the policy input, written into every
# decision record, wraps the body's values a few levels deeper. A deeper limit would let a body
# in that the audit cannot write.
MAX_REQUEST_DEPTH = 128


def _depth(value: Any) -> int:
    depth = int(value)
    if not 1 <= depth <= MAX_REQUEST_DEPTH:
        raise ValueError(f"must be between 1 and {MAX_REQUEST_DEPTH}, got {value!r}")
    return depth


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return parse


_DEPLOYMENT_FIELDS = ("provider", "upstream_model", "base_url", "api_key_env", "api_version", "weight", "timeout_s")


def _deployments(entry: Mapping[str, Any]) -> tuple[Deployment, ...]:
    """A model's deployments: its ``deployments`` list, each entry taking what it leaves out from
    the model itself, or the model's own fields as its one deployment."""
    listed = entry.get("deployments") or [{}]
    if not isinstance(listed, list) or not all(isinstance(d, Mapping) for d in listed):
        raise ValueError(f"model {entry.get('name')!r}: deployments must be a list of mappings")
    for where in (entry, *listed):  # the model's timeout_s, and each deployment's own
        timeout = where.get("timeout_s")
        if timeout is not None and not (_number(timeout) and timeout > 0):
            raise ValueError(f"model {entry.get('name')!r}: timeout_s must be a number of seconds above zero, "
                             f"got {timeout!r}")
    deployments = []
    for item in listed:
        unknown = sorted(set(item) - set(_DEPLOYMENT_FIELDS))
        if unknown:
            raise ValueError(f"model {entry.get('name')!r}: unknown deployment fields {', '.join(unknown)}")
        fields = {name: item.get(name, entry.get(name)) for name in _DEPLOYMENT_FIELDS}
        fields = {name: value for name, value in fields.items() if value is not None}
        fields.setdefault("upstream_model", entry["name"])
        if "provider" not in fields:
            raise ValueError(f"model {entry.get('name')!r}: each deployment needs a provider")
        weight = fields.get("weight", 1.0)
        if not _number(weight) or weight <= 0:
            raise ValueError(f"model {entry.get('name')!r}: a deployment's weight must be a positive number")
        deployments.append(Deployment(**fields))
    if not math.isfinite(sum(d.weight for d in deployments)):  # random.choices needs a finite total
        raise ValueError(f"model {entry.get('name')!r}: the deployments' weights add up to more than a float holds")
    return tuple(deployments)


def _number(value: Any) -> bool:
    """A finite int or float (JSON and YAML both spell infinity and NaN; booleans are ints in Python)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def _models(value: Any) -> tuple[CatalogModel, ...]:
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, list):
        raise ValueError("expected a list of models")
    models = []
    for entry in value:
        if not isinstance(entry, Mapping) or "name" not in entry or not ("provider" in entry or "deployments" in entry):
            raise ValueError(f"each model needs at least name and provider (or deployments), got {entry!r}")
        deployments = _deployments(entry)
        fields = {k: v for k, v in entry.items() if k not in ("deployments", "weight")}
        first = deployments[0]
        for name in ("provider", "upstream_model", "base_url", "api_key_env", "api_version"):
            fields.setdefault(name, getattr(first, name))
        for price in ("input_usd_per_mtok", "output_usd_per_mtok", "cached_input_usd_per_mtok"):
            value = fields.get(price, 0.0)
            if price == "cached_input_usd_per_mtok" and value is None:
                continue
            if not _number(value) or value < 0:
                # Prices multiply token counts into the ledger's integers: they must be finite.
                raise ValueError(f"model {entry.get('name')!r}: {price} must be a finite number >= 0, got {value!r}")
        if not isinstance(fields.get("free", False), bool):
            raise ValueError(f"model {entry.get('name')!r}: free must be true or false")
        fail_open = fields.get("fail_open", [])
        if not isinstance(fail_open, list) or not all(isinstance(v, str) and v in FAIL_OPEN for v in fail_open):
            raise ValueError(f"model {entry.get('name')!r}: fail_open must be a list of {sorted(FAIL_OPEN)}, "
                             f"got {fail_open!r}")
        fields["fail_open"] = tuple(fail_open)
        try:
            models.append(CatalogModel(**fields, deployments=deployments))
        except TypeError as exc:
            raise ValueError(f"model {entry.get('name')!r}: {exc}") from None
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError("model names must be unique")
    return tuple(models)


def _optional_str(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _opa_url(value: Any) -> str | None:
    """``http(s)://host:port`` of an OPA server: opa-python-client roots its API at ``/v1`` of it."""
    if value in (None, ""):
        return None
    text = str(value).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected http://HOST:PORT or https://HOST:PORT, got {value!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"an OPA URL takes no path, query or credentials (OPA's API is at /v1), got {value!r}")
    _ = parts.port  # raises ValueError on a port out of range
    return text.rstrip("/")


FAIL_OPEN = frozenset({"audit", "policy"})  # what a route may be configured to serve through (fail_open)


DEFAULT_MODELS: list[dict[str, Any]] = [
    {"name": "mock-fast", "provider": "mock", "upstream_model": "mock-fast",
     "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.60},
    {"name": "mock-smart", "provider": "mock", "upstream_model": "mock-smart",
     "input_usd_per_mtok": 2.50, "output_usd_per_mtok": 10.00},
]

# LOCKGATE_* variables that are no setting
SECRET_ENV_NAMES = ("CONFIG", "API_KEY", "WEBHOOK_SECRET", "AUDIT_KEY", "OPA_TOKEN")

SETTINGS: tuple[Setting, ...] = (
    Setting("host", "127.0.0.1", "Address the gateway listens on.", str),
    Setting("port", 8080, "Port the gateway listens on.", _positive(int)),
    Setting("database_url", "sqlite:///lockgate.db",
            "Store URL: sqlite:///PATH (default, in the working directory) or postgresql://USER@HOST/DB.", str),
    Setting("policy_dir", None,
            "Folder of .rego and .json policy files; default: the policies shipped with Lockgate.",
            _optional_str),
    Setting("policy_shadow_dir", None,
            "A candidate policy folder evaluated beside the live one on every call: its decision is recorded "
            "(the record's shadow) and never applied; `lockgate policy shadow-report` lists disagreements.",
            _optional_str),
    Setting("policy_reload_interval_s", 2.0,
            "Seconds between looks for a changed policy folder (and shadow folder); a change is vetted, compiled "
            "and swapped in without dropping a call, a failing one rejected. 0 turns hot reload off.",
            _positive(float)),
    Setting("policy_engine", "embedded",
            "The Rego engine that decides: `embedded` (regorus, in process) or `opa` (an OPA server at "
            "`opa_url`, through opa-python-client). Both evaluate the same policy files; see docs/policies.md.",
            _choice("embedded", "opa")),
    Setting("opa_url", None, "The OPA server of `policy_engine: opa`, as http(s)://HOST:PORT.", _opa_url),
    Setting("opa_mode", "push",
            "`push`: at start-up (and on each hot reload) the gateway uploads the policy folder's modules and "
            "data, the catalog included, to OPA; `bundle`: OPA already serves the team's bundle and the "
            "gateway only queries it (decisions are then not reused).", _choice("push", "bundle")),
    Setting("opa_timeout_s", 1.0,
            "Seconds one OPA query may take, connection included; a slower answer denies the call (503 "
            "`policy_error`).", _above_zero(float)),
    Setting("opa_token_env", "LOCKGATE_OPA_TOKEN",
            "Environment variable holding the bearer token sent to OPA (none when it is unset or empty); "
            "the token is never logged or recorded.", str),
    Setting("models", DEFAULT_MODELS,
            "Model catalog: list of {name, provider, upstream_model, base_url, api_key_env, api_version, "
            "input_usd_per_mtok, output_usd_per_mtok, timeout_s, deployments}; each of `deployments` "
            "({provider, upstream_model, base_url, api_key_env, api_version, weight, timeout_s}) takes what it "
            "leaves out from the model; JSON when set from the environment. See docs/providers.md.",
            _models),
    Setting("upstream_connect_timeout_s", 5.0, "Seconds to wait for a connection to a provider.",
            _above_zero(float)),
    Setting("upstream_first_byte_timeout_s", 120.0,
            "Seconds an attempt waits for a provider's first byte: the whole answer of a plain call, the headers "
            "and first event of a stream. A model's or deployment's `timeout_s` replaces it.", _above_zero(float)),
    Setting("upstream_idle_timeout_s", 120.0,
            "Longest silence between two events of a provider's stream; a stream silent for longer ends with "
            "an error event.", _above_zero(float)),
    Setting("upstream_deadline_s", 600.0,
            "Seconds one call may spend at providers in all, from its first attempt: every attempt and retry "
            "wait, and the whole of a stream, which ends with an error event when the deadline passes.",
            _above_zero(float)),
    Setting("upstream_retries", 1,
            "Extra attempts on the same deployment after a failure the provider cannot have billed (a "
            "connection that failed before the request was sent, 429, 408, 409, 502, 503, 529), waiting as "
            "its Retry-After asks when that fits the deadline. A timeout, a 500 or a cut-off reply is never "
            "retried.", _positive(int)),
    Setting("upstream_cooldown_failures", 3,
            "Consecutive provider failures after which a deployment is skipped for `upstream_cooldown_s` "
            "(when every deployment of a call is cooling down, the one that failed least recently is still "
            "tried). 0 never skips a deployment.", _positive(int)),
    Setting("upstream_cooldown_s", 30.0, "Seconds a failing deployment is skipped.", _positive(float)),
    Setting("upstream_max_connections", 256, "Pooled connections to providers, in all.", _positive(int)),
    Setting("auth_cache_ttl_s", 5.0,
            "Seconds a verified key stays cached in memory; a revoked key is refused within this time.",
            _positive(float)),
    Setting("policy_cache_size", 4096,
            "Decisions kept for reuse, keyed by the parts of the input the policy reads; a policy that reads "
            "the clock or random numbers is evaluated on every call. 0 evaluates every call.", _positive(int)),
    Setting("spend_cache_ttl_s", 1.0, "Seconds the spend shown to the policy may be stale.",
            _positive(float)),
    Setting("audit_flush_interval_s", 0.2,
            "Seconds between writes of buffered decision records, spans and budget settlements to the store; "
            "a call's reservation is held until its settlement is written.", _positive(float)),
    Setting("otlp_endpoint", None,
            "OTLP/HTTP collector (Jaeger, Tempo, Phoenix, Langfuse...) that also receives every span, e.g. "
            "`http://127.0.0.1:4318`; batched in the background, never slowing a call.", _optional_str),
    Setting("audit_key_env", "LOCKGATE_AUDIT_KEY",
            "Environment variable holding the key that signs the audit chain's checkpoints (HMAC-SHA256); "
            "keep it outside the database. Without it, checkpoints are written unsigned.", str),
    Setting("audit_journal_dir", None,
            "Folder of the audit journal, which makes each call's record survive the process before its "
            "answer ends (default: beside a SQLite store, `<file>.journal`; with PostgreSQL, "
            "`lockgate.journal` in the working directory). Processes sharing it replay each other's "
            "journal once its owner is gone.", _optional_str),
    Setting("audit_batch_size", 512, "Buffered decision records that trigger an immediate write.", _positive(int)),
    Setting("approval_hold_s", 300.0,
            "Seconds a call that needs approval is held open for the decision; then the client is told to "
            "retry (`x-should-retry: true`), and its retry waits on the same approval. A held stream, kept "
            "alive by comments, waits until the approval is decided or expires.", _positive(float)),
    Setting("approval_keepalive_s", 15.0,
            "Seconds between the SSE comment lines a held streamed call receives while it waits.", _positive(float)),
    Setting("approval_poll_interval_s", 1.0,
            "Seconds between looks in the store for decisions made by another process (PostgreSQL "
            "also wakes held calls at once by LISTEN/NOTIFY).", _positive(float)),
    Setting("approval_use_s", 3600.0, "Seconds an approved call may still be started after the decision.",
            _positive(float)),
    Setting("approval_max_pending", 20, "Most pending approvals one user may have at once; past it, a 429.",
            _positive(int)),
    Setting("approval_webhook_url", None,
            "URL that receives a JSON POST (Slack-compatible `text`) when a call starts waiting for approval.",
            _optional_str),
    Setting("approval_webhook_secret_env", "LOCKGATE_WEBHOOK_SECRET",
            "Environment variable holding the key of the webhook's HMAC-SHA256 signature "
            "(`Lockgate-Signature` header).", str),
    Setting("reservation_lease_s", 900.0,
            "Seconds a budget reservation is held at most: a reservation whose call never settled (its "
            "process died, its settlement was lost) is released by any gateway after this. Keep it above "
            "`upstream_deadline_s`.", _positive(float)),
    Setting("max_request_bytes", 4 * 1024 * 1024, "Largest request body accepted.", _positive(int)),
    Setting("max_request_depth", 32, "Deepest nesting of JSON objects and arrays accepted in a request body "
            f"(at most {MAX_REQUEST_DEPTH}).", _depth),
    Setting("max_choices", 8, "Largest `n` (choices per call) accepted.", _positive(int)),
    Setting("max_output_tokens", 262_144, "Largest `max_tokens` (or `max_completion_tokens`, "
            "`max_output_tokens`) accepted.", _positive(int)),
    Setting("default_output_tokens", 4096, "Output tokens reserved for a call that names no maximum.",
            _positive(int)),
    Setting("mock_stream_delay_s", 0.0, "Pause between streamed chunks of the mock provider.",
            _positive(float)),
    Setting("log_level", "info", "Log level.", _choice("debug", "info", "warning", "error")),
    Setting("access_log", False, "Log one line per HTTP request.", _bool),
)

_BY_NAME = {setting.name: setting for setting in SETTINGS}


class Settings:
    """Parsed, validated values; read them as attributes (``settings.port``)."""

    def __init__(self, values: Mapping[str, Any], environ: Mapping[str, str]) -> None:
        self._values = dict(values)
        self._environ = environ

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def secret(self, env_name: str) -> str:
        """A provider key, read from the environment variable a model names."""
        return self._environ.get(env_name, "") if env_name else ""

    def replace(self, **changes: Any) -> Settings:
        values = dict(self._values)
        for name, value in changes.items():
            values[name] = _parse(_BY_NAME[name], value, "override")
        return Settings(values, self._environ)


def _parse(setting: Setting, raw: Any, source: str) -> Any:
    try:
        return setting.parse(raw)
    except (ValueError, TypeError) as exc:
        raise SettingsError(f"setting {setting.name} from {source}: {exc}") from None


def load_settings(config_path: str | Path | None = None, environ: Mapping[str, str] | None = None,
                  **overrides: Any) -> Settings:
    environ = os.environ if environ is None else environ
    path = config_path or environ.get(ENV_PREFIX + "CONFIG")
    file_values: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise SettingsError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise SettingsError(f"config file {path} must hold a mapping of settings")
        unknown = sorted(set(loaded) - set(_BY_NAME))
        if unknown:
            raise SettingsError(f"config file {path}: unknown settings {', '.join(unknown)}")
        file_values = loaded

    # Secrets are read from the environment, never from settings: the CLI's key, the webhook's key.
    known_env = {ENV_PREFIX + name.upper() for name in _BY_NAME} | {ENV_PREFIX + n for n in SECRET_ENV_NAMES}
    unknown_env = sorted(key for key in environ if key.startswith(ENV_PREFIX) and key not in known_env)
    if unknown_env:
        raise SettingsError(f"unknown environment settings {', '.join(unknown_env)}")

    values: dict[str, Any] = {}
    for setting in SETTINGS:
        env_key = ENV_PREFIX + setting.name.upper()
        if setting.name in overrides and overrides[setting.name] is not None:
            values[setting.name] = _parse(setting, overrides[setting.name], "command line")
        elif env_key in environ:
            values[setting.name] = _parse(setting, environ[env_key], env_key)
        elif setting.name in file_values:
            values[setting.name] = _parse(setting, file_values[setting.name], str(path))
        else:
            values[setting.name] = _parse(setting, setting.default, "default")
    if values["policy_engine"] == "opa" and not values["opa_url"]:
        raise SettingsError("setting policy_engine is opa, so opa_url must name the OPA server")
    return Settings(values, environ)


def describe_settings() -> str:
    """The settings table for ``lockgate settings`` and docs/settings.md."""
    lines = ["| setting | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for s in SETTINGS:
        default = "(the shipped mock models)" if s.name == "models" else f"`{s.default}`"
        lines.append(f"| `{s.name}` | `{ENV_PREFIX}{s.name.upper()}` | {default} | {s.help} |")
    return "\n".join(lines)

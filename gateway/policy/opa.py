"""The OPA engine: an OPA server, reached through opa-python-client, behind the PolicyEngine interface.

Chosen with ``policy_engine: opa`` (docs/policies.md, "Engines"). Two ways to get the policy there:

- ``push``: at start-up (and on each hot reload) the gateway uploads the policy folder's modules
  (``PUT /v1/policies/lockgate/<file>``) and its data, the catalog included (``PUT /v1/data/<key>``
  for each top-level key), and removes the modules it pushed before that are gone from the folder.
  The revision is the folder's content hash, as with the embedded engine; the input paths the
  policy reads (for the decision cache) come from the same regorus parse the embedded engine uses.
- ``bundle``: OPA already serves the team's bundle; the gateway only queries. The revision is
  what OPA reports for its bundles (``data.system.bundles[<name>].manifest.revision``), read at
  start-up and every ``policy_reload_interval_s``; answers are never reused (the bundle may change
  under the gateway at any time).

Every evaluation is a ``POST /v1/data/<path>`` awaited within ``opa_timeout_s`` over one pooled
aiohttp session. A timeout, a connection failure, an HTTP error or an answer that is not JSON is a
PolicyEngineError, so the call is denied (503 ``policy_error``) like any engine error. The bearer
token (``opa_token_env``) goes only into the session's Authorization header: no message here
quotes a header, a URL with credentials, or the token.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from opa_client import AsyncOpaClient
from opa_client.errors import PolicyNotFoundError

from gateway.policy.cache import Path
from gateway.policy.embedded import PolicyEngineError, analyse
from gateway.policy.source import PolicySource

log = logging.getLogger("lockgate.policy")

_DATA_PATH = re.compile(r"data(\.[A-Za-z_][A-Za-z0-9_]*)+")
POLICY_ID_PREFIX = "lockgate/"  # the modules the gateway pushes: PUT /v1/policies/lockgate/<file>
DECISION = "data.lockgate.decision"


@dataclass(frozen=True)
class OpaConfig:
    url: str  # http(s)://host:port (gateway/settings.py checks it)
    mode: str  # push | bundle
    timeout_s: float
    token: str = ""  # never logged: __repr__ leaves it out

    def __repr__(self) -> str:
        return f"OpaConfig(url={self.url!r}, mode={self.mode!r}, timeout_s={self.timeout_s!r})"


def _client(config: OpaConfig) -> AsyncOpaClient:
    parts = urlsplit(config.url)
    secure = parts.scheme == "https"
    return AsyncOpaClient(host=parts.hostname or "", port=parts.port or (443 if secure else 80), ssl=secure,
                          token=config.token or None, retries=0, timeout=config.timeout_s)


def _reason(exc: BaseException) -> str:
    """What went wrong, in words that quote no header (and so no token)."""
    status = getattr(exc, "status", None)  # aiohttp's ClientResponseError
    if isinstance(status, int):
        return f"OPA answered HTTP {status}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class OpaEngine:
    remote = True  # evaluated only through evaluate_async (PolicyStage.decide_async)

    def __init__(self, config: OpaConfig, source: PolicySource | None = None) -> None:
        """``source``: the folder to push (push mode); None in bundle mode."""
        if (config.mode == "push") != (source is not None):
            raise ValueError("push mode pushes a policy source; bundle mode takes none")
        self.config = config
        self._source = source
        self._client = _client(config)
        self._open = False
        self._rules: frozenset[str] = frozenset()
        self._reads: tuple[Path, ...] | None = None
        self.revision = source.revision if source is not None else "bundle:unknown"
        if source is not None:
            self._rules, self._reads = analyse(source.modules)

    async def start(self) -> None:
        """Open the pooled session, push the policy (push mode) or read what OPA serves (bundle
        mode). Raises PolicyEngineError with the reason when OPA cannot serve the policy."""
        if DECISION not in self._rules and self._source is not None:  # before anything is pushed
            raise PolicyEngineError(f"the policy defines no {DECISION}")
        if not self._open:
            await self._client.__aenter__()  # the session and its connection pool
            self._open = True
        try:
            async with asyncio.timeout(max(30.0, self.config.timeout_s)):
                if self._source is not None:
                    await self._push(self._source)
                else:
                    await self.refresh()
        except TimeoutError:
            raise PolicyEngineError(f"OPA at {self.config.url} did not take the policy in time") from None
        except PolicyEngineError:
            raise
        except Exception as exc:
            raise PolicyEngineError(f"OPA at {self.config.url}: {_reason(exc)}") from None
        if DECISION not in self._rules:
            raise PolicyEngineError(f"the policy defines no {DECISION}")

    async def _push(self, source: PolicySource) -> None:
        client = self._client
        wanted = {POLICY_ID_PREFIX + name: text for name, text in source.modules.items()}
        listed = await client.get_policies_list()  # first: a refused token stops here, plainly
        for key, value in source.data.items():
            if not isinstance(value, dict):
                raise PolicyEngineError(f"push mode uploads data by top-level key; data.{key} must be an object")
            await client.update_or_create_data(value, key)
        # OPA compiles every module with the ones it already has, after each change: a module calling
        # a function of another one not pushed yet is refused, and so is deleting a module others
        # still call. So the changes go in rounds (stale modules deleted, then the folder's put), each
        # retrying what was refused, until all are done or a round makes no progress.
        stale = [i for i in listed if i.startswith(POLICY_ID_PREFIX) and i not in wanted]
        pending: list[tuple[str, str | None]] = [(i, None) for i in stale] + list(wanted.items())
        error: Exception | None = None
        while pending:
            refused = []
            for policy_id, text in pending:
                try:
                    if text is None:
                        await client.delete_policy(policy_id)
                    else:
                        await client.update_policy_from_string(text, policy_id, rego_compat=False)
                except Exception as exc:  # OPA's compile errors
                    refused.append((policy_id, text))
                    error = exc
            if len(refused) == len(pending):
                raise PolicyEngineError(f"OPA refused the policy: {error}")
            pending = refused
        log.info("pushed %d policy modules and %d data documents to OPA at %s (revision %s)",
                 len(wanted), len(source.data), self.config.url, source.revision)

    async def refresh(self) -> str:
        """Bundle mode: read the bundles' revision OPA reports and, when it changed, the rules its
        modules define; the revision. Push mode: the pushed folder's revision."""
        if self._source is not None:
            return self.revision
        revision = await self._bundle_revision()
        if revision != self.revision or not self._rules:
            modules = {}
            for policy_id in await self._client.get_policies_list():
                policy = await self._client.get_policy(policy_id)
                modules[policy_id] = str((policy.get("result") or {}).get("raw") or "")
            self._rules, _ = analyse(modules)
            self.revision = revision
        return revision

    async def _bundle_revision(self) -> str:
        try:
            bundles = (await self._client.get_data("system/bundles")).get("result")
        except PolicyNotFoundError as exc:  # no bundle activated (yet)
            log.warning("OPA reports no bundle revision (%s); recording bundle:unknown", _reason(exc))
            return "bundle:unknown"
        except Exception as exc:  # OPA away for a moment: the revision it served last still stands
            log.warning("reading the bundle revision from OPA failed (%s); keeping %s", _reason(exc), self.revision)
            return self.revision
        if not isinstance(bundles, dict) or not bundles:
            return "bundle:unknown"
        named = []
        for name, bundle in sorted(bundles.items()):
            manifest = bundle.get("manifest") if isinstance(bundle, dict) else None
            revision = manifest.get("revision") if isinstance(manifest, dict) else None
            named.append(f"{name}@{revision if isinstance(revision, str) and revision else 'unknown'}")
        return "bundle:" + ",".join(named)

    @property
    def rule_paths(self) -> frozenset[str]:
        return self._rules

    @property
    def input_reads(self) -> tuple[Path, ...] | None:
        """Push mode: what the pushed modules read. Bundle mode: None (never reused)."""
        return self._reads if self._source is not None else None

    def defines(self, entrypoint: str) -> bool:
        return entrypoint in self._rules

    def evaluate(self, entrypoint: str, policy_input: Mapping[str, Any]) -> Any:
        raise PolicyEngineError("the OPA engine answers only asynchronously (PolicyStage.decide_async)")

    async def evaluate_async(self, entrypoint: str, policy_input: Mapping[str, Any]) -> Any:
        """A rule's value, or a data document's: None when undefined."""
        if not _DATA_PATH.fullmatch(entrypoint):
            raise PolicyEngineError(f"{entrypoint!r} is not a path into data")
        if not self._open:
            raise PolicyEngineError("the OPA engine was not started")
        try:
            async with asyncio.timeout(self.config.timeout_s):
                answer = await self._client.query_rule(dict(policy_input), entrypoint[len("data."):])
        except TimeoutError:
            raise PolicyEngineError(f"OPA did not answer within {self.config.timeout_s}s") from None
        except Exception as exc:
            raise PolicyEngineError(f"OPA could not be asked: {_reason(exc)}") from None
        if not isinstance(answer, dict):
            raise PolicyEngineError("OPA's answer is not a JSON object")
        return answer.get("result")

    async def ready(self) -> bool:
        """OPA answers its health check (in bundle mode: with its bundles activated)."""
        if not self._open:
            return False
        try:
            async with asyncio.timeout(self.config.timeout_s):
                return bool(await self._client.check_health({"bundles": True} if self._source is None else None))
        except TimeoutError:
            return False

    def close(self) -> None:
        """Nothing to drop synchronously: the session is closed by ``aclose``."""

    async def lost_push(self) -> bool:
        """Push mode: OPA no longer holds every module pushed (an OPA restart forgets them);
        False when it does, in bundle mode, or when OPA cannot be asked."""
        if self._source is None or not self._open:
            return False
        try:
            async with asyncio.timeout(self.config.timeout_s):
                listed = set(await self._client.get_policies_list())
        except Exception:  # OPA away: calls already fail closed; the next look asks again
            return False
        return any(POLICY_ID_PREFIX + name not in listed for name in self._source.modules)

    async def retire(self) -> None:
        """Close once every query still in flight has had its timeout (a hot reload swapped it out)."""
        await asyncio.sleep(self.config.timeout_s)
        await self.aclose()

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            await self._client.close_connection()

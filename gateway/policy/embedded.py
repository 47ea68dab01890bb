"""The embedded Rego engine: regorus, in process, behind the PolicyEngine interface.

regorus has sharp edges this wrapper keeps away from the rest of the gateway:
- an Engine may only be used from the thread that created it; from any other it panics with an
  exception that escapes ``except Exception``. We check the thread ourselves and refuse.
- its error messages carry a Rust backtrace when RUST_BACKTRACE is set; we keep the first line.
- a recursive rule crashes the whole process; ``gateway.policy.preflight`` evaluates the policy
  in a child process before the gateway starts, so such a policy stops start-up instead.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from typing import Any

import regorus

from gateway.policy.cache import Path, input_reads
from gateway.policy.source import PolicySource


class PolicyEngineError(RuntimeError):
    """The engine could not evaluate: the caller must fail closed."""


_DATA_PATH = re.compile(r"data(\.[A-Za-z_][A-Za-z0-9_]*)+")  # data.lockgate.aliases


def _first_line(exc: BaseException) -> str:
    """The engine's message without its source excerpt or Rust backtrace: 'error: ... (at file:line)'."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    message = next((line for line in lines if line.startswith("error:")), lines[0])
    where = next((line[4:] for line in lines if line.startswith("--> ")), None)
    return f"{message} (at {where})" if where and where not in message else message


def analyse(modules: Mapping[str, str]) -> tuple[frozenset[str], tuple[Path, ...] | None]:
    """The rules the modules define (``data.<package>.<rule>``) and the input paths they read (None:
    their answers must not be reused), from regorus's parse: compiled here, never evaluated, so a
    recursive rule cannot crash the process. The OPA engine uses it for the same facts
    (gateway/policy/opa.py). Raises PolicyEngineError when regorus cannot parse them."""
    engine = regorus.Engine()
    try:
        for name, text in modules.items():
            engine.add_policy(name, text)
        ast = json.loads(engine.get_ast_as_json())
    except Exception as exc:
        raise PolicyEngineError(f"policy does not compile: {_first_line(exc)}") from None
    return frozenset(_rule_paths(ast)), input_reads(ast)


class EmbeddedEngine:
    remote = False  # evaluated in process, synchronously (PolicyStage.decide)

    def __init__(self, source: PolicySource) -> None:
        self._thread = threading.get_ident()
        self._engine = regorus.Engine()
        try:
            for name, text in source.modules.items():
                self._engine.add_policy(name, text)
            self._engine.add_data_json(json.dumps(source.data))
            ast = json.loads(self._engine.get_ast_as_json())
        except Exception as exc:
            raise PolicyEngineError(f"policy does not compile: {_first_line(exc)}") from None
        self._rules = _rule_paths(ast)
        self._reads = input_reads(ast)

    def close(self) -> None:
        """Drop the engine on its own thread (regorus refuses to be freed from another)."""
        if threading.get_ident() == self._thread:
            self._engine = None  # type: ignore[assignment]

    @property
    def rule_paths(self) -> frozenset[str]:
        return frozenset(self._rules)

    @property
    def input_reads(self) -> tuple[Path, ...] | None:
        """The input paths the policy can read, or None if its answers must not be reused."""
        return self._reads

    def defines(self, entrypoint: str) -> bool:
        return entrypoint in self._rules

    def evaluate(self, entrypoint: str, policy_input: Mapping[str, Any]) -> Any:
        """A rule's value, or a data document's (``data.lockgate.aliases``): None when undefined."""
        if threading.get_ident() != self._thread:
            raise PolicyEngineError("the embedded engine was called from a thread other than its own")
        try:
            self._engine.set_input(dict(policy_input))
            if entrypoint in self._rules:
                return self._engine.eval_rule(entrypoint)
            if not _DATA_PATH.fullmatch(entrypoint):
                # The query below would run any Rego expression: only ever a reference into data.
                raise PolicyEngineError(f"{entrypoint!r} is not a path into data")
            # regorus evaluates only rules by path; a document of data.json takes a query.
            results = self._engine.eval_query(entrypoint).get("result") or [{}]
            return (results[0].get("expressions") or [{}])[0].get("value")
        except BaseException as exc:  # regorus panics derive from BaseException
            if isinstance(exc, (KeyboardInterrupt, SystemExit, PolicyEngineError)):
                raise
            raise PolicyEngineError(f"policy evaluation failed: {_first_line(exc)}") from None


def _rule_paths(ast: list[dict[str, Any]]) -> set[str]:
    """``data.<package>.<rule>`` for every rule head in the parsed modules."""
    paths = set()
    for module in ast:
        package = ".".join(_ref_names(module["ast"]["package"]["refr"]))
        for rule in module["ast"].get("rules", []):
            head = rule.get("Spec", {}).get("head", {})
            for variant in head.values():
                names = _ref_names(variant.get("refr", {}))
                if names:
                    paths.add(f"data.{package}.{names[0]}")
    return paths


def _ref_names(ref: dict[str, Any]) -> list[str]:
    if "Var" in ref:
        return [ref["Var"]["value"]]
    if "RefDot" in ref:
        inner = ref["RefDot"]
        return [*_ref_names(inner["refr"]), inner["field"][1]]
    if "RefBrack" in ref:
        return _ref_names(ref["RefBrack"]["refr"])
    return []

"""Reading a policy folder: its Rego modules and its data.

A policy folder holds ``*.rego`` modules, ``*_test.rego`` unit tests (loaded only by
``lockgate policy test``) and ``*.json`` data files, merged into ``data``. The gateway adds the
model catalog as ``data.lockgate.catalog`` so rules can see providers and prices.

Nothing here parses Rego: what a policy may not do is decided on its syntax tree by the guard
(gateway/policy/guard.py), in the child process of gateway/policy/preflight.py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from gateway.types import CatalogModel


class PolicyLoadError(ValueError):
    pass


@dataclass
class PolicySource:
    modules: dict[str, str]
    data: dict[str, Any]
    tests: dict[str, str] = field(default_factory=dict)

    @property
    def revision(self) -> str:
        """A content hash of the rules and the data (the catalog included): the same policy
        gives the same revision on every process, and any change gives another one."""
        digest = hashlib.sha256()
        for name in sorted(self.modules):
            digest.update(name.encode() + b"\0" + self.modules[name].encode() + b"\0")
        digest.update(json.dumps(self.data, sort_keys=True, separators=(",", ":")).encode())
        return "sha256:" + digest.hexdigest()[:16]


def default_policy_dir() -> Path:
    """The policies shipped with Lockgate: in the wheel, or beside the source tree."""
    packaged = Path(str(resources.files("gateway"))) / "default_policies"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "policies"


def _merge(into: dict[str, Any], extra: dict[str, Any], where: str) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, f"{where}.{key}")
        elif key in into:
            raise PolicyLoadError(f"data key {where}.{key} is defined twice")
        else:
            into[key] = value


def catalog_data(models: tuple[CatalogModel, ...]) -> dict[str, Any]:
    return {
        m.name: {
            "provider": m.provider,
            "upstream_model": m.upstream_model,
            "input_usd_per_mtok": m.input_usd_per_mtok,
            "output_usd_per_mtok": m.output_usd_per_mtok,
            # exact: micro-dollars per million tokens, for rules that compute with prices
            "input_micro_usd_per_mtok": round(m.input_usd_per_mtok * 1_000_000),
            "output_micro_usd_per_mtok": round(m.output_usd_per_mtok * 1_000_000),
        }
        for m in models
    }


def load_policy_source(folder: Path, models: tuple[CatalogModel, ...]) -> PolicySource:
    if not folder.is_dir():
        raise PolicyLoadError(f"policy folder {folder} does not exist")
    modules: dict[str, str] = {}
    tests: dict[str, str] = {}
    data: dict[str, Any] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".rego":
            text = path.read_text()
            # Named by their place in the folder, as the guard's findings name them (file:line:column).
            (tests if path.name.endswith("_test.rego") else modules)[path.relative_to(folder).as_posix()] = text
        elif path.suffix == ".json":
            try:
                loaded = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise PolicyLoadError(f"{path.name} is not valid JSON: {exc}") from None
            if not isinstance(loaded, dict):
                raise PolicyLoadError(f"{path.name} must hold a JSON object")
            _merge(data, loaded, "data")
    if not modules:
        raise PolicyLoadError(f"policy folder {folder} holds no .rego modules")
    _merge(data, {"lockgate": {"catalog": catalog_data(models)}}, "data")
    return PolicySource(modules=modules, data=data, tests=tests)

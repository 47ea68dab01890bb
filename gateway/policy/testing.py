"""``lockgate policy test``: run the ``test_`` rules of a policy folder's ``*_test.rego`` files.

Each test rule passes when it evaluates to true, as with ``opa test``. The tests run on the
embedded engine, the one that serves the gateway by default.
"""

from __future__ import annotations

from pathlib import Path

from gateway.policy.embedded import EmbeddedEngine, PolicyEngineError
from gateway.policy.source import PolicyLoadError, PolicySource, default_policy_dir, load_policy_source
from gateway.types import CatalogModel


def run_policy_tests(folder: Path | None, models: tuple[CatalogModel, ...]) -> list[tuple[str, bool, str]]:
    """(rule path, passed, detail) for every test rule."""
    folder = folder or default_policy_dir()
    try:
        source = load_policy_source(folder, models)
        engine = EmbeddedEngine(PolicySource(modules={**source.modules, **source.tests}, data=source.data))
    except (PolicyLoadError, PolicyEngineError) as exc:
        raise PolicyLoadError(f"policy in {folder} cannot be tested: {exc}") from None
    results = []
    for rule in sorted(r for r in engine.rule_paths if r.rsplit(".", 1)[-1].startswith("test_")):
        try:
            value = engine.evaluate(rule, {})
        except PolicyEngineError as exc:
            results.append((rule, False, str(exc)))
            continue
        results.append((rule, value is True, "" if value is True else f"evaluated to {value!r}"))
    return results

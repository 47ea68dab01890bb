"""Reuse of a policy's answer for an input it cannot tell apart from one it has already answered.

A Rego policy is a function of its input and its data, unless it calls a builtin whose answer
changes from call to call (the clock, random numbers, uuids) or has an effect (print). Data is
fixed for the life of an engine. So when the policy reads only some parts of the input (the
default one reads ``input.principal.team``, ``input.request.model`` and ``input.request.tools``),
two inputs that agree on those parts get the same answer, and the second can be served without
evaluating.

``input_reads`` finds those parts in the engine's parsed modules: every reference that starts
at ``input``, cut at its first index that is not a literal string (``input.request.tools[i]``
reads all of ``input.request.tools``). ``input`` used whole (``walk(input)``, ``x := input``)
reads everything, and then, as when a module calls a builtin of ``NOT_REPEATABLE``, nothing is
cached. The key of an answer is the values at those paths, so the cache can only miss where
evaluation would have answered differently; it never guesses.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import orjson

# Builtins whose answer can differ for the same arguments, or that have an effect a policy's
# author expects on every evaluation. A policy calling any of them is evaluated every time.
NOT_REPEATABLE = frozenset({
    "time.now_ns", "rand.intn", "uuid.rfc4122", "uuid.v4", "uuid.v7", "print", "trace",
    "http.send", "net.lookup_ip_addr", "opa.runtime",
})

Path = tuple[str, ...]
_MISSING: list[Any] = []  # a path the input lacks; distinct from a path whose value is null


def input_reads(ast: list[dict[str, Any]]) -> tuple[Path, ...] | None:
    """The input paths the modules can read, or None when their answers cannot be reused."""
    finder = _ReadFinder()
    for module in ast:
        finder.walk(module.get("ast", {}))
    if finder.not_repeatable or () in finder.paths:
        return None
    # A path under another one adds nothing to the key: input.request covers input.request.model.
    paths = sorted(finder.paths)
    return tuple(p for p in paths if not any(p[:len(q)] == q for q in paths if len(q) < len(p)))


class _ReadFinder:
    def __init__(self) -> None:
        self.paths: set[Path] = set()
        self.not_repeatable = False

    def walk(self, node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                self.walk(item)
            return
        if not isinstance(node, dict):
            return
        if "RefDot" in node or "RefBrack" in node:
            self._reference(node)
            return
        if "Call" in node:
            call = node["Call"]
            if ".".join(self._static_name(call.get("fcn"))) in NOT_REPEATABLE:
                self.not_repeatable = True
            self.walk(call.get("fcn"))
            self.walk(call.get("params"))
            return
        if var_name(node) == "input":
            self.paths.add(())  # input used whole
            return
        for value in node.values():
            self.walk(value)

    def _reference(self, node: dict[str, Any]) -> None:
        """input.a["b"][x].c reads input.a.b (and whatever x reads)."""
        steps: list[str | None] = []
        while True:
            if "RefDot" in node:
                ref = node["RefDot"]
                steps.append(ref["field"][1])
            elif "RefBrack" in node:
                ref = node["RefBrack"]
                index = ref.get("index", {})
                literal = index.get("String", {}).get("value") if isinstance(index, dict) else None
                steps.append(literal if isinstance(literal, str) else None)
                if literal is None:
                    self.walk(index)
            else:
                break
            node = ref["refr"]
        if var_name(node) != "input":
            self.walk(node)  # a reference into data, a local or a call's result
            return
        path: list[str] = []
        for step in reversed(steps):
            if step is None:
                break
            path.append(step)
        self.paths.add(tuple(path))

    @staticmethod
    def _static_name(node: Any) -> list[str]:
        """time.now_ns for the function of a call written as a dotted name, else []."""
        names: list[str] = []
        while isinstance(node, dict) and "RefDot" in node:
            names.append(node["RefDot"]["field"][1])
            node = node["RefDot"]["refr"]
        name = var_name(node)
        return [name, *reversed(names)] if name else []


def var_name(node: Any) -> str | None:
    """The name of a syntax-tree variable node, else None."""
    if isinstance(node, dict) and isinstance(node.get("Var"), dict):
        value = node["Var"].get("value")
        return value if isinstance(value, str) else None
    return None


def _at(document: Any, path: Path) -> Any:
    for step in path:
        if not isinstance(document, Mapping) or step not in document:
            return _MISSING
        document = document[step]
    return [document]


class DecisionCache:
    """The answers to the last ``size`` distinct inputs, as the policy can see them."""

    def __init__(self, reads: tuple[Path, ...], size: int) -> None:
        self.reads = reads
        self._size = size
        self._answers: OrderedDict[bytes, Any] = OrderedDict()

    def key(self, policy_input: Mapping[str, Any]) -> bytes | None:
        """What the policy can see of this input; None if it cannot be put in a key."""
        try:
            return orjson.dumps([_at(policy_input, path) for path in self.reads], option=orjson.OPT_SORT_KEYS)
        except TypeError:  # orjson.JSONEncodeError: a value JSON cannot hold
            return None

    def get(self, key: bytes) -> Any | None:
        answer = self._answers.get(key)
        if answer is not None:
            self._answers.move_to_end(key)
        return answer

    def put(self, key: bytes, answer: Any) -> None:
        self._answers[key] = answer
        if len(self._answers) > self._size:
            self._answers.popitem(last=False)

    def __len__(self) -> int:
        return len(self._answers)

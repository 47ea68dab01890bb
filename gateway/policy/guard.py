"""The load-time guard: what a policy may not do, read from its syntax tree, never its text.

regorus parses the modules (``Engine.get_ast_as_json``); the guard walks every expression of
every rule, so no string, comment, line break or spelling hides a construct from it. It refuses:

- the builtins that reach outside the engine: ``http.send``, ``net.*``, ``opa.runtime``, called,
  named in a ``with`` (``with time.now_ns as http.send``) or anywhere else;
- recursion: a cycle in the graph of rules (each rule, function, partial set or object rule,
  with its ``else`` branches, to the rules its heads and bodies reference, through
  ``data.<package>.<rule>``, an imported package, a rule of the same package, a function call or a
  comprehension). regorus overflows its stack on a recursive rule and the process dies
  (SIGSEGV), so a cycle reached only by some clients' inputs must never load;
- builtins a client can make allocate without bound, which regorus answers by aborting the
  process: ``numbers.range`` and ``numbers.range_step`` with a bound that is not a number literal,
  and ``sprintf`` with a format that is not a string literal (``%0999999999d``).

It warns, and refuses nothing, where a rule compares or computes with float dollars
(``input.estimate.cost_usd_max``, ``input.spend[_].month``, ``input.run.cost_usd``, a ``*_usd``
field of data): the input carries the same amounts as integer micro-dollars.

This module only reads the tree; parsing happens in the child process of
``gateway.policy.preflight``, so an input that crashes regorus's parser costs that child only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from gateway.policy.cache import var_name

FORBIDDEN = ("http.send", "opa.runtime", "net")  # a name, or a namespace of names (net.*)
UNBOUNDED = frozenset({"numbers.range", "numbers.range_step"})  # allocate a list as long as their bounds
COMPARISONS = frozenset({"Lt", "Le", "Gt", "Ge", "Eq", "Ne"})


@dataclass(frozen=True, order=True)
class Finding:
    """One thing the guard refuses (``error``) or points out (``warning``), where it is."""

    file: str
    line: int
    column: int
    severity: str  # "error" or "warning"
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}: " if self.file else ""
        return f"{where}{self.severity}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "column": self.column, "severity": self.severity,
                "message": self.message}


@dataclass
class _Rule:
    path: tuple[str, ...]  # ("data", "lockgate", "decision")
    file: str
    line: int
    column: int
    refs: list[tuple[tuple[str, ...], int, int]] = field(default_factory=list)  # path, line, column

    @property
    def name(self) -> str:
        return ".".join(self.path)


class _Module:
    def __init__(self, module: dict[str, Any]) -> None:
        self.file: str = module.get("source", {}).get("file", "?")
        self.text: bytes = module.get("source", {}).get("contents", "").encode()
        self.tree: dict[str, Any] = module["ast"]
        root, steps = _static(self.tree["package"]["refr"])
        self.package: tuple[str, ...] = ("data", root, *steps)
        self.imports: dict[str, tuple[str, ...]] = {}
        for imported in self.tree.get("imports", []):
            root, steps = _static(imported["refr"])
            if root != "data":
                continue
            path = (root, *steps)
            alias = self.slice(imported["as"]) if imported.get("as") else path[-1]
            self.imports[alias] = path

    def slice(self, span: dict[str, Any]) -> str:
        return self.text[span["start"]:span["end"]].decode(errors="replace")


def inspect_policy(ast: list[dict[str, Any]]) -> list[Finding]:
    """Every finding in the parsed modules, errors and warnings, in file and line order."""
    modules = [_Module(m) for m in ast]
    findings: list[Finding] = []
    rules: list[_Rule] = []
    for module in modules:
        heads = {names[0] for names, _ in map(rule_head, module.tree.get("rules", [])) if names}
        for tree in module.tree.get("rules", []):
            names, span = rule_head(tree)
            if not names:
                continue
            rule = _Rule(path=(*module.package, *names), file=module.file, line=span.get("line", 0),
                         column=span.get("col", 0))
            walker = _Walker(module, heads, rule, findings)
            walker.visit_rule(tree)
            rules.append(rule)
    findings.extend(_cycles(rules))
    return sorted(set(findings))


def rule_head(tree: dict[str, Any]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """A rule's static path in its package (``a.b`` for ``a.b[x] := 1``) and its span."""
    if "Default" in tree:
        root, steps = _static(tree["Default"]["refr"])
        return ((root, *steps) if root else ()), tree["Default"].get("span", {})
    spec = tree.get("Spec", {})
    for variant in spec.get("head", {}).values():
        root, steps = _static(variant.get("refr", {}))
        if root:
            return (root, *steps), spec.get("span", {})
    return (), {}


def _static(node: Any) -> tuple[str, tuple[str, ...]]:
    """The root variable of a reference and its leading literal steps: ``a.b["c"][x].d`` is
    ("a", ("b", "c")); ("", ()) when the reference does not start at a variable."""
    root, steps = _unwind(node)
    name = var_name(root)
    if name is None:
        return "", ()
    static: list[str] = []
    for step in steps:
        if step is None:
            break
        static.append(step)
    return name, tuple(static)


def _all_steps(node: Any) -> list[str | None]:
    """Every step of a reference, literal or not (None), root first."""
    return _unwind(node)[1]


def _unwind(node: Any) -> tuple[Any, list[str | None]]:
    """A reference's root node and its steps, root first: each a field name or literal string
    index, or None for any other index."""
    steps: list[str | None] = []
    while isinstance(node, dict):
        if "RefDot" in node:
            steps.append(node["RefDot"]["field"][1])
            node = node["RefDot"]["refr"]
        elif "RefBrack" in node:
            index = node["RefBrack"].get("index", {})
            literal = index.get("String", {}).get("value") if isinstance(index, dict) else None
            steps.append(literal if isinstance(literal, str) else None)
            node = node["RefBrack"]["refr"]
        else:
            break
    return node, list(reversed(steps))


def _root(node: Any) -> Any:
    while isinstance(node, dict) and ("RefDot" in node or "RefBrack" in node):
        node = _inner(node)["refr"]
    return node


def _inner(node: dict[str, Any]) -> dict[str, Any]:
    inner: dict[str, Any] = node["RefDot"] if "RefDot" in node else node["RefBrack"]
    return inner


def _where(node: Any) -> tuple[int, int]:
    root = _root(node)
    if isinstance(root, dict):
        inner: Any = next(iter(root.values()), {})
        if isinstance(inner, dict) and isinstance(inner.get("span"), dict):
            return inner["span"].get("line", 0), inner["span"].get("col", 0)
    return 0, 0


class _Walker:
    """Walks one rule: references to other rules, forbidden and unbounded builtins, float money."""

    def __init__(self, module: _Module, heads: set[str], rule: _Rule, findings: list[Finding]) -> None:
        self.module = module
        self.heads = heads
        self.rule = rule
        self.findings = findings
        self.locals: set[str] = set()
        self.money: set[str] = set()  # locals assigned float dollars

    def visit_rule(self, tree: dict[str, Any]) -> None:
        self._declare(tree)
        if "Default" in tree:
            self.visit(tree["Default"].get("value"))
            return
        for variant in tree["Spec"].get("head", {}).values():
            for key, value in variant.items():
                if key == "refr":
                    self._indices(value)  # the head's own name is no reference
                elif key != "span":
                    self.visit(value)
        self.visit(tree["Spec"].get("bodies"))

    def _declare(self, node: Any) -> None:
        """Collect the names the rule binds itself (arguments, :=, some), which hide rules."""
        if isinstance(node, list):
            for item in node:
                self._declare(item)
            return
        if not isinstance(node, dict):
            return
        if "Func" in node:
            for arg in node["Func"].get("args", []):
                self.locals.update(_vars(arg))
        if "AssignExpr" in node and node["AssignExpr"].get("op") == "ColEq":
            self.locals.update(_vars(node["AssignExpr"]["lhs"]))
        if "SomeVars" in node:
            self.locals.update(self.module.slice(span) for span in node["SomeVars"].get("vars", []))
        if "SomeIn" in node:
            self.locals.update(_vars(node["SomeIn"].get("key")) | _vars(node["SomeIn"].get("value")))
        if "Every" in node:
            for part in ("key", "value"):
                span = node["Every"].get(part)
                if isinstance(span, dict) and "start" in span:
                    self.locals.add(self.module.slice(span))
        for value in node.values():
            self._declare(value)

    def visit(self, node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                self.visit(item)
            return
        if not isinstance(node, dict):
            return
        if "RefDot" in node or "RefBrack" in node or "Var" in node:
            self._reference(node)
            self._indices(node)
            return
        if "Call" in node:
            self._call(node["Call"])
            return
        if "query" in node and isinstance(node["query"], dict) and "stmts" in node["query"]:
            self._query(node)
            return
        if "BoolExpr" in node and node["BoolExpr"].get("op") in COMPARISONS:
            self._money(node["BoolExpr"], "compares")
        elif "ArithExpr" in node:
            self._money(node["ArithExpr"], "computes with")
        for key, value in node.items():
            if key != "span":
                self.visit(value)

    def _query(self, node: dict[str, Any]) -> None:
        """A body: a local assigned float dollars (``c := input.estimate.cost_usd_max``) is money too."""
        for stmt in node["query"]["stmts"]:
            assign = stmt.get("literal", {}).get("Expr", {}).get("expr", {}).get("AssignExpr")
            if assign is not None and var_name(assign.get("lhs")) and self._dollars(assign.get("rhs")):
                self.money.add(var_name(assign["lhs"]))  # type: ignore[arg-type]
        for key, value in node.items():
            if key != "span":
                self.visit(value)

    def _indices(self, node: Any) -> None:
        while isinstance(node, dict) and ("RefDot" in node or "RefBrack" in node):
            if "RefBrack" in node:
                self.visit(node["RefBrack"].get("index"))
            node = _inner(node)["refr"]

    def _resolve(self, node: Any) -> tuple[str, ...] | None:
        """The path into data a reference reads, or None for input, locals and builtins."""
        root, steps = _static(node)
        if not root or root in self.locals or root == "input":
            return None
        if root == "data":
            return ("data", *steps)
        if root in self.module.imports:
            return (*self.module.imports[root], *steps)
        if root in self.heads:
            return (*self.module.package, root, *steps)
        return None

    def _shadowed(self, root: str, steps: tuple[str, ...], call: bool) -> bool:
        """A name the policy binds itself (a local, a rule, an import), so no builtin. Not so for a
        call of a dotted name: regorus calls the builtin ``opa.runtime()`` even where ``opa`` is a
        local or a rule, so such a call is checked whatever the policy named its variables."""
        if call and steps:
            return False
        return root in self.locals or root in self.heads or root in self.module.imports

    def _reference(self, node: Any, call: bool = False) -> None:
        root, steps = _static(node)
        line, column = _where(node)
        name = ".".join((root, *steps))
        if root and not self._shadowed(root, steps, call):
            for forbidden in FORBIDDEN:
                if name == forbidden or name.startswith(forbidden + "."):
                    shown = name if forbidden != "net" else f"{name} (net.*)"
                    self._find(line, column, "error", f"{shown} is not allowed in a Lockgate policy: a decision "
                               "must not depend on the network or the engine's runtime")
        path = self._resolve(node)
        if path is not None:
            self.rule.refs.append((path, line, column))

    def _call(self, call: dict[str, Any]) -> None:
        function = call.get("fcn")
        self._reference(function, call=True)
        self._indices(function)
        root, steps = _static(function)
        name = ".".join((root, *steps))
        params = call.get("params") or []
        line, column = _where(function)
        if not self._shadowed(root, steps, True):
            if name in UNBOUNDED and not all(_literal_number(p) for p in params):
                self._find(line, column, "error", f"{name} with a bound that is not a number literal: a client "
                           "could make the engine allocate without limit, which aborts the process")
            if name == "sprintf" and params and not _literal_string(params[0]):
                self._find(line, column, "error", "sprintf with a format that is not a string literal: a client's "
                           "format (%0999999999d) makes the engine allocate without limit, which aborts the process")
        self.visit(params)

    def _money(self, expr: dict[str, Any], verb: str) -> None:
        for side in ("lhs", "rhs"):
            operand = expr.get(side)
            suggestion = self._dollars(operand)
            if suggestion:
                line, column = _where(operand)
                self._find(line, column, "warning", f"{verb} float dollars ({suggestion[0]}); regorus does float "
                           f"arithmetic in binary: use integer micro-dollars ({suggestion[1]})")

    def _dollars(self, node: Any) -> tuple[str, str] | None:
        """(what, the integer micro-dollar field to use instead) when ``node`` is float dollars."""
        if isinstance(node, dict) and "ParenExpr" in node:
            return self._dollars(node["ParenExpr"].get("expr"))
        var = var_name(node)
        if var is not None:
            return (var, "the *_micro_usd field it was read from") if var in self.money else None
        if not isinstance(node, dict) or not ("RefDot" in node or "RefBrack" in node):
            return None
        root = var_name(_root(node))
        steps = _all_steps(node)
        shown = (root if root is not None else "[_]") + "".join(_step(s) for s in steps)
        if root == "input":
            if steps == ["estimate", "cost_usd_max"]:
                return shown, "input.estimate.cost_micro_usd_max"
            if steps == ["run", "cost_usd"]:
                return shown, "input.run.cost_micro_usd"
            if len(steps) == 3 and steps[0] == "spend" and steps[2] in ("day", "month", "total"):
                return shown, shown + "_micro_usd"
        last = steps[-1] if steps else None
        if isinstance(last, str) and "micro_usd" not in last and (last.endswith("_usd") or "_usd_" in last):
            micro = last.replace("_usd", "_micro_usd", 1)
            return shown, f"a field of integer micro-dollars such as {micro}"
        return None

    def _find(self, line: int, column: int, severity: str, message: str) -> None:
        self.findings.append(Finding(self.module.file, line, column, severity, message))


def _vars(node: Any) -> set[str]:
    """The variables a pattern binds: ``x``, ``[a, b]``, ``{"k": v}``."""
    found: set[str] = set()
    var = var_name(node)
    if var is not None:
        return {var}
    if isinstance(node, dict):
        for key in ("Array", "Object"):
            if key in node:
                for item in node[key].get("items", []) + [f[2] for f in node[key].get("fields", [])]:
                    found |= _vars(item)
    return found


def _literal_number(node: Any) -> bool:
    if isinstance(node, dict) and "UnaryExpr" in node:
        return _literal_number(node["UnaryExpr"].get("expr"))
    return isinstance(node, dict) and "Number" in node


def _literal_string(node: Any) -> bool:
    return isinstance(node, dict) and ("String" in node or "RawString" in node)


def _cycles(rules: list[_Rule]) -> Iterator[Finding]:
    """A finding per recursive group of rules (a strongly connected component with an edge)."""
    by_path: dict[tuple[str, ...], list[_Rule]] = {}
    for rule in rules:
        by_path.setdefault(rule.path, []).append(rule)
    paths = list(by_path)
    edges: dict[tuple[str, ...], dict[tuple[str, ...], tuple[str, int, int]]] = {p: {} for p in paths}
    for rule in rules:
        for ref, line, column in rule.refs:
            for target in paths:
                # data.lockgate reads every rule below it; data.lockgate.team.models reads team.
                if target[:len(ref)] == ref or ref[:len(target)] == target:
                    edges[rule.path].setdefault(target, (rule.file, line, column))
    for component in _components(paths, edges):
        if len(component) == 1 and component[0] not in edges[component[0]]:
            continue
        cycle = _cycle(component, edges)
        first = by_path[cycle[0]][0]
        steps = []
        for source, target in zip(cycle, [*cycle[1:], cycle[0]], strict=True):
            file, line, column = edges[source][target]
            steps.append(f"{'.'.join(source)} references {'.'.join(target)} at {file}:{line}:{column}")
        yield Finding(first.file, first.line, first.column, "error",
                      "recursive rules are not allowed (regorus crashes the process on them): " + "; ".join(steps))


def _components(nodes: list[tuple[str, ...]],
                edges: dict[tuple[str, ...], dict[tuple[str, ...], Any]]) -> list[list[tuple[str, ...]]]:
    """Tarjan's strongly connected components, iteratively (a policy's size must not hit Python's
    recursion limit)."""
    index: dict[tuple[str, ...], int] = {}
    low: dict[tuple[str, ...], int] = {}
    on_stack: set[tuple[str, ...]] = set()
    stack: list[tuple[str, ...]] = []
    found: list[list[tuple[str, ...]]] = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                found.append(sorted(component))
    return found


def _cycle(component: list[tuple[str, ...]],
           edges: dict[tuple[str, ...], dict[tuple[str, ...], Any]]) -> list[tuple[str, ...]]:
    """One cycle through the component's first rule: a breadth-first path back to it."""
    start, members = component[0], set(component)
    previous: dict[tuple[str, ...], tuple[str, ...]] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(edges[node]):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return list(reversed(path))
                if target in members and target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    return [start]


def _step(step: str | None) -> str:
    """One step of a reference as Rego writes it: ``.name``, ``["a key"]``, or ``[_]`` for any other index."""
    if step is None:
        return "[_]"
    return f".{step}" if step.isidentifier() else f"[{json.dumps(step)}]"

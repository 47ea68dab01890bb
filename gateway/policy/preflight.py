"""Parse, guard and evaluate a policy in a child process, where a crash of the engine costs the
child only.

regorus kills its whole process on some inputs (a recursive rule overflows its stack; an
allocation it cannot make aborts), may take minutes to parse a deeply nested literal, and reports
some compile errors only when a rule is first evaluated. So nothing the gateway or the
``lockgate policy`` commands have not vetted here is ever parsed in their own process:

- ``vet_policy``: parse the modules, run the load-time guard (gateway/policy/guard.py) on their
  syntax tree, and evaluate one sample decision. The gateway does this before it starts and before
  a hot reload swaps a policy in (``run_preflight``); ``lockgate policy check`` prints its findings.
- ``evaluate_in_child``: the answers of a guarded policy to many inputs (``lockgate policy test``,
  ``eval``, ``replay``). A child that dies on one input fails that input only: the next child
  goes on from the input after it.

The child is ``python -m gateway.policy.preflight``; it reads one JSON line (the job) and then
one JSON line per input, and writes one JSON line per finding, rule list and answer.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from gateway.policy.guard import Finding
from gateway.policy.source import PolicySource

SAMPLE_INPUT = {
    "principal": {"key_id": "k_preflight", "user": "preflight", "team": "preflight", "org": "preflight",
                  "roles": [], "labels": {}},
    "request": {"endpoint": "chat.completions", "model": "preflight", "stream": False, "max_tokens": 16, "choices": 1,
                "tools": [], "message_count": 1, "metadata": {}},
    "estimate": {"input_tokens": 1, "output_tokens_max": 16, "cost_usd_max": 0.0, "cost_micro_usd_max": 0},
    "spend": {},
    "now": "2026-01-01T00:00:00Z",
}
VET_TIMEOUT_S = 60.0
CHILD_MEMORY_BYTES = 4 << 30  # the child's address space; the shipped policy needs well under 1 GiB
_AT = re.compile(r"^error: (?P<message>.*) \(at (?P<file>.+?):(?P<line>\d+):(?P<column>\d+)\)$")


@dataclass
class Vetting:
    """What the child found: errors refuse the policy, warnings do not; ``rules`` are the rule
    paths it defines (for ``lockgate policy test``)."""

    findings: list[Finding] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]


@dataclass(frozen=True)
class Answer:
    """One input's answer: the rule's value (None when undefined), or why there is none."""

    value: Any = None
    error: str | None = None


def vet_policy(source: PolicySource, *, with_tests: bool = False, sample: bool = True,
               timeout_s: float = VET_TIMEOUT_S) -> Vetting:
    """Parse and guard the policy (and its ``*_test.rego`` modules, ``with_tests``); with
    ``sample``, require ``data.lockgate.decision`` and evaluate it once on a sample input."""
    job = _job(source, with_tests) | {"mode": "vet", "sample": sample}
    vetting = Vetting()
    lines, status = _run_child(job, [], timeout_s)
    for line in lines:
        if "finding" in line:
            vetting.findings.append(Finding(**line["finding"]))
        elif "rules" in line:
            vetting.rules = list(line["rules"])
    if status is not None and not vetting.errors:
        vetting.findings.append(Finding("", 0, 0, "error", status))
    return vetting


def run_preflight(source: PolicySource, *, sample: bool = True) -> None:
    """Raise ValueError naming every error of ``vet_policy``: the policy must not serve. Without
    ``sample`` (a policy OPA evaluates) it is parsed and guarded only."""
    errors = vet_policy(source, sample=sample).errors
    if errors:
        raise ValueError("; ".join(str(e) for e in errors))


def evaluate_in_child(source: PolicySource, jobs: Sequence[tuple[str, Any]], *, with_tests: bool = False,
                      timeout_s: float = VET_TIMEOUT_S) -> Iterator[Answer]:
    """The answer of each (entrypoint, input), in order, evaluated in child processes after the
    guard. Raises ValueError when the policy does not pass the guard or does not compile."""
    job = _job(source, with_tests) | {"mode": "evaluate"}
    start = 0
    while start < len(jobs):  # each round answers at least one job: bounded by len(jobs)
        batch = [json.dumps({"entrypoint": e, "input": i}) for e, i in jobs[start:]]
        lines, status = _run_child(job, batch, timeout_s + len(batch) * 0.05)
        answered, phase = 0, ""
        for line in lines:
            phase = line.get("phase", phase)
            if "finding" in line and line["finding"]["severity"] == "error":
                raise ValueError(str(Finding(**line["finding"])))
            if "answer" in line:
                answer = line["answer"]
                answered += 1
                yield Answer(value=answer.get("value"), error=answer.get("error"))
        start += answered
        if status is None and answered == 0:
            raise ValueError("the policy child answered nothing")
        if status is not None and start < len(jobs):
            if phase != "evaluating":  # the policy itself, not an input, failed
                raise ValueError(status)
            yield Answer(error=status)  # the input the child died on
            start += 1


def _job(source: PolicySource, with_tests: bool) -> dict[str, Any]:
    modules = {**source.modules, **source.tests} if with_tests else dict(source.modules)
    return {"modules": modules, "data": source.data}


def _run_child(job: dict[str, Any], inputs: list[str], timeout_s: float) -> tuple[list[dict[str, Any]], str | None]:
    """The child's JSON lines, and why it failed (None when it ended well)."""
    payload = "\n".join([json.dumps(job), *inputs]) + "\n"
    try:
        result = subprocess.run([sys.executable, "-m", "gateway.policy.preflight"], input=payload,
                                capture_output=True, text=True, timeout=timeout_s,
                                env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        stdout, code, stderr = result.stdout, result.returncode, result.stderr
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        code, stderr = None, ""
    lines = []
    for text in stdout.splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            break  # a line cut short by a crash
    phase = next((line["phase"] for line in reversed(lines) if "phase" in line), "evaluating")
    if code is None:
        hint = " (regorus takes exponential time on deeply nested literals)" if phase == "parsing" else ""
        return lines, f"{phase} the policy did not finish within {timeout_s:.0f} s{hint}"
    if code < 0:
        return lines, f"{phase} the policy crashed the engine (signal {-code})"
    if code != 0:
        last = (stderr.strip().splitlines() or ["the policy child failed"])[-1]
        return lines, f"the policy child failed: {last}"
    return lines, None


# The child.

def _emit(out: TextIO, line: dict[str, Any]) -> None:
    out.write(json.dumps(line, default=str) + "\n")
    out.flush()  # what was written survives a crash of the next step


def _engine_finding(message: str) -> Finding:
    """regorus's 'error: msg (at file:line:col)' as a finding."""
    match = _AT.match(message)
    if match is None:
        return Finding("", 0, 0, "error", message.removeprefix("error: "))
    return Finding(match["file"], int(match["line"]), int(match["column"]), "error", match["message"])


def _main() -> int:
    import regorus

    from gateway.policy import DECISION, RESPONSE_DECISION
    from gateway.policy.embedded import EmbeddedEngine, PolicyEngineError, _first_line, _rule_paths
    from gateway.policy.guard import inspect_policy

    # An allocation a client could make huge aborts here at once, not after eating the host's memory.
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))
    out = sys.stdout
    job = json.loads(sys.stdin.readline())
    source = PolicySource(modules=job["modules"], data=job["data"])
    _emit(out, {"phase": "parsing"})
    parser = regorus.Engine()
    try:
        for name, text in source.modules.items():
            parser.add_policy(name, text)
        ast = json.loads(parser.get_ast_as_json())
    except Exception as exc:
        _emit(out, {"finding": _engine_finding(_first_line(exc)).as_dict()})
        return 1
    _emit(out, {"phase": "guarding"})
    findings = inspect_policy(ast)
    for finding in findings:
        _emit(out, {"finding": finding.as_dict()})
    if any(f.severity == "error" for f in findings):
        return 1
    _emit(out, {"rules": sorted(_rule_paths(ast))})
    _emit(out, {"phase": "compiling"})
    try:
        engine = EmbeddedEngine(source)
    except PolicyEngineError as exc:
        _emit(out, {"finding": _engine_finding(str(exc).removeprefix("policy does not compile: ")).as_dict()})
        return 1
    if job["mode"] == "vet":
        if not job.get("sample"):
            return 0
        if not engine.defines(DECISION):
            _emit(out, {"finding": Finding("", 0, 0, "error", f"the policy defines no {DECISION}").as_dict()})
            return 1
        _emit(out, {"phase": "evaluating a sample input with"})
        for entrypoint in (DECISION, RESPONSE_DECISION):
            if engine.defines(entrypoint):
                try:
                    engine.evaluate(entrypoint, SAMPLE_INPUT)
                except PolicyEngineError as exc:
                    message = str(exc).removeprefix("policy evaluation failed: ")
                    _emit(out, {"finding": _engine_finding(message).as_dict()})
                    return 1
        return 0
    _emit(out, {"phase": "evaluating"})
    for text in sys.stdin:
        request = json.loads(text)
        try:
            answer = {"value": engine.evaluate(request["entrypoint"], request["input"])}
        except PolicyEngineError as exc:
            answer = {"error": str(exc)}
        _emit(out, {"answer": answer})
    return 0


if __name__ == "__main__":
    sys.exit(_main())

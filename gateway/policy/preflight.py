"""Evaluate a policy once in a child process before the gateway loads it.

regorus crashes the whole process on a recursive rule, and reports some compile errors only
when a rule is first evaluated. Running one sample decision here, in a process of its own,
turns both into a refusal to start with a clear message instead of a dead gateway later.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gateway.policy.source import PolicySource

SAMPLE_INPUT = {
    "principal": {"key_id": "k_preflight", "user": "preflight", "team": "preflight", "org": "preflight",
                  "roles": [], "labels": {}},
    "request": {"endpoint": "chat.completions", "model": "preflight", "stream": False, "max_tokens": 16,
                "tools": [], "message_count": 1, "metadata": {}},
    "estimate": {"input_tokens": 1, "output_tokens_max": 16, "cost_usd_max": 0.0, "cost_micro_usd_max": 0},
    "spend": {},
    "now": "2026-01-01T00:00:00Z",
}


def run_preflight(source: PolicySource) -> None:
    """Raise ValueError with the engine's message if the sample evaluation fails or crashes."""
    payload = json.dumps({"modules": source.modules, "data": source.data})
    result = subprocess.run([sys.executable, "-m", "gateway.policy.preflight"], input=payload,
                            capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    if result.returncode < 0:
        raise ValueError(f"evaluating the policy crashed the engine (signal {-result.returncode}); "
                         "look for a recursive rule")
    if result.returncode != 0:
        raise ValueError((result.stdout or result.stderr).strip().splitlines()[-1])


def _main() -> int:
    from gateway.policy import DECISION, RESPONSE_DECISION
    from gateway.policy.embedded import EmbeddedEngine, PolicyEngineError

    payload = json.loads(sys.stdin.read())
    try:
        engine = EmbeddedEngine(PolicySource(modules=payload["modules"], data=payload["data"]))
        if not engine.defines(DECISION):
            print(f"the policy defines no {DECISION}")
            return 1
        for entrypoint in (DECISION, RESPONSE_DECISION):
            if engine.defines(entrypoint):
                engine.evaluate(entrypoint, SAMPLE_INPUT)
    except PolicyEngineError as exc:
        print(exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())

"""Gateway overhead: the same chat call sent straight to a fake provider and through Lockgate.

One run starts a fast fake OpenAI-compatible upstream (raw asyncio + httptools, on the load
core), a ``lockgate serve`` process pinned alone to its own core with a fresh SQLite store and a
bench policy (auth, policy, budgets and audit all on), then measures, direct vs gateway:
latency p50/p99 at concurrency 1 and 8, requests per second at concurrency 8, streaming time to
first byte, the gateway's CPU time per call and its peak memory. Every loop is bounded by a
request count and by time. Only loopback addresses are used; only processes started here are
stopped. Usage: ``python bench/bench.py [--requests N] [--max-seconds S] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MODEL = "bench-model"
MESSAGES = [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Say hello to the benchmark in a few words, please."}]
CHAT_BODY = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 32}).encode()
STREAM_BODY = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 32, "stream": True,
                          "stream_options": {"include_usage": True}}).encode()


# ---------------------------------------------------------------- fake upstream (child process)

def _upstream_replies(chunks: int) -> tuple[bytes, bytes, bytes]:
    """Pre-encoded replies: JSON completion, SSE stream with usage, SSE stream without usage."""
    base = {"id": "chatcmpl-bench", "created": 1, "model": "bench-upstream"}
    usage = {"prompt_tokens": 24, "completion_tokens": chunks, "total_tokens": 24 + chunks}
    completion = json.dumps({**base, "object": "chat.completion", "usage": usage, "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello bench! " * chunks}}]})
    head = "HTTP/1.1 200 OK\r\ncontent-type: {}\r\n{}\r\n"
    plain = (head.format("application/json", f"content-length: {len(completion)}\r\n") + completion).encode()

    def stream(with_usage: bool) -> bytes:
        chunk = {**base, "object": "chat.completion.chunk"}
        events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
        events += [{**chunk, "choices": [{"index": 0, "delta": {"content": "Hello bench! "}}]}] * chunks
        events += [{**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
        if with_usage:
            events += [{**chunk, "choices": [], "usage": usage}]
        framed = [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]
        body = b"".join(b"%x\r\n%s\r\n" % (len(f), f) for f in framed) + b"0\r\n\r\n"
        return head.format("text/event-stream", "transfer-encoding: chunked\r\n").encode() + body

    return plain, stream(True), stream(False)


def serve_upstream(chunks: int) -> None:
    """Answer POST /v1/chat/completions on a free loopback port; print the port, then serve forever."""
    import httptools
    import orjson
    import uvloop

    plain, stream_usage, stream_plain = _upstream_replies(chunks)
    not_found = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"

    class Upstream(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
            self.parser = httptools.HttpRequestParser(self)
            self.url, self.body = b"", bytearray()

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.close()

        def on_message_begin(self) -> None:
            self.url, self.body = b"", bytearray()

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            if self.url != b"/v1/chat/completions":
                reply = not_found
            else:
                request = orjson.loads(self.body)
                if request.get("stream"):
                    wants = (request.get("stream_options") or {}).get("include_usage")
                    reply = stream_usage if wants else stream_plain
                else:
                    reply = plain
            self.transport.write(reply)
            if not self.parser.should_keep_alive():
                self.transport.close()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Upstream, HOST, 0, backlog=1024)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    uvloop.run(main())


# ---------------------------------------------------------------- processes

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def spawn(argv: list[str], core: int | None, **kwargs: Any) -> subprocess.Popen[bytes]:
    pin = functools.partial(os.sched_setaffinity, 0, {core}) if core is not None else None
    return subprocess.Popen(argv, preexec_fn=pin, **kwargs)  # the bench process has no threads yet


def stop(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Stop one process this script started: SIGTERM, then SIGKILL after ``grace_s``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def write_policy(folder: Path) -> None:
    folder.mkdir()
    shutil.copy(ROOT / "policies" / "lockgate.rego", folder / "lockgate.rego")
    data = {"lockgate": {"aliases": {}, "fallbacks": {}, "approval_tools": {},
                         "teams": {"bench": {"models": [MODEL], "monthly_budget_usd": 1_000_000}}}}
    (folder / "data.json").write_text(json.dumps(data, indent=2))


def gateway_env(workdir: Path, upstream_port: int, gateway_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKGATE_")}
    model = {"name": MODEL, "provider": "openai", "upstream_model": "bench-upstream",
             "base_url": f"http://{HOST}:{upstream_port}/v1", "api_key_env": "BENCH_UPSTREAM_KEY",
             "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.60}
    env.update({"PYTHONPATH": str(ROOT), "BENCH_UPSTREAM_KEY": "sk-bench",
                "LOCKGATE_HOST": HOST, "LOCKGATE_PORT": str(gateway_port), "LOCKGATE_LOG_LEVEL": "warning",
                "LOCKGATE_DATABASE_URL": f"sqlite:///{workdir / 'lockgate.db'}",
                "LOCKGATE_POLICY_DIR": str(workdir / "policy"), "LOCKGATE_MODELS": json.dumps([model])})
    return env


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- load generator

@dataclass
class Phase:
    name: str
    target: str
    concurrency: int
    stream: bool
    ok: int = 0
    errors: int = 0
    first_error: str = ""
    seconds: float = 0.0
    latency_ms: list[float] = field(default_factory=list)
    ttfb_ms: list[float] = field(default_factory=list)
    gateway_cpu_s: float = 0.0
    load_core_cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        calls = max(self.ok + self.errors, 1)
        return {"name": self.name, "target": self.target, "concurrency": self.concurrency, "stream": self.stream,
                "ok": self.ok, "errors": self.errors, "first_error": self.first_error,
                "seconds": round(self.seconds, 3), "rps": round(self.rps, 1),
                "p50_ms": pct(self.latency_ms, 50), "p99_ms": pct(self.latency_ms, 99),
                "ttfb_p50_ms": pct(self.ttfb_ms, 50), "ttfb_p99_ms": pct(self.ttfb_ms, 99),
                "gateway_cpu_ms_per_call": round(self.gateway_cpu_s * 1000 / calls, 3),
                "load_core_busy": round(self.load_core_cpu_s / self.seconds, 3) if self.seconds else 0.0}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))], 3)


async def run_phase(session: Any, url: str, headers: dict[str, str], phase: Phase, count: int,
                    max_seconds: float) -> None:
    """``phase.concurrency`` workers send requests until ``count`` were issued or time runs out."""
    import aiohttp

    body = STREAM_BODY if phase.stream else CHAT_BODY
    issued = 0
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal issued
        while issued < count and time.perf_counter() < deadline:
            issued += 1
            start = time.perf_counter()
            first = 0.0
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    if phase.stream:
                        head = await response.content.readany()
                        first = time.perf_counter()
                        reply = head + await response.read()
                        good = response.status == 200 and reply.rstrip().endswith(b"data: [DONE]")
                    else:
                        reply = await response.read()
                        good = response.status == 200 and b'"usage"' in reply
            except (aiohttp.ClientError, TimeoutError) as exc:
                reply, good = repr(exc).encode(), False
            end = time.perf_counter()
            if good:
                phase.ok += 1
                phase.latency_ms.append((end - start) * 1000)
                if first:
                    phase.ttfb_ms.append((first - start) * 1000)
            else:
                phase.errors += 1
                phase.first_error = phase.first_error or reply[:300].decode(errors="replace")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(phase.concurrency)))
    phase.seconds = time.perf_counter() - started


async def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the gateway exited with status {process.returncode}")
            try:
                async with session.get(url + "/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the gateway was not ready within {timeout_s} s")


async def measure(args: argparse.Namespace, gateway: subprocess.Popen[bytes], upstream: subprocess.Popen[bytes],
                  upstream_url: str, gateway_url: str, key: str) -> list[Phase]:
    import aiohttp

    targets = {"direct": (upstream_url, {"content-type": "application/json", "authorization": "Bearer sk-bench"}),
               "gateway": (gateway_url, {"content-type": "application/json", "authorization": f"Bearer {key}"})}
    plan = [("chat c=1", 1, False, args.requests), ("chat c=8", 8, False, args.requests),
            ("stream c=1", 1, True, args.stream_requests)]
    phases: list[Phase] = []
    timeout = aiohttp.ClientTimeout(total=30)
    connector = functools.partial(aiohttp.TCPConnector, limit=8, force_close=False)
    async with aiohttp.ClientSession(connector=connector(), timeout=timeout) as direct, \
            aiohttp.ClientSession(connector=connector(), timeout=timeout) as through:
        sessions = {"direct": direct, "gateway": through}
        for target, (url, headers) in targets.items():  # warm-up: connections, caches, JIT-free but lazy paths
            for stream in (False, True):
                warm = Phase("warm-up", target, 8, stream)
                await run_phase(sessions[target], url + "/chat/completions", headers, warm, args.warmup,
                                args.max_seconds)
                if warm.errors:
                    raise RuntimeError(f"warm-up against {target} failed {warm.errors} times: {warm.first_error}")
        for name, concurrency, stream, count in plan:
            for target, (url, headers) in targets.items():
                phase = Phase(name, target, concurrency, stream)
                gateway_cpu, load_cpu = cpu_seconds(gateway.pid), cpu_seconds(os.getpid()) + cpu_seconds(upstream.pid)
                await run_phase(sessions[target], url + "/chat/completions", headers, phase, count, args.max_seconds)
                if target == "gateway":
                    await asyncio.sleep(0.5)  # let the batched audit writes of this phase land in its CPU time
                phase.gateway_cpu_s = cpu_seconds(gateway.pid) - gateway_cpu
                phase.load_core_cpu_s = cpu_seconds(os.getpid()) + cpu_seconds(upstream.pid) - load_cpu
                phases.append(phase)
                print(f"  {name:<11} {target:<8} {phase.ok} ok, {phase.errors} errors in {phase.seconds:.1f} s",
                      file=sys.stderr, flush=True)
    return phases


# ---------------------------------------------------------------- report

def report(phases: list[Phase], peak_rss_kib: int, audit_rows: int | None, gateway_calls: int) -> dict[str, Any]:
    by = {(p.name, p.target): p.summary() for p in phases}
    rows: list[tuple[str, float, float, bool]] = []  # label, direct, gateway, higher_is_better
    for name in ("chat c=1", "chat c=8"):
        rows.append((f"{name} p50 latency ms", by[name, "direct"]["p50_ms"], by[name, "gateway"]["p50_ms"], False))
        rows.append((f"{name} p99 latency ms", by[name, "direct"]["p99_ms"], by[name, "gateway"]["p99_ms"], False))
    rows.append(("chat c=8 requests/s", by["chat c=8", "direct"]["rps"], by["chat c=8", "gateway"]["rps"], True))
    s = "stream c=1"
    rows.append((f"{s} TTFB p50 ms", by[s, "direct"]["ttfb_p50_ms"], by[s, "gateway"]["ttfb_p50_ms"], False))
    rows.append((f"{s} total p50 ms", by[s, "direct"]["p50_ms"], by[s, "gateway"]["p50_ms"], False))
    print(f"\n{'metric':<26}{'direct':>10}{'gateway':>10}{'overhead':>11}{'gw/direct':>11}")
    print("-" * 68)
    for label, direct, gw, higher in rows:
        delta = gw - direct
        ratio = gw / direct if direct else float("nan")
        sign = "" if higher else "+"
        print(f"{label:<26}{direct:>10.3f}{gw:>10.3f}{sign + format(delta, '.3f'):>11}{ratio:>10.2f}x")
    print(f"\n{'phase':<12}{'target':<9}{'ok':>6}{'err':>5}{'rps':>9}{'p50':>8}{'p99':>8}"
          f"{'gw cpu ms/call':>16}{'load core busy':>16}")
    for p in phases:
        d = p.summary()
        cpu = f"{d['gateway_cpu_ms_per_call']:.3f}" if p.target == "gateway" else "-"
        print(f"{p.name:<12}{p.target:<9}{d['ok']:>6}{d['errors']:>5}{d['rps']:>9.1f}{d['p50_ms']:>8.3f}"
              f"{d['p99_ms']:>8.3f}{cpu:>16}{d['load_core_busy']:>15.0%}")
    print(f"\ngateway peak memory (VmHWM): {peak_rss_kib / 1024:.1f} MiB")
    if audit_rows is not None:
        print(f"audit decision records written: {audit_rows} for {gateway_calls} gateway calls (incl. warm-up)")
    for p in phases:
        if p.errors:
            print(f"WARNING {p.name} {p.target}: {p.errors} errors, first: {p.first_error}")
        if p.summary()["load_core_busy"] > 0.9:
            print(f"WARNING {p.name} {p.target}: the load core was {p.summary()['load_core_busy']:.0%} busy; "
                  "this phase may measure the load generator rather than its target")
    return {"phases": [p.summary() for p in phases], "peak_rss_kib": peak_rss_kib, "audit_rows": audit_rows,
            "gateway_calls": gateway_calls,
            "overhead": [{"metric": label, "direct": d, "gateway": g, "ratio": round(g / d, 3) if d else None}
                         for label, d, g, _ in rows]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per non-streaming phase")
    parser.add_argument("--stream-requests", type=int, default=1000, help="requests per streaming phase")
    parser.add_argument("--warmup", type=int, default=300, help="warm-up requests per target and mode")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="time cap per phase")
    parser.add_argument("--chunks", type=int, default=8, help="content chunks per streamed reply")
    parser.add_argument("--gateway-core", type=int, default=0)
    parser.add_argument("--load-core", type=int, default=1, help="core of the load generator and fake upstream")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.chunks)
        return 0

    cores = os.sched_getaffinity(0)
    gateway_core, load_core = args.gateway_core, args.load_core
    if not {gateway_core, load_core} <= cores or gateway_core == load_core:
        print(f"warning: cores {gateway_core}/{load_core} not both available ({sorted(cores)}); not pinning",
              file=sys.stderr)
        gateway_core = load_core = None
    if load_core is not None:
        os.sched_setaffinity(0, {load_core})

    workdir = Path(tempfile.mkdtemp(prefix="lockgate-bench-"))
    started: list[subprocess.Popen[bytes]] = []
    try:
        upstream = spawn([sys.executable, __file__, "--serve-upstream", "--chunks", str(args.chunks)], load_core,
                         stdout=subprocess.PIPE)
        started.append(upstream)
        assert upstream.stdout is not None
        upstream_port = int(upstream.stdout.readline())
        upstream_url = f"http://{HOST}:{upstream_port}/v1"
        write_policy(workdir / "policy")
        port = free_port()
        env = gateway_env(workdir, upstream_port, port)
        key = subprocess.run([sys.executable, "-m", "gateway.cli", "keys", "create", "--user", "bench",
                              "--team", "bench"], env=env, cwd=workdir, check=True, capture_output=True,
                             timeout=60).stdout.decode().strip()
        with (workdir / "gateway.log").open("wb") as log:
            gateway = spawn([sys.executable, "-m", "gateway.cli", "serve"], gateway_core, env=env, cwd=workdir,
                            stdout=log, stderr=subprocess.STDOUT)
        started.append(gateway)
        gateway_url = f"http://{HOST}:{port}"
        try:
            asyncio.run(wait_ready(gateway_url, gateway, 60))
        except RuntimeError:
            print((workdir / "gateway.log").read_text()[-4000:], file=sys.stderr)
            raise
        print(f"gateway pid {gateway.pid} on core {gateway_core}, upstream pid {upstream.pid} and load generator "
              f"on core {load_core}; store {workdir / 'lockgate.db'}", file=sys.stderr, flush=True)
        phases = asyncio.run(measure(args, gateway, upstream, upstream_url, gateway_url + "/v1", key))
        peak = status_kib(gateway.pid, "VmHWM")
        stop(gateway)  # graceful: flushes the audit buffer
        with sqlite3.connect(workdir / "lockgate.db") as db:
            audit_rows = int(db.execute("SELECT count(*) FROM decision_records").fetchone()[0])
        calls = 2 * args.warmup + sum(p.ok + p.errors for p in phases if p.target == "gateway")
        results = report(phases, peak, audit_rows, calls)
        results["environment"] = {"python": platform.python_version(), "machine": platform.machine(),
                                  "cpus": os.cpu_count(), "gateway_core": gateway_core, "load_core": load_core,
                                  "args": {k: str(v) for k, v in vars(args).items()}}
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
            print(f"wrote {args.json}")
        if any(p.errors for p in phases):
            return 1
        return 0
    finally:
        for process in reversed(started):
            stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""A loopback stand-in for an OPA server: our own HTTP shim around the real OPA Go engine.

What this is, plainly: NOT the OPA server binary (none can be installed where the tests run). It
is a small HTTP server of ours, written for the tests, that implements the part of OPA's REST API
the gateway calls through opa-python-client, and evaluates every query with the real OPA engine
(v1.20.2, the Go code of OPA's ``rego`` package) embedded in process by the
``opa-golib-python-bindings`` wheel (``make install`` adds it; it is no dependency of Lockgate).
So decisions, compile errors, recursion checks, conflicts and builtins are OPA's own; the HTTP
layer (status codes, error bodies, the bundle bookkeeping) is ours, modelled on OPA's API docs.

Implemented, as opa-python-client calls them:

- ``GET /health`` (``?bundles=true``: 500 until a bundle is loaded, as OPA answers then);
- ``GET /v1/policies``, ``GET|PUT|DELETE /v1/policies/<id>``: a PUT compiles every module with
  the data (OPA's compiler) and is refused with 400 and OPA's errors when that fails;
- ``GET|PUT|DELETE /v1/data/<path>`` and ``POST /v1/data/<path>`` with ``{"input": ...}``: the
  document's value as ``{"result": ...}``, ``{}`` when undefined, 500 on an evaluation error;
- bundles are not downloaded: ``load_bundle`` installs a bundle's modules and data the way OPA
  would activate them, with its manifest at ``data.system.bundles.<name>.manifest``.

A bearer token, when given, is required on every request (401 otherwise), as OPA's
``--authentication=token`` with an authorization policy that checks it. Knobs for the tests:
``delay_s`` holds each query that long, ``push_delay_s`` each policy upload or deletion,
``refuse_pushes`` answers every policy upload and deletion with a 500,
``fail_status`` answers queries with that HTTP status,
and ``stop()`` takes the server away (open keep-alive connections are cut too).
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from opa_bindings import OpaEngine, OpaError, OpaUndefinedError


class OpaServer:
    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.modules: dict[str, str] = {}
        self.data: dict[str, Any] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) as received
        self.authorizations: list[str] = []  # every Authorization header received
        self.delay_s = 0.0
        self.push_delay_s = 0.0  # holds each policy PUT or DELETE that long
        self.refuse_pushes = False  # answers each policy PUT or DELETE with a 500
        self.fail_status: int | None = None
        self._lock = threading.Lock()
        self._engine = self._compile({}, {})
        self._connections: set[socket.socket] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> OpaServer:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="opa-shim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take the server away: no new connection is accepted and open ones are cut."""
        self._server.shutdown()
        self._server.server_close()
        for connection in list(self._connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def load_bundle(self, name: str, revision: str, modules: dict[str, str], data: dict[str, Any]) -> None:
        """Activate a bundle as OPA does after downloading it: its modules (ids ``<name>/<file>``),
        its data, and its manifest under ``data.system.bundles``."""
        with self._lock:
            new_modules = {**{k: v for k, v in self.modules.items() if not k.startswith(name + "/")},
                           **{f"{name}/{file}": text for file, text in modules.items()}}
            new_data = copy.deepcopy(data)
            bundles = copy.deepcopy(self.data.get("system", {}).get("bundles", {}))
            bundles[name] = {"manifest": {"revision": revision, "roots": [""]}}
            new_data["system"] = {"bundles": bundles}
            self._swap(new_modules, new_data)

    # -- the engine ------------------------------------------------------

    @staticmethod
    def _compile(modules: dict[str, str], data: dict[str, Any]) -> OpaEngine:
        """A fresh OPA engine with these modules and data, compiled (raises OpaError when OPA refuses)."""
        engine = OpaEngine()
        try:
            for policy_id, text in modules.items():
                engine.add_policy(policy_id, text)
            engine.add_data(data)
            engine.eval_query("true")  # OPA compiles every module on the first query
        except OpaError:
            engine.close()
            raise
        return engine

    def _swap(self, modules: dict[str, str], data: dict[str, Any]) -> None:
        engine = self._compile(modules, data)
        old, self._engine, self.modules, self.data = self._engine, engine, modules, data
        old.close()

    def forget(self) -> None:
        """Drop every policy and document, as an OPA server does when it restarts."""
        with self._lock:
            self._swap({}, {})

    def evaluate(self, path: str, policy_input: Any) -> Any:
        with self._lock:
            engine = self._engine
            return engine.eval_document(".".join(p for p in path.split("/") if p), policy_input)

    # -- the REST API ----------------------------------------------------

    def answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        parts = urlsplit(target)
        path, query = unquote(parts.path), parse_qs(parts.query, keep_blank_values=True)
        self.requests.append((method, path))
        authorization = headers.get("authorization", "")
        self.authorizations.append(authorization)
        if self.token is not None and authorization != f"Bearer {self.token}":
            return 401, {"code": "unauthorized", "message": "missing or invalid authorization token"}
        if path == "/health":
            wants_bundles = any(v.lower() in ("", "true") for v in query.get("bundles", []))
            if wants_bundles and not self.data.get("system", {}).get("bundles"):
                return 500, {"error": "not all bundles activated"}
            return 200, {}
        if path == "/v1/policies" or path == "/v1/policies/":
            with self._lock:
                return 200, {"result": [{"id": k, "raw": v} for k, v in self.modules.items()]}
        if path.startswith("/v1/policies/"):
            return self._policy(method, path[len("/v1/policies/"):], body)
        if path == "/v1/data" or path.startswith("/v1/data/"):
            return self._data(method, path[len("/v1/data"):].strip("/"), body)
        return 404, {"code": "resource_not_found", "message": f"{path} not found"}

    def _policy(self, method: str, policy_id: str, body: bytes) -> tuple[int, Any]:
        if method in ("PUT", "DELETE") and self.push_delay_s:
            time.sleep(self.push_delay_s)
        if method in ("PUT", "DELETE") and self.refuse_pushes:
            return 500, {"code": "internal_error", "message": "storage failure, made by the test"}
        missing = {"code": "resource_not_found", "message": f"storage_not_found_error: policy id {policy_id!r}"}
        with self._lock:
            if method == "GET":
                if policy_id not in self.modules:
                    return 404, missing
                return 200, {"result": {"id": policy_id, "raw": self.modules[policy_id]}}
            if method == "DELETE":
                if policy_id not in self.modules:
                    return 404, missing
                modules = {k: v for k, v in self.modules.items() if k != policy_id}
            elif method == "PUT":
                modules = {**self.modules, policy_id: body.decode()}
            else:
                return 405, {"code": "invalid_parameter", "message": f"{method} not allowed"}
            try:
                self._swap(modules, self.data)
            except OpaError as exc:
                return 400, {"code": "invalid_parameter", "message": "error(s) occurred while compiling module(s)",
                             "errors": [{"code": exc.code, "message": exc.message}]}
            return 200, {}

    def _data(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        if method in ("GET", "POST"):
            policy_input = None
            if method == "POST" and body:
                try:
                    policy_input = json.loads(body).get("input")
                except (ValueError, AttributeError):
                    return 400, {"code": "invalid_parameter", "message": "body must be a JSON object"}
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.fail_status is not None:
                return self.fail_status, {"code": "internal_error", "message": "made to fail by the test"}
            try:
                return 200, {"result": self.evaluate(path, policy_input)}
            except OpaUndefinedError:
                return 200, {}
            except OpaError as exc:
                return 500, {"code": "internal_error", "message": exc.message}
        steps = [p for p in path.split("/") if p]
        with self._lock:
            data = copy.deepcopy(self.data)
            if not steps:
                return 400, {"code": "invalid_parameter", "message": "the root document cannot be written here"}
            parent = data
            for step in steps[:-1]:
                parent = parent.setdefault(step, {})
                if not isinstance(parent, dict):
                    return 400, {"code": "invalid_parameter", "message": f"{path} is not under an object"}
            if method == "PUT":
                try:
                    parent[steps[-1]] = json.loads(body)
                except ValueError:
                    return 400, {"code": "invalid_parameter", "message": "body is not JSON"}
            elif method == "DELETE":
                if steps[-1] not in parent:
                    return 404, {"code": "resource_not_found", "message": f"storage_not_found_error: {path}"}
                del parent[steps[-1]]
            else:
                return 405, {"code": "invalid_parameter", "message": f"{method} not allowed"}
            try:
                self._swap(self.modules, data)
            except OpaError as exc:
                return 400, {"code": "invalid_parameter", "message": exc.message}
        return 204, None


def _handler(server: OpaServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the gateway's client pools its connections

        def setup(self) -> None:
            super().setup()
            server._connections.add(self.connection)

        def finish(self) -> None:
            server._connections.discard(self.connection)
            super().finish()

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, payload = server.answer(self.command, self.path, headers, body)
            raw = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            if payload is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the test reads ``requests`` instead

    return Handler

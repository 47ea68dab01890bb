"""The web console at ``/ui``: server-rendered pages (Jinja2, autoescaped; no script at all) for
reviewing the audit and deciding approvals, signed in with a reviewer, approver or admin key.

Pages (docs/audit.md, "Web console"):

- ``/ui/signin``: paste an API key; accepted when its principal has the reviewer, approver or
  admin role. The browser then holds only a session cookie (``sessions.py``).
- ``/ui/traces``: the org's decision records, filtered and paged as ``GET /admin/traces``
  (``gateway/review.py``); ``/ui/traces/{id}``: one trace's records (decision, reasons, cost,
  approval) and its span timeline; another org's trace is a 404. Reviewer or admin role.
- ``/ui/approvals``: the org's pending approvals with Approve and Deny, decided through
  ``ApprovalQueue.decide`` as ``POST /admin/approvals/{id}/approve|deny`` is (may_approve, no
  self-approval, one winner); approver or admin role.

Console requests do not go through the governed pipeline (they call no model and leave no
decision record; a decision's spans still land in the trace of the call it decided). Every POST
carries the session's CSRF token; every response carries a strict Content-Security-Policy, and
any failure is a page, never a traceback.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from gateway.admin import MAX_NOTE_CHARS, check_reason, small_body
from gateway.approvals import DECIDER_ROLES
from gateway.audit.reader import span_tree
from gateway.console.sessions import (
    CONSOLE_ROLES,
    SESSION_COOKIE,
    SESSION_IDLE_S,
    SIGNIN_COOKIE,
    Session,
    SessionStore,
)
from gateway.errors import (
    ApprovalConflict,
    ApprovalNotFound,
    AuthenticationFailed,
    DecisionRefused,
    GatewayError,
    InvalidRequest,
    RequestTooLarge,
    StoreUnavailable,
    TraceNotFound,
)
from gateway.review import OUTCOMES, TRACE_FILTERS, may_review, org_trace, trace_page, utc
from gateway.types import Principal

log = logging.getLogger("lockgate.console")

HERE = Path(__file__).resolve().parent
MAX_FORM_BYTES = 8 * 1024
PAGE_SIZES = (25, 50, 100, 200)
RECENT_APPROVALS = 20
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
SECURITY_HEADERS = {
    "content-security-policy": ("default-src 'self'; script-src 'none'; object-src 'none'; base-uri 'none'; "
                                "form-action 'self'; frame-ancestors 'none'"),
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
}
Handler = Callable[[Request], Awaitable[Response]]


class Refused(Exception):
    """A console page that says no: its status, title and message."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


class Redirect(Exception):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


@dataclass
class Viewer:
    """Who is looking: the session and the principal of its key, as the store has it now."""

    session: Session
    principal: Principal

    @property
    def can_review(self) -> bool:
        return may_review(self.principal)

    @property
    def can_decide(self) -> bool:
        return bool(DECIDER_ROLES.intersection(self.principal.roles))


def _signed_in_roles(principal: Principal) -> bool:
    return bool(set(CONSOLE_ROLES).intersection(principal.roles))


def _when(value: datetime | str | None, precise: bool = False) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    moment = utc(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if precise else moment.strftime("%Y-%m-%d %H:%M:%S")


def _usd(micro: int | None) -> str:
    return "-" if micro is None else f"${micro / 1e6:.6f}"


def _model(row: Mapping[str, Any]) -> str:
    requested, routed = row.get("requested_model") or "-", row.get("routed_model")
    return requested if not routed or routed == requested else f"{requested} → {routed}"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def timeline(spans: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], float]:
    """The spans as the detail page draws them (parents before children, with depth), each with its
    offset from the trace's first span and its duration, in ms and in whole percent of the trace."""
    if not spans:
        return [], 0.0
    start = min(s["start_ns"] for s in spans)
    total = max(max(s["end_ns"] for s in spans) - start, 1)
    rows = []
    for depth, span in span_tree(spans):
        offset, duration = span["start_ns"] - start, max(span["end_ns"] - span["start_ns"], 0)
        left = min(int(offset * 100 / total), 99)
        width = max(1, min(round(duration * 100 / total), 100 - left))
        rows.append({"span": span, "depth": min(depth, 12), "offset_ms": offset / 1e6, "duration_ms": duration / 1e6,
                     "left": left, "width": width,
                     "attributes": sorted((str(k), str(v)) for k, v in (span.get("attributes") or {}).items())})
    return rows, total / 1e6


def _timeline_css() -> str:
    """Bar offsets and widths as classes (the CSP allows no inline style)."""
    rules = [f".at-{n}{{margin-left:{n}%}}.w-{n}{{width:{n}%}}" for n in range(101)]
    rules += [f".depth-{n}{{padding-left:{0.4 + 1.2 * n:.1f}em}}" for n in range(13)]
    return "\n".join(rules) + "\n"


def _safe_next(value: str | None) -> str:
    """Where to go after signing in: a console path only (never another site)."""
    if value and value.startswith("/ui") and not value.startswith("//") and "\\" not in value \
            and value.isprintable() and len(value) <= 2000:
        return value
    return "/ui"


class Console:
    """The console's routes and their state: the sessions of this process and the templates."""

    def __init__(self, sessions: SessionStore | None = None) -> None:
        self.sessions = sessions or SessionStore()
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True,
                               undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.env.filters.update(utc=_when, usd=_usd, model=_model, pretty=_pretty)
        self.css = (HERE / "static" / "console.css").read_text() + _timeline_css()

    def routes(self) -> list[Route]:
        return [
            self._route("/ui", get=self.home),
            self._route("/ui/console.css", get=self.stylesheet),
            self._route("/ui/signin", get=self.signin_page, post=self.signin),
            self._route("/ui/signout", post=self.signout),
            self._route("/ui/traces", get=self.traces),
            self._route("/ui/traces/{trace_id}", get=self.trace),
            self._route("/ui/approvals", get=self.approvals),
            self._route("/ui/approvals/{approval_id}/{verdict}", post=self.decide),
            self._route("/ui/{rest:path}", get=self.elsewhere, post=self.elsewhere),
        ]

    # -- plumbing --------------------------------------------------------------------------------

    def _route(self, path: str, *, get: Handler | None = None, post: Handler | None = None) -> Route:
        handlers = {"GET": get, "HEAD": get, "POST": post}
        allow = ", ".join(m for m in ("GET", "HEAD", "POST") if handlers[m] is not None)

        async def endpoint(request: Request) -> Response:
            handler = handlers.get(request.method)
            try:
                if handler is None:
                    raise Refused(405, "Method not allowed", f"{request.method} is not allowed here.")
                response = await handler(request)
            except Redirect as exc:
                response = RedirectResponse(exc.url, status_code=303)
            except Refused as exc:
                response = self._error(request, exc.status, exc.title, exc.message)
                if exc.status == 405:
                    response.headers["allow"] = allow
            except StoreUnavailable:
                log.warning("console: the store did not answer on %s %s", request.method, request.url.path)
                response = self._error(request, 503, "The audit store is not answering",
                                       "The gateway could not reach its store. Try again in a moment.")
            except GatewayError as exc:
                response = self._error(request, exc.status, "That did not work", exc.message)
            except Exception:
                log.exception("console: unexpected error on %s %s", request.method, request.url.path)
                response = self._error(request, 500, "Something went wrong",
                                       "The console failed to handle this request; the gateway's log says why.")
            response.headers.update(SECURITY_HEADERS)
            return response

        return Route(path, endpoint, methods=METHODS)

    def _render(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        viewer: Viewer | None = context.pop("viewer", None) or getattr(request.state, "console_viewer", None)
        flash: list[tuple[str, str]] = []
        if viewer is not None:
            flash, viewer.session.flash = viewer.session.flash, []
        html = self.env.get_template(template).render(viewer=viewer, flash=flash, **context)
        return HTMLResponse(html, status_code=status)

    def _error(self, request: Request, status: int, title: str, message: str) -> HTMLResponse:
        return self._render(request, "error.html", status, title=title, message=message, code=status,
                            section="")

    @staticmethod
    def _cookie(request: Request, response: Response, name: str, value: str, max_age: int | None = None) -> None:
        response.set_cookie(name, value, max_age=max_age, path="/ui", httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")

    @staticmethod
    def _forget(request: Request, response: Response, name: str) -> None:
        response.delete_cookie(name, path="/ui", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")

    async def _form(self, request: Request) -> dict[str, str]:
        """An urlencoded form, read up to MAX_FORM_BYTES; the first value of each field."""
        try:
            raw = await small_body(request, MAX_FORM_BYTES)
        except RequestTooLarge:
            raise Refused(413, "Too large", f"A console form is at most {MAX_FORM_BYTES} bytes.") from None
        try:
            fields = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=16)
        except ValueError:
            raise Refused(400, "Not a console form", "The form could not be read.") from None
        return {name: values[0] for name, values in fields.items()}

    async def _viewer(self, request: Request) -> Viewer | None:
        """The signed-in viewer, if the cookie names a live session whose key is still valid."""
        session = self.sessions.find(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return None
        principal = await request.state.runtime.keys.current(session.key_id)
        if principal is None or not _signed_in_roles(principal):
            log.info("console: session of key %s ended (key revoked or without a console role)", session.key_id)
            self.sessions.end(session)
            return None
        viewer = Viewer(session, principal)
        request.state.console_viewer = viewer
        return viewer

    async def _require(self, request: Request, need: str | None = None) -> Viewer:
        viewer = await self._viewer(request)
        if viewer is None:
            if request.method in ("GET", "HEAD"):
                raise Redirect("/ui/signin?" + urlencode({"next": request.url.path + (
                    f"?{request.url.query}" if request.url.query else "")}))
            raise Refused(403, "Signed out", "Your console session has ended (signed out, expired or the key was "
                                             "revoked); sign in again. Nothing was changed.")
        if need == "review" and not viewer.can_review:
            raise Refused(403, "Not for your role", "Reading the audit needs a key with the reviewer or admin role.")
        if need == "decide" and not viewer.can_decide:
            raise Refused(403, "Not for your role", "Deciding approvals needs a key with the approver or admin role.")
        return viewer

    @staticmethod
    def _check_origin(request: Request) -> None:
        """A POST a browser says came from another site is refused before anything else: by
        ``Sec-Fetch-Site``, and by ``Origin`` when it names one (pages sent with
        ``Referrer-Policy: no-referrer`` make the browser send ``Origin: null`` even for their own
        forms, so null is left to the CSRF token)."""
        site = request.headers.get("sec-fetch-site")
        origin = request.headers.get("origin")
        if (site is not None and site not in ("same-origin", "none")) or (
                origin not in (None, "null") and origin != f"{request.url.scheme}://{request.url.netloc}"):
            log.warning("console: a cross-site POST to %s was refused (origin %r, sec-fetch-site %r)",
                        request.url.path, (origin or "")[:100], (site or "")[:32])
            raise Refused(403, "Form refused", "This form was not sent from the console's own pages. Nothing was "
                                               "changed.")

    def _check_csrf(self, viewer: Viewer, form: Mapping[str, str]) -> None:
        if not self.sessions.csrf_ok(viewer.session, form.get("csrf")):
            log.warning("console: a POST of user %s without a valid CSRF token was refused", viewer.principal.user)
            raise Refused(403, "Form refused", "This form's security token is missing or wrong (it did not come from "
                                               "this console session). Nothing was changed; reload the page and "
                                               "try again.")

    # -- signing in and out ----------------------------------------------------------------------

    async def stylesheet(self, request: Request) -> Response:
        return Response(self.css, media_type="text/css")

    async def home(self, request: Request) -> Response:
        viewer = await self._require(request)
        raise Redirect("/ui/traces" if viewer.can_review else "/ui/approvals")

    async def elsewhere(self, request: Request) -> Response:
        if request.path_params.get("rest", "") == "":
            return await self.home(request)
        await self._viewer(request)  # for the page's header
        raise Refused(404, "Not found", "There is no such page in the console.")

    def _signin_form(self, request: Request, status: int = 200, error: str | None = None,
                     notice: str | None = None, next_url: str | None = None) -> Response:
        presession = request.cookies.get(SIGNIN_COOKIE) or ""
        if not (20 <= len(presession) <= 100 and presession.replace("-", "").replace("_", "").isalnum()):
            presession = secrets.token_urlsafe(32)
        response = self._render(request, "signin.html", status, error=error, notice=notice, section="signin",
                                token=self.sessions.signin_token(presession),
                                next=_safe_next(next_url or request.query_params.get("next")),
                                idle_hours=SESSION_IDLE_S // 3600)
        self._cookie(request, response, SIGNIN_COOKIE, presession, max_age=3600)
        return response

    async def signin_page(self, request: Request) -> Response:
        if await self._viewer(request) is not None:
            raise Redirect(_safe_next(request.query_params.get("next")))
        notice = "You are signed out." if request.query_params.get("signed_out") else None
        return self._signin_form(request, notice=notice)

    async def signin(self, request: Request) -> Response:
        form = await self._form(request)
        next_url = _safe_next(form.get("next"))
        self._check_origin(request)
        if not self.sessions.signin_token_ok(request.cookies.get(SIGNIN_COOKIE), form.get("csrf")):
            return self._signin_form(request, 403, error="The sign-in form had expired or did not come from this "
                                                         "console. Please try again.", next_url=next_url)
        key = form.get("key", "").strip()
        if not key:
            return self._signin_form(request, 400, error="Paste your Lockgate API key.", next_url=next_url)
        try:
            principal: Principal = await request.state.runtime.keys.authenticate(key)
        except AuthenticationFailed:
            return self._signin_form(request, 401, error="Unknown or revoked API key.", next_url=next_url)
        if not _signed_in_roles(principal):
            log.info("console: key %s (user %s) has no console role; sign-in refused", principal.key_id,
                     principal.user)
            return self._signin_form(request, 403, next_url=next_url, error=(
                f"This key belongs to {principal.user} (team {principal.team}), who has none of the roles reviewer, "
                "approver or admin. The console is only for those roles."))
        earlier = self.sessions.find(request.cookies.get(SESSION_COOKIE))
        if earlier is not None:  # a new sign-in replaces the browser's session, never extends it
            self.sessions.end(earlier)
        session = self.sessions.create(principal.key_id, principal.user)
        log.info("console: %s (key %s, org %s) signed in", principal.user, principal.key_id, principal.org)
        response = RedirectResponse(next_url, status_code=303)
        self._forget(request, response, SIGNIN_COOKIE)
        self._cookie(request, response, SESSION_COOKIE, self.sessions.cookie_value(session))
        return response

    async def signout(self, request: Request) -> Response:
        viewer = await self._viewer(request)
        response = RedirectResponse("/ui/signin?signed_out=1", status_code=303)
        if viewer is not None:
            self._check_origin(request)
            self._check_csrf(viewer, await self._form(request))
            self.sessions.end(viewer.session)
            log.info("console: %s signed out", viewer.principal.user)
        self._forget(request, response, SESSION_COOKIE)
        return response

    # -- traces ----------------------------------------------------------------------------------

    async def traces(self, request: Request) -> Response:
        viewer = await self._require(request, "review")
        query = request.query_params
        filters = {name: query.get(name, "") for name in ("since", "until", *TRACE_FILTERS)}
        shown = {name: value for name, value in filters.items() if value}
        limit = int(query["limit"]) if query.get("limit", "").isdigit() and int(query["limit"]) in PAGE_SIZES else 50
        error, records, next_url, status = None, [], None, 200
        try:
            page = await trace_page(request.state.runtime.engine, viewer.principal.org,
                                    {**shown, "limit": str(limit), "before": query.get("before", "")})
            records = page.records
            if page.next_before:
                next_url = "/ui/traces?" + urlencode({**shown, "limit": limit, "before": page.next_before})
        except InvalidRequest as exc:
            error, status = exc.message, 400
        before = query.get("before") or None
        return self._render(request, "traces.html", status, section="traces", filters=filters, records=records,
                            error=error, outcomes=OUTCOMES, page_sizes=PAGE_SIZES, limit=limit, next_url=next_url,
                            before=_when(before) if before and not error else None,
                            newest_url="/ui/traces?" + urlencode({**shown, "limit": limit}))

    async def trace(self, request: Request) -> Response:
        viewer = await self._require(request, "review")
        trace_id = request.path_params["trace_id"]
        try:
            records, spans = await org_trace(request.state.runtime.engine, viewer.principal.org, trace_id)
        except TraceNotFound:
            raise Refused(404, "Trace not found", f"No trace with id '{trace_id[:64]}' was found in org "
                                                  f"{viewer.principal.org}.") from None
        decisions = []
        for record in sorted(records, key=lambda r: r["created_at"]):
            approval = None
            if record.get("approval_id"):
                try:
                    approval = await request.state.runtime.approvals.visible(record["approval_id"], viewer.principal)
                except ApprovalNotFound:
                    approval = None
            decisions.append({"record": record, "approval": approval})
        rows, total_ms = timeline(spans)
        return self._render(request, "trace.html", section="traces", trace_id=trace_id[:64], decisions=decisions,
                            spans=rows, total_ms=total_ms)

    # -- approvals -------------------------------------------------------------------------------

    async def _approvals_page(self, request: Request, viewer: Viewer, status: int = 200,
                              error: str | None = None) -> Response:
        queue = request.state.runtime.approvals
        pending = await queue.list(viewer.principal.org, "pending", 200)
        recent = [a for a in await queue.list(viewer.principal.org, None, 100, newest_first=True)
                  if a.status != "pending"][:RECENT_APPROVALS]
        return self._render(request, "approvals.html", status, section="approvals", pending=pending, recent=recent,
                            error=error, max_note=MAX_NOTE_CHARS)

    async def approvals(self, request: Request) -> Response:
        viewer = await self._require(request, "decide")
        return await self._approvals_page(request, viewer)

    async def decide(self, request: Request) -> Response:
        viewer = await self._require(request)
        self._check_origin(request)
        form = await self._form(request)
        self._check_csrf(viewer, form)
        if not viewer.can_decide:
            log.warning("console: %s, without the approver or admin role, tried to decide an approval",
                        viewer.principal.user)
            raise Refused(403, "Not for your role", "Deciding approvals needs a key with the approver or admin role. "
                                                    "Nothing was changed.")
        verdict, approval_id = request.path_params["verdict"], request.path_params["approval_id"]
        if verdict not in ("approve", "deny"):
            raise Refused(404, "Not found", "There is no such page in the console.")
        try:
            note = check_reason(form.get("reason", "").strip() or None)
            approval = await request.state.runtime.approvals.decide(approval_id, viewer.principal,
                                                                    verdict == "approve", note)
        except (InvalidRequest, ApprovalNotFound, DecisionRefused, ApprovalConflict) as exc:
            log.info("console: %s could not %s %s: %s", viewer.principal.user, verdict, approval_id[:64], exc.message)
            return await self._approvals_page(request, viewer, exc.status, error=exc.message)
        log.info("console: %s %s %s", viewer.principal.user, "approved" if verdict == "approve" else "denied",
                 approval.id)
        viewer.session.flash.append(("ok", f"{'Approved' if verdict == 'approve' else 'Denied'} {approval.id} "
                                           f"({approval.user}'s call to {approval.model})."))
        raise Redirect("/ui/approvals")

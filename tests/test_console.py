"""The web console at /ui (gateway/console/), driven as people use it: in headless Chromium
(Debian's ``chromium`` package, through Playwright), against a real gateway with the mock provider.

Sign in with a reviewer key, find a trace by user and open it; a key without a console role is
refused; an approver approves a held call (an ``openai`` SDK call waiting in a thread) with the
button, the call completes and the console shows its executed record; a POST without the CSRF
token changes nothing; the session cookie is HttpOnly and no page holds the key; sign-out ends the
session. Cheaper cases are plain httpx.

The browser tests skip when Playwright or /usr/bin/chromium is missing, unless
LG_TEST_REQUIRE_BROWSER=1 (set by .ci/run), where they fail. One gateway (SQLite) serves the
whole module. While Playwright's sync API runs, its event loop is the thread's, so nothing here
calls ``asyncio.run`` after the browser started: keys are made first, records read over HTTP.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Gateway, start_gateway, stop_gateway

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REQUIRE_BROWSER = os.environ.get("LG_TEST_REQUIRE_BROWSER") == "1"
HOLDING = {"approval_hold_s": "20", "approval_keepalive_s": "0.3", "approval_poll_interval_s": "0.1"}
TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "transfer_funds", "description": "Move money between accounts", "parameters": {
        "type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}}}]
SESSION_COOKIE = "lockgate_console"


class Desk:
    """One gateway and its people: callers ana and bob (org acme) and olga (org other), reviewers
    rita (acme) and otto (other), dan who asks for payments, carol who approves them (approver and
    reviewer, team finance), tom (approver of team research, whom the policy does not let decide
    finance's payments) and sam (no role at all)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.keys = {name: gateway.create_key(team=team, user=name, org=org, roles=roles)
                     for name, team, org, roles in (
                         ("ana", "research", "acme", ()), ("bob", "research", "acme", ()),
                         ("olga", "research", "other", ()), ("rita", "audit", "acme", ("reviewer",)),
                         ("otto", "audit", "other", ("reviewer",)), ("dan", "finance", "acme", ()),
                         ("carol", "finance", "acme", ("approver", "reviewer")),
                         ("tom", "research", "acme", ("approver",)), ("sam", "research", "acme", ()))}
        self.pool = ThreadPoolExecutor(4)

    @property
    def url(self) -> str:
        return self.gateway.base_url

    def chat(self, name: str, content: str) -> None:
        openai.OpenAI(base_url=self.gateway.v1, api_key=self.keys[name], max_retries=0).chat.completions.create(
            model="fast", messages=[{"role": "user", "content": content}])

    def pay(self, content: str, name: str = "dan") -> Future[Any]:
        """A call that needs approval (it offers transfer_funds), held in the background."""
        sdk = openai.OpenAI(base_url=self.gateway.v1, api_key=self.keys[name])
        return self.pool.submit(lambda: sdk.chat.completions.create(
            model="fast", tools=TOOLS, messages=[{"role": "user", "content": content}]))

    def api(self, method: str, path: str, name: str, **options: Any) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={"authorization": f"Bearer {self.keys[name]}"},
                             timeout=30, **options)

    def records(self, name: str, query: str, count: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """The records ``name`` (a reviewer) finds with ``query``, once there are ``count``."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = list(self.api("GET", f"/admin/traces?{query}", name).json()["data"])
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def pending(self, requester: str, timeout_s: float = 15.0) -> dict[str, Any]:
        """The pending approval of ``requester``'s call, as carol sees it through the API."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [a for a in self.api("GET", "/admin/approvals", "carol").json()["data"]
                     if a["requester"]["user"] == requester]
            if found or time.monotonic() > deadline:
                assert len(found) == 1, found
                return dict(found[0])
            time.sleep(0.05)

    def approval(self, approval_id: str) -> dict[str, Any]:
        return dict(self.api("GET", f"/admin/approvals/{approval_id}", "carol").json())


@pytest.fixture(scope="module")
def desk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desk]:
    folder = tmp_path_factory.mktemp("console")
    gateway = start_gateway(f"sqlite:///{folder}/lockgate.db", folder, **HOLDING)
    desk = Desk(gateway)
    for name, count in (("ana", 2), ("bob", 2), ("olga", 1)):
        for i in range(count):
            desk.chat(name, f"{name} {i}")
    assert len(desk.records("rita", "", 4)) == 4 and len(desk.records("otto", "", 1)) == 1
    yield desk
    desk.pool.shutdown(wait=False, cancel_futures=True)
    stop_gateway(gateway)


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def browser(desk: Desk) -> Iterator[Any]:
    """Headless Chromium (after ``desk``: its keys are made before Playwright's loop starts)."""
    missing = _browser_missing()
    if missing:
        if REQUIRE_BROWSER:
            pytest.fail(f"the console's browser tests are required (LG_TEST_REQUIRE_BROWSER=1): {missing}")
        pytest.skip(f"no browser for the console tests: {missing}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A page in a fresh browser context (its own cookies)."""
    context = browser.new_context()
    context.set_default_timeout(15_000)
    yield context.new_page()
    context.close()


def sign_in(page: Any, desk: Desk, name: str) -> None:
    page.goto(desk.url + "/ui")
    assert page.url.startswith(desk.url + "/ui/signin")
    page.fill("#key", desk.keys[name])
    page.click("#signin")


def reload_until(page: Any, ready: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, page.content()
        time.sleep(0.1)
        page.reload()


def form_field(html: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert found, html
    return found.group(1)


@contextmanager
def signed_in(desk: Desk, name: str) -> Iterator[httpx.Client]:
    """An httpx client holding a console session of ``name``'s."""
    with httpx.Client(base_url=desk.url, timeout=30) as client:
        token = form_field(client.get("/ui/signin").text, "csrf")
        reply = client.post("/ui/signin", data={"csrf": token, "key": desk.keys[name], "next": "/ui"})
        assert reply.status_code == 303, reply.text
        yield client


# --- in the browser ------------------------------------------------------------------------------

def test_a_reviewer_signs_in_finds_a_trace_by_user_and_opens_it(desk: Desk, page: Any) -> None:
    sign_in(page, desk, "rita")
    assert page.url == desk.url + "/ui/traces"
    assert page.inner_text("header .user") == "rita" and "Time (UTC)" in page.inner_text("table.records")

    page.fill("#filter-user", "bob")
    page.click("#search")
    assert "user=bob" in page.url
    users = page.locator("table.records tbody td.user").all_inner_texts()
    assert users == ["bob", "bob"]

    page.locator("a.trace-link").first.click()
    assert re.search(r"/ui/traces/[0-9a-f]{32}$", page.url)
    decision = page.inner_text("section.decision")
    assert "allowed" in decision and "bob · team research · org acme" in decision
    assert "team research may use mock-fast" in page.inner_text("ul.reasons")
    assert page.inner_text("td.cost").startswith("$0.0000")
    spans = page.locator("table.timeline tr.span")
    assert spans.count() >= 3 and page.locator("table.timeline .span-bar").count() == spans.count()
    names = page.locator("table.timeline td.name summary").all_inner_texts()
    assert {"chat fast", "policy.decide", "chat mock-fast"} <= set(names)
    # The server span spans the whole trace; its children sit inside it, indented.
    assert "w-100" in (page.locator("table.timeline .span-bar").first.get_attribute("class") or "")
    assert "depth-1" in (page.locator("table.timeline td.name").nth(1).get_attribute("class") or "")


def test_the_session_cookie_is_httponly_no_page_holds_the_key_and_sign_out_ends_it(desk: Desk, page: Any) -> None:
    sign_in(page, desk, "rita")
    key = desk.keys["rita"]
    pages = [page.content()]
    page.locator("a.trace-link").first.click()
    pages.append(page.content())
    assert not any(key in html for html in pages)
    [cookie] = [c for c in page.context.cookies() if c["name"] == SESSION_COOKIE]
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"], cookie["secure"]) == (True, "Strict", "/ui", False)
    assert all(key not in c["value"] for c in page.context.cookies())
    assert page.evaluate("document.cookie") == ""  # nothing the page's scripts could read (there are none)

    page.click("#signout")
    assert page.url.endswith("/ui/signin?signed_out=1") and "You are signed out" in page.content()
    assert not [c for c in page.context.cookies() if c["name"] == SESSION_COOKIE]
    page.goto(desk.url + "/ui/traces")
    assert page.url.startswith(desk.url + "/ui/signin")
    # The session is over in the server too: its old cookie no longer opens anything.
    replay = httpx.get(desk.url + "/ui/traces", cookies={SESSION_COOKIE: cookie["value"]})
    assert (replay.status_code, replay.headers["location"]) == (303, "/ui/signin?next=%2Fui%2Ftraces")


def test_a_key_without_a_console_role_is_refused_with_a_message(desk: Desk, page: Any) -> None:
    sign_in(page, desk, "sam")
    assert "/ui/signin" in page.url
    assert "sam (team research), who has none of the roles reviewer, approver or admin" in page.inner_text(
        "#signin-error")
    assert page.input_value("#key") == "" and desk.keys["sam"] not in page.content()
    page.fill("#key", "lg-not-a-key")
    page.click("#signin")
    assert page.inner_text("#signin-error") == "Unknown or revoked API key."
    assert not [c for c in page.context.cookies() if c["name"] == SESSION_COOKIE]


def test_an_approver_approves_a_held_call_and_sees_its_executed_record(desk: Desk, page: Any) -> None:
    waiting = desk.pay("pay acme 100 EUR, console")
    approval = desk.pending("dan")
    sign_in(page, desk, "carol")
    page.click("nav >> text=Approvals")
    assert page.url == desk.url + "/ui/approvals"
    row = page.locator(f"tr#{approval['id']}")
    assert "dan · team finance" in row.inner_text() and "transfer_funds" in row.inner_text()
    assert not waiting.done()

    row.locator("input[name=reason]").fill("invoice 42 checked")
    row.locator("button.approve").click()
    assert f"Approved {approval['id']}" in page.inner_text(".flash.ok")
    reply = waiting.result(timeout=30)
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["transfer_funds"]

    recent = page.locator(f"tr#recent-{approval['id']}")
    reload_until(page, lambda: recent.count() == 1 and recent.locator(".status").inner_text() == "executed")
    assert "carol" in recent.inner_text() and "invoice 42 checked" in recent.inner_text()
    recent.locator("a.trace-link").click()
    assert page.url == f"{desk.url}/ui/traces/{approval['trace_id']}"
    decision = page.inner_text("section.decision")
    assert "allowed" in decision and "dan · team finance" in decision
    cell = page.inner_text("td.approval")
    assert approval["id"] in cell and "approved by carol" in cell and "executed" in cell
    names = set(page.locator("table.timeline td.name summary").all_inner_texts())
    assert {"lockgate.approval.requested", "lockgate.approval.approved", "lockgate.approval.executing"} <= names
    assert desk.approval(approval["id"])["decision_note"] == "invoice 42 checked"


def test_an_approver_the_policy_does_not_allow_sees_why_and_nothing_changes(desk: Desk, page: Any) -> None:
    waiting = desk.pay("pay acme 7 EUR, console")
    approval = desk.pending("dan")
    sign_in(page, desk, "tom")  # an approver, but not of team finance; not a reviewer either
    assert page.url == desk.url + "/ui/approvals" and page.locator("nav >> text=Traces").count() == 0
    page.locator(f"tr#{approval['id']} button.approve").click()
    error = page.inner_text("#decide-error")
    assert f"The policy does not let tom (team research) decide approval {approval['id']}" in error
    assert desk.approval(approval["id"])["status"] == "pending"
    page.goto(desk.url + "/ui/traces")
    assert "needs a key with the reviewer or admin role" in page.inner_text("main")

    assert desk.api("POST", f"/admin/approvals/{approval['id']}/deny", "carol").status_code == 200
    with pytest.raises(openai.PermissionDeniedError):
        waiting.result(timeout=30)


def test_a_post_without_the_csrf_token_changes_nothing(desk: Desk, page: Any) -> None:
    waiting = desk.pay("pay acme 3 EUR, console")
    approval = desk.pending("dan")
    sign_in(page, desk, "carol")
    [cookie] = [c for c in page.context.cookies() if c["name"] == SESSION_COOKIE]
    session = {SESSION_COOKIE: cookie["value"]}
    url = f"{desk.url}/ui/approvals/{approval['id']}/approve"

    for form in ({"reason": "no token"}, {"reason": "wrong token", "csrf": "x" * 43}):
        refused = httpx.post(url, data=form, cookies=session)
        assert refused.status_code == 403 and "security token is missing or wrong" in refused.text
        assert desk.approval(approval["id"])["status"] == "pending"
    assert httpx.post(desk.url + "/ui/signout", cookies=session).status_code == 403
    assert httpx.get(desk.url + "/ui/approvals", cookies=session).status_code == 200  # still signed in

    page.goto(desk.url + "/ui/approvals")
    page.locator(f"tr#{approval['id']} button.deny").click()
    assert f"Denied {approval['id']}" in page.inner_text(".flash.ok")
    with pytest.raises(openai.PermissionDeniedError):
        waiting.result(timeout=30)


# --- plain HTTP ----------------------------------------------------------------------------------

def test_without_a_session_pages_send_to_sign_in_with_the_security_headers(desk: Desk) -> None:
    for path in ("/ui", "/ui/traces?user=ana", "/ui/approvals"):
        reply = httpx.get(desk.url + path)
        assert reply.status_code == 303 and reply.headers["location"].startswith("/ui/signin")
    refused = httpx.post(desk.url + "/ui/approvals/apr_x/approve", data={"csrf": "x"})
    assert refused.status_code == 403 and "session has ended" in refused.text

    signin = httpx.get(desk.url + "/ui/signin")
    assert signin.status_code == 200 and signin.headers["content-type"].startswith("text/html")
    headers = signin.headers
    assert "default-src 'self'" in headers["content-security-policy"]
    assert "script-src 'none'" in headers["content-security-policy"]
    assert (headers["x-frame-options"], headers["referrer-policy"], headers["cache-control"]) == (
        "DENY", "no-referrer", "no-store")
    assert "<script" not in signin.text and " style=" not in signin.text
    stylesheet = httpx.get(desk.url + "/ui/console.css")  # the one stylesheet, served without a session
    assert stylesheet.status_code == 200 and stylesheet.headers["content-type"].startswith("text/css")
    assert ".at-0" in stylesheet.text and stylesheet.headers["x-content-type-options"] == "nosniff"
    missing = httpx.get(desk.url + "/ui/no/such/page")
    assert missing.status_code == 404 and "There is no such page" in missing.text
    wrong = httpx.delete(desk.url + "/ui/traces")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, HEAD" and "<h1>" in wrong.text


def test_the_sign_in_form_is_csrf_protected(desk: Desk) -> None:
    key = desk.keys["rita"]
    bare = httpx.post(desk.url + "/ui/signin", data={"key": key})
    assert bare.status_code == 403 and SESSION_COOKIE not in bare.cookies
    with httpx.Client(base_url=desk.url) as client:
        token = form_field(client.get("/ui/signin").text, "csrf")
        assert client.post("/ui/signin", data={"key": key, "csrf": "0" * 64}).status_code == 403
        forged = client.post("/ui/signin", data={"key": key, "csrf": token},
                             headers={"origin": "https://elsewhere.example"})
        assert forged.status_code == 403 and SESSION_COOKIE not in client.cookies
        cross = client.post("/ui/signin", data={"key": key, "csrf": token}, headers={"sec-fetch-site": "cross-site"})
        assert cross.status_code == 403
        done = client.post("/ui/signin", data={"key": key, "csrf": token, "next": "https://elsewhere.example/"})
        assert (done.status_code, done.headers["location"]) == (303, "/ui")  # never sent off-site
        cookie = done.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
        assert "Secure" not in cookie and key not in cookie


def test_another_orgs_trace_is_a_404_and_filters_stay_in_the_org(desk: Desk) -> None:
    [olga] = desk.records("otto", "user=olga", 1)
    [ana, _] = desk.records("rita", "user=ana", 2)
    with signed_in(desk, "rita") as rita:
        assert rita.get(f"/ui/traces/{ana['trace_id']}").status_code == 200
        other = rita.get(f"/ui/traces/{olga['trace_id']}")
        assert other.status_code == 404 and "Trace not found" in other.text and "olga" not in other.text
        listed = rita.get("/ui/traces?user=olga")
        assert listed.status_code == 200 and "No records match these filters." in listed.text
        assert rita.get("/ui/traces?since=yesterday").status_code == 400
        paged = rita.get("/ui/traces?limit=25&user=ana")
        assert paged.text.count('class="mono trace-link"') == 2
        assert rita.get("/ui/approvals").status_code == 403  # a reviewer is no approver


def test_a_reviewer_cannot_decide_even_with_her_token(desk: Desk) -> None:
    waiting = desk.pay("pay acme 5 EUR, console")
    approval = desk.pending("dan")
    with signed_in(desk, "rita") as rita:
        token = form_field(rita.get("/ui/traces").text, "csrf")
        refused = rita.post(f"/ui/approvals/{approval['id']}/approve", data={"csrf": token})
        assert refused.status_code == 403 and "approver or admin role" in refused.text
    assert desk.approval(approval["id"])["status"] == "pending"
    with signed_in(desk, "carol") as carol:
        token = form_field(carol.get("/ui/approvals").text, "csrf")
        long_reason = carol.post(f"/ui/approvals/{approval['id']}/deny", data={"csrf": token, "reason": "x" * 3000})
        assert long_reason.status_code == 400 and "at most 2000 characters" in long_reason.text
        denied = carol.post(f"/ui/approvals/{approval['id']}/deny", data={"csrf": token, "reason": "no invoice"})
        assert denied.status_code == 303
        again = carol.post(f"/ui/approvals/{approval['id']}/approve", data={"csrf": token})
        assert again.status_code == 409 and "only a pending approval can be decided" in again.text
    with pytest.raises(openai.PermissionDeniedError, match="no invoice"):
        waiting.result(timeout=30)


def test_a_revoked_key_ends_its_console_session(desk: Desk) -> None:
    created = desk.gateway.cli("keys", "create", "--user", "rose", "--team", "audit", "--org", "acme",
                               "--role", "reviewer")
    key_id = re.search(r"Created key (k_\w+)", created.stderr).group(1)  # type: ignore[union-attr]
    desk.keys["rose"] = created.stdout.strip()
    with signed_in(desk, "rose") as rose:
        assert rose.get("/ui/traces").status_code == 200
        assert desk.gateway.cli("keys", "revoke", key_id).returncode == 0
        after = rose.get("/ui/traces")
        assert after.status_code == 303 and after.headers["location"].startswith("/ui/signin")


def test_sessions_end_when_idle_too_long_or_too_old_and_cookies_are_signed() -> None:
    from gateway.console.sessions import SESSION_IDLE_S, SESSION_MAX_S, SessionStore

    now = [0.0]
    store = SessionStore(clock=lambda: now[0])
    session = store.create("k_1", "rita")
    cookie = store.cookie_value(session)
    assert store.find(cookie) is session and "k_1" not in cookie
    forged = cookie[:-1] + ("1" if cookie[-1] == "0" else "0")
    assert store.find(session.id) is None and store.find(forged) is None  # unsigned, or forged
    assert SessionStore().find(cookie) is None  # another process's secret
    now[0] += SESSION_IDLE_S - 1
    assert store.find(cookie) is session  # used: the idle clock starts again
    now[0] += SESSION_IDLE_S + 1
    assert store.find(cookie) is None and len(store) == 0

    session = store.create("k_1", "rita")
    cookie = store.cookie_value(session)
    while now[0] < session.created + SESSION_MAX_S:
        assert store.find(cookie) is session
        now[0] += SESSION_IDLE_S / 2
    now[0] = session.created + SESSION_MAX_S + 1
    assert store.find(cookie) is None
    assert store.csrf_ok(session, session.csrf) and not store.csrf_ok(session, None)
    assert not store.csrf_ok(session, session.csrf[:-1] + "é")

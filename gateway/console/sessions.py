"""The web console's sessions and CSRF tokens, kept in this process's memory.

- A session is created when a reviewer, approver or admin signs in with her API key. The browser
  gets only the session's id, signed (``<id>.<HMAC-SHA256 of the id>``) under a secret drawn at
  random when the process starts; the key itself is never kept, neither here nor in the browser.
  The session remembers the key's id, and every page reads that key again from the store, so a
  revoked key ends its sessions at the next click.
- A session ends on sign-out, after SESSION_IDLE_S without a request, or SESSION_MAX_S after
  sign-in, whichever comes first. At most MAX_SESSIONS live at once (the least recently used
  goes first).
- Sessions are per process: a restart signs everyone out, and behind a load balancer with several
  gateway processes the console needs sticky sessions (or one process serving /ui).
- CSRF: every session has its own random token, put in a hidden field of each of its forms and
  compared with ``hmac.compare_digest``. The sign-in form, before any session exists, uses a
  signed double-submit token: a random pre-session cookie, and in the form the HMAC of it under
  the process's secret (a cookie planted by someone else cannot be paired with a token without
  that secret); a cross-site ``Origin`` is refused as well.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

SESSION_IDLE_S = 8 * 3600  # a session unused this long is over
SESSION_MAX_S = 24 * 3600  # and any session is over this long after its sign-in
MAX_SESSIONS = 10_000
SESSION_COOKIE = "lockgate_console"
SIGNIN_COOKIE = "lockgate_console_signin"  # the pre-session half of the sign-in form's CSRF token
CONSOLE_ROLES = ("reviewer", "approver", "admin")


@dataclass
class Session:
    id: str
    key_id: str
    user: str
    csrf: str
    created: float
    seen: float
    flash: list[tuple[str, str]] = field(default_factory=list)  # (kind, text), shown once by the next page


class SessionStore:
    def __init__(self, secret: bytes | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._secret = secret or secrets.token_bytes(32)
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    # -- signing ---------------------------------------------------------------------------------

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self._secret, f"{purpose}\n{value}".encode(), hashlib.sha256).hexdigest()

    def cookie_value(self, session: Session) -> str:
        return f"{session.id}.{self._mac('session', session.id)}"

    def signin_token(self, presession: str) -> str:
        """The sign-in form's token for this pre-session cookie."""
        return self._mac("signin", presession)

    def signin_token_ok(self, presession: str | None, token: str | None) -> bool:
        if not presession or not token:
            return False
        return hmac.compare_digest(self.signin_token(presession).encode(), token.encode())

    # -- sessions --------------------------------------------------------------------------------

    def create(self, key_id: str, user: str) -> Session:
        now = self._clock()
        self._prune(now)
        session = Session(id=secrets.token_urlsafe(32), key_id=key_id, user=user, csrf=secrets.token_urlsafe(32),
                          created=now, seen=now)
        self._sessions[session.id] = session
        return session

    def find(self, cookie: str | None) -> Session | None:
        """The live session a cookie names (its signature checked), touched; None otherwise."""
        if not cookie or "." not in cookie:
            return None
        session_id, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(self._mac("session", session_id).encode(), mac.encode()):
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        if now - session.seen > SESSION_IDLE_S or now - session.created > SESSION_MAX_S:
            self.end(session)
            return None
        session.seen = now
        return session

    def end(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def __len__(self) -> int:
        return len(self._sessions)

    def _prune(self, now: float) -> None:
        for session in [s for s in self._sessions.values()
                        if now - s.seen > SESSION_IDLE_S or now - s.created > SESSION_MAX_S]:
            self.end(session)
        while len(self._sessions) >= MAX_SESSIONS:
            self.end(min(self._sessions.values(), key=lambda s: s.seen))

    @staticmethod
    def csrf_ok(session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(session.csrf.encode(), (token or "").encode())

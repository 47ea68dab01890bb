"""The approval webhook: a JSON POST when a call starts waiting for approval (docs/approvals.md).

The body carries a Slack-compatible ``text`` and the approval as the admin API shows it (no
request content, no key). ``Lockgate-Signature: t=<unix seconds>,v1=<hex>`` is the HMAC-SHA256,
under the secret of ``approval_webhook_secret_env``, of ``<t>.<body>``: a receiver recomputes it
and refuses old timestamps. Delivery runs in the background with retries and backoff, so a slow
or failing receiver never slows or fails the call.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from typing import Any

import httpx
import orjson

from gateway.store import Approval

log = logging.getLogger("lockgate.webhook")

ATTEMPTS = 5
FIRST_BACKOFF_S = 0.5
TIMEOUT_S = 5.0
SIGNATURE_HEADER = "lockgate-signature"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def message(approval: Approval) -> dict[str, Any]:
    from gateway.approvals import public

    who = ", ".join(approval.approvers) or "an approver"
    text = (f"Lockgate: {approval.user} (team {approval.team}) waits for approval {approval.id} of a "
            f"{approval.endpoint} call to {approval.model}: {approval.reason}. Approvers: {who}. "
            f"Decide with `lockgate approvals approve {approval.id}` or `deny`.")
    return {"text": text, "approval": public(approval)}


class Webhook:
    def __init__(self, url: str, secret: str) -> None:
        self._url = url
        self._secret = secret
        self._http = httpx.AsyncClient()
        self._tasks: set[asyncio.Task[None]] = set()

    def announce(self, approval: Approval) -> None:
        """Deliver in the background; the caller never waits."""
        task = asyncio.create_task(self._deliver(orjson.dumps(message(approval)), approval.id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, body: bytes, approval_id: str) -> None:
        for attempt in range(ATTEMPTS):
            timestamp = int(time.time())
            headers = {"content-type": "application/json"}
            if self._secret:
                headers[SIGNATURE_HEADER] = sign(self._secret, timestamp, body)
            try:
                response = await self._http.post(self._url, content=body, headers=headers, timeout=TIMEOUT_S)
                if response.status_code < 300:
                    return
                problem = f"status {response.status_code}"
            except httpx.HTTPError as exc:
                problem = type(exc).__name__
            log.warning("approval webhook for %s failed (%s), attempt %d of %d", approval_id, problem, attempt + 1,
                        ATTEMPTS)
            if attempt + 1 < ATTEMPTS:
                await asyncio.sleep(FIRST_BACKOFF_S * 2**attempt)

    async def close(self) -> None:
        """Let deliveries under way finish their current attempt, briefly."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
            for task in self._tasks:
                task.cancel()
        await self._http.aclose()

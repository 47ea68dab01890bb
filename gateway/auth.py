"""Stage 1, authenticate: a virtual API key becomes a Principal.

Keys are 256-bit random strings, so a single SHA-256 is the right hash: a slow password hash
guards low-entropy secrets and would only add latency here. Only the hash is stored. Verified
keys are cached in memory for ``auth_cache_ttl_s`` so the hot path rarely touches the store.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.errors import AuthenticationFailed, StoreUnavailable
from gateway.store import ApiKey, utcnow
from gateway.types import Principal

KEY_PREFIX = "lg-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_token(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key from ``Authorization: Bearer`` (OpenAI SDKs) or ``x-api-key`` (Anthropic SDKs)."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return x_api_key or None


@dataclass(frozen=True)
class IssuedKey:
    key: str
    record: ApiKey


class KeyStore:
    def __init__(self, engine: AsyncEngine, cache_ttl_s: float) -> None:
        self._engine = engine
        self._ttl = cache_ttl_s
        self._cache: dict[str, tuple[Principal, float]] = {}

    async def authenticate(self, key: str | None) -> Principal:
        if not key:
            raise AuthenticationFailed("Missing API key: send it as 'Authorization: Bearer <key>'.")
        key_hash = hash_key(key)
        cached = self._cache.get(key_hash)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            async with self._engine.connect() as connection:
                row = (await connection.execute(
                    select(ApiKey).where(ApiKey.key_hash == key_hash)  # type: ignore[arg-type]
                )).first()
        except SQLAlchemyError as exc:
            raise StoreUnavailable() from exc
        if row is None or row.revoked_at is not None:
            self._cache.pop(key_hash, None)
            raise AuthenticationFailed("Unknown or revoked API key.")
        principal = Principal(
            key_id=row.id, user=row.user, team=row.team, org=row.org,
            roles=tuple(row.roles or ()), labels=dict(row.labels or {}),
        )
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[key_hash] = (principal, now + self._ttl)
        return principal

    async def current(self, key_id: str) -> Principal | None:
        """The principal of the key ``key_id`` as the store has it now, bypassing the cache (None:
        unknown or revoked). The web console asks on every page, so a revoked key ends its sessions."""
        try:
            async with self._engine.connect() as connection:
                row = (await connection.execute(
                    select(ApiKey).where(ApiKey.id == key_id)  # type: ignore[arg-type]
                )).first()
        except SQLAlchemyError as exc:
            raise StoreUnavailable() from exc
        if row is None or row.revoked_at is not None:
            return None
        return Principal(key_id=row.id, user=row.user, team=row.team, org=row.org,
                         roles=tuple(row.roles or ()), labels=dict(row.labels or {}))

    async def create(self, *, user: str, team: str, org: str = "default",
                     roles: tuple[str, ...] = (), labels: dict[str, str] | None = None) -> IssuedKey:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        record = ApiKey(
            id="k_" + secrets.token_hex(6), key_hash=hash_key(key), prefix=key[:10],
            user=user, team=team, org=org, roles=list(roles), labels=labels or {},
            created_at=utcnow(),
        )
        async with self._engine.begin() as connection:
            await connection.execute(ApiKey.__table__.insert().values(**record.model_dump()))  # type: ignore[attr-defined]
        return IssuedKey(key=key, record=record)

    async def list(self) -> list[ApiKey]:
        async with self._engine.connect() as connection:
            rows = (await connection.execute(select(ApiKey).order_by(ApiKey.created_at))).all()  # type: ignore[arg-type]
        return [ApiKey.model_validate(row._mapping) for row in rows]

    async def revoke(self, key_id: str) -> bool:
        async with self._engine.begin() as connection:
            result = await connection.execute(
                update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))  # type: ignore[union-attr, arg-type]
                .values(revoked_at=utcnow())
            )
        return bool(result.rowcount)  # type: ignore[attr-defined]

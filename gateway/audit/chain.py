"""The hash chain over decision records: every record names the hash of the one before it.

``record_hash(prev, row)`` is SHA-256 over the previous record's hash and the canonical JSON of
the record (every column but the chain's own, keys sorted, datetimes as UTC ISO 8601 to the
microsecond). The audit writer chains each batch inside its transaction, after taking the chain's
lock (PostgreSQL: an advisory lock; SQLite has one writer), so processes appending at once still
make one chain (gateway/store.py, ``DirectStatements.write_batch``). ``verify`` walks the chain
and names the first record that does not fit; signed checkpoints (HMAC under a key kept outside
the database) let it see a tail cut off after the last checkpoint. See docs/audit.md.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

CHAIN_FIELDS = ("seq", "prev_hash", "record_hash")
GENESIS = "0" * 64  # the "previous hash" of the first record
CHAIN_LOCK = 0x4C4F434B  # PostgreSQL advisory lock key of the chain ("LOCK")


def _normal(value: Any) -> Any:
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return value


def canonical(row: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash covers: every column but the chain's hash fields (its ``seq`` is
    covered, so a record cannot move), sorted, datetimes normalized. Empty (NULL) columns are left
    out, so a column added in a later version leaves the hashes of older records as they were."""
    body = {name: _normal(value) for name, value in row.items()
            if value is not None and name not in ("prev_hash", "record_hash")}
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str)


def record_hash(prev: str, row: Mapping[str, Any]) -> str:
    return hashlib.sha256(prev.encode() + b"\n" + canonical(row)).hexdigest()


def checkpoint_mac(key: str, seq: int, digest: str, kind: str) -> str:
    """The signature of a checkpoint: that the chain reached ``seq`` with ``digest``."""
    return hmac.new(key.encode(), f"{kind}:{seq}:{digest}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Broken:
    seq: int | None
    record_id: str | None
    why: str


def walk(rows: Sequence[Mapping[str, Any]], start_seq: int, start_hash: str) -> Broken | None:
    """Check chained records in ``seq`` order from (``start_seq``, ``start_hash``): the first that
    does not fit, or None."""
    expected_seq, prev = start_seq + 1, start_hash
    for row in rows:
        if row["seq"] != expected_seq:
            return Broken(row["seq"], row["id"], f"expected record {expected_seq} here: records are missing")
        if row["prev_hash"] != prev:
            return Broken(row["seq"], row["id"], "its previous hash is not the hash of the record before it")
        if record_hash(prev, row) != row["record_hash"]:
            return Broken(row["seq"], row["id"], "its content does not match its hash: it was changed")
        expected_seq, prev = expected_seq + 1, row["record_hash"]
    return None

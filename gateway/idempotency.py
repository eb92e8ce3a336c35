"""Idempotency keys of credit changes (grants, packs, adjustments): what a key may be, how long it is
remembered, and the fingerprint of what was asked that a retry with the same key must match."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from gateway.errors import BadRequest

IDEMPOTENCY_TTL_MS = 24 * 3_600_000  # how long a credit's Idempotency-Key is remembered


def check_idempotency_key(value: str | None) -> str:
    """An `Idempotency-Key` as given ('' for none): 1 to 255 printable ASCII characters."""
    if value is None:
        return ""
    if not 1 <= len(value) <= 255 or not all(" " <= ch <= "~" for ch in value):
        raise BadRequest("'Idempotency-Key' must be 1 to 255 printable ASCII characters.", param="idempotency_key")
    return value


def request_fingerprint(asked: dict[str, Any]) -> str:
    """What an idempotent credit change asked for, as its key's script compares it on a retry."""
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()

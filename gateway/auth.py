"""Client key authentication: SHA-256 lookup in Redis, cached briefly per process.

The cache maps a key's hash to (account, key id, plan). It cannot make a revoked or expired key
usable: every metered request's reserve script re-checks the key record, and the other key-holder
endpoints check it live. A plan change is caught by the reserve script too (PLAN_CHANGED).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Any

from gateway.config import key_limits
from gateway.errors import Forbidden, Unauthorized
from gateway.keys import KeySchema
from gateway.limits import Limit
from gateway.store import hash_key, redis_guard

MAX_KEY_LENGTH = 256
_CACHE_SIZE = 100_000


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's hash (the cache key), account, key id and the plan last seen."""

    key_hash: str
    account_id: str
    key_id: str
    plan: str
    anchor_ms: int = 0  # the subscription start the billing cycle is anchored to
    timezone: str = ""  # the account's own cycle timezone ("" : the plan's)
    key_limits: tuple[Limit, ...] = ()  # the key's own rate limits
    scopes: tuple[str, ...] = ()  # what the key may call (empty: everything its plan allows)

    def check_scope(self, api: str, model: str) -> None:
        """Refuse a call outside the key's scopes: `api:<openai|anthropic|gemini|http>` and
        `model:<glob>` scopes each narrow what the key may call; none of a kind means no limit."""
        apis = [s[4:] for s in self.scopes if s.startswith("api:")]
        if apis and api not in apis:
            raise Forbidden(f"This API key's scopes do not include the {api} API.")
        models = [s[6:] for s in self.scopes if s.startswith("model:")]
        if models and not any(fnmatchcase(model, glob) for glob in models):
            raise Forbidden(f"This API key's scopes do not include the model '{model}'.", param="model")


SCOPE_APIS = ("openai", "anthropic", "gemini", "http")


def check_scopes(scopes: Any) -> tuple[str, ...]:
    """Validate the scopes an operator gives a key (ValueError names the bad one)."""
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise ValueError("'scopes' must be a list of strings")
    for scope in scopes:
        kind, _, value = scope.partition(":")
        if (kind == "api" and value in SCOPE_APIS) or (kind == "model" and value and "," not in value):
            continue
        raise ValueError(f"unknown scope {scope!r}: use api:<{'|'.join(SCOPE_APIS)}> or model:<name or glob>")
    return tuple(scopes)


def check_key_shape(raw: str | None) -> str:
    """Refuse a missing, empty, oversized or non-ASCII key before touching Redis."""
    if raw is None:
        raise Unauthorized("You didn't provide an API key. Send it as a Bearer token in the Authorization header.")
    raw = raw.strip()
    if not raw:
        raise Unauthorized("The API key is empty.")
    if len(raw) > MAX_KEY_LENGTH or not raw.isascii() or not raw.isprintable():
        raise Unauthorized("Malformed API key.")
    return raw


class Authenticator:
    def __init__(self, redis: Any, schema: KeySchema, ttl_seconds: float) -> None:
        self._redis = redis
        self._schema = schema
        self._ttl = ttl_seconds
        self._cache: OrderedDict[str, tuple[float, Principal]] = OrderedDict()

    async def authenticate(self, raw: str | None) -> Principal:
        digest = hash_key(check_key_shape(raw))
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        async with redis_guard():
            mapping = await self._redis.get(self._schema.key_hash(digest))
            if not mapping:
                self._cache.pop(digest, None)
                raise Unauthorized("Incorrect API key provided.")
            account_id, _, key_id = mapping.partition(":")
            keys = self._schema.for_account(account_id)
            pipe = self._redis.pipeline(transaction=False)
            pipe.hmget(keys.account, ["plan", "anchor_ms", "timezone", "created_ms"])
            pipe.hmget(keys.api_key(key_id), ["limits", "scopes"])
            (plan, anchor, zone, created), (limits, scopes) = await pipe.execute()
        if plan is None:
            raise Unauthorized("The account for this API key no longer exists.")
        principal = Principal(digest, account_id, key_id, plan, int(anchor or created or 0), zone or "",
                              key_limits(json.loads(limits)) if limits else (),
                              tuple(s for s in (scopes or "").split(",") if s))
        self._remember(principal)
        return principal

    def _remember(self, principal: Principal) -> None:
        self._cache[principal.key_hash] = (time.monotonic() + self._ttl, principal)
        self._cache.move_to_end(principal.key_hash)
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)

    def with_plan(self, principal: Principal, plan: str) -> Principal:
        """Record a plan change the reserve script reported."""
        updated = replace(principal, plan=plan)
        self._remember(updated)
        return updated

    def forget(self, principal: Principal) -> None:
        self._cache.pop(principal.key_hash, None)

    async def live_account(self, principal: Principal) -> dict[str, str]:
        """Re-check the key record and return the account hash (one round trip)."""
        keys = self._schema.for_account(principal.account_id)
        async with redis_guard():
            pipe = self._redis.pipeline(transaction=False)
            pipe.hmget(keys.api_key(principal.key_id), ["status", "expires_ms"])
            pipe.hgetall(keys.account)
            (status, expires), account = await pipe.execute()
        if status != "active":
            self.forget(principal)
            raise Unauthorized("This API key has been revoked.")
        if int(expires or 0) and int(expires) <= time.time() * 1000:
            self.forget(principal)
            raise Unauthorized("This API key has expired.")
        if not account:
            self.forget(principal)
            raise Unauthorized("The account for this API key no longer exists.")
        if account.get("status") != "active":
            raise Forbidden("This account is disabled.")
        return dict(account)

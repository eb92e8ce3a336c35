"""Client key authentication: SHA-256 lookup in Redis, cached briefly per process.

The cache maps a key's hash to (account, key id, plan). It cannot make a revoked or expired key
usable: every metered request's reserve script re-checks the key record, and the other key-holder
endpoints check it live. A plan change is caught by the reserve script too (PLAN_CHANGED).

Two guards keep unauthenticated callers from making the gateway work, both in process memory (each
process on its own; nothing money-related depends on them): a key that failed to authenticate is
remembered as invalid for a few seconds (a bounded LRU), and a client address with too many failed
authentications in a minute gets 429 for a while on every key it has not already authenticated.
`precheck` refuses, before a large body is parsed, a request whose account cannot pay even its
prompt at the cheapest rate the gateway has.
"""

from __future__ import annotations

import ipaddress
import json
import math
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Any

from gateway.config import Config, Rates, key_limits
from gateway.errors import AccountInactive, Forbidden, InsufficientCredits, RateLimited, Unauthorized
from gateway.keys import KeySchema
from gateway.limits import Limit
from gateway.money import MICRO, ceil_div, format_credits
from gateway.store import hash_key, redis_guard

MAX_KEY_LENGTH = 256
_CACHE_SIZE = 100_000
NEGATIVE_TTL_SECONDS = 5.0  # how long a key that failed is answered 401 without asking Redis
NEGATIVE_CACHE_SIZE = 10_000
FAILED_AUTH_LIMIT = 20  # failed authentications per client address ...
FAILED_AUTH_WINDOW_SECONDS = 60.0  # ... within this window ...
FAILED_AUTH_BLOCK_SECONDS = 60.0  # ... refuse its unknown keys with 429 this long
TRACKED_ADDRESSES = 10_000
PRECHECK_MIN_BYTES = 32 * 1024  # smaller bodies parse in well under a millisecond: no extra round trip
_CLOCK_MARGIN_MS = 300_000  # near a cycle end or a subscription's end the reserve script may credit more


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


def client_address(remote: str | None) -> str | None:
    """The unit the failed-authentication throttle counts: an IPv4 address, or an IPv6 /64 (one
    host usually holds a whole /64)."""
    if not remote:
        return None
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network((address, 64), strict=False))
    return str(address)


class FailedAuthThrottle:
    """Failed authentications per client address in fixed windows; an address over the limit is
    blocked for a while. Bounded: the least recently failing addresses are forgotten first."""

    def __init__(self, limit: int = FAILED_AUTH_LIMIT, window: float = FAILED_AUTH_WINDOW_SECONDS,
                 block: float = FAILED_AUTH_BLOCK_SECONDS, size: int = TRACKED_ADDRESSES) -> None:
        self.limit, self.window, self.block, self.size = limit, window, block, size
        self._strikes: OrderedDict[str, tuple[float, int, float]] = OrderedDict()  # window start, count, until

    def blocked_for(self, address: str | None, now: float) -> float:
        """Seconds the address stays blocked (0: not blocked)."""
        entry = self._strikes.get(address) if address else None
        return max(entry[2] - now, 0.0) if entry else 0.0

    def failed(self, address: str | None, now: float) -> None:
        if not address:
            return
        start, count, until = self._strikes.pop(address, (now, 0, 0.0))
        if now - start >= self.window:
            start, count = now, 0
        count += 1
        if count >= self.limit and until <= now:
            until = now + self.block
        self._strikes[address] = (start, count, until)
        while len(self._strikes) > self.size:
            self._strikes.popitem(last=False)


def _sheets(rates: Rates) -> Iterator[Rates]:
    """Every price sheet a hold can be priced with: the base, prompt-size tiers, service tiers."""
    yield rates
    for _threshold, sheet in rates.above:
        yield from _sheets(sheet)
    for _tier, _ppm, sheet in rates.service_tiers:
        yield from _sheets(sheet)


def prompt_rate_floor(config: Config, plan: str, dialect: str) -> int:
    """The lowest rate (micro-credits per 1M tokens) any request of `dialect` under `plan` holds its
    prompt at: the hold prices the prompt bound (at least the body's bytes) at the dearest input kind
    of its sheet, so no request of n bytes is held less than n tokens at this rate. 0 when some route
    is free, or the plan is unknown (the reserve script decides then)."""
    if plan not in config.plans:
        return 0
    allows = config.plans[plan].allows
    rates = [max(s.input, s.cached_input, s.cache_write, s.cache_write_long)
             for route in config.routes
             if config.upstreams[route.upstream].dialect == dialect
             and (allows(route.pattern) or any(c in route.pattern for c in "*?["))  # a glob: it may
             for s in _sheets(config.rates(plan, route))]  # match a model the plan allows
    return min(rates, default=0)


class Authenticator:
    def __init__(self, redis: Any, schema: KeySchema, ttl_seconds: float) -> None:
        self._redis = redis
        self._schema = schema
        self._ttl = ttl_seconds
        self._cache: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self._invalid: OrderedDict[str, float] = OrderedDict()  # key hash -> until (monotonic)
        self.throttle = FailedAuthThrottle()
        self._floors: tuple[Config | None, dict[tuple[str, str], int]] = (None, {})

    async def authenticate(self, raw: str | None, client: str | None = None) -> Principal:
        """The key's principal; 401 for a missing, malformed or unknown key. `client` is the caller's
        address (`request.remote`): an address whose unknown keys failed too often gets 429 for any key
        this process has not already authenticated (so a shared address keeps its known keys working).
        Missing and malformed keys never reach Redis and are not counted."""
        digest = hash_key(check_key_shape(raw))
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        address = client_address(client)
        self._refuse_if_blocked(address, now)
        until = self._invalid.get(digest)
        if until is not None and until > now:
            self.throttle.failed(address, now)
            raise Unauthorized("Incorrect API key provided.")
        try:
            principal = await self._lookup(digest)
        except Unauthorized:
            self._remember_invalid(digest, now)
            self.throttle.failed(address, now)
            raise
        self._invalid.pop(digest, None)
        self._remember(principal)
        return principal

    def _refuse_if_blocked(self, address: str | None, now: float) -> None:
        wait = self.throttle.blocked_for(address, now)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise RateLimited(f"Too many failed authentications from this address; try again in {seconds} s.",
                              headers={"Retry-After": str(seconds), "retry-after-ms": str(int(wait * 1000)),
                                       "x-should-retry": "false"})

    def _remember_invalid(self, digest: str, now: float) -> None:
        self._invalid[digest] = now + NEGATIVE_TTL_SECONDS
        self._invalid.move_to_end(digest)
        while len(self._invalid) > NEGATIVE_CACHE_SIZE:
            self._invalid.popitem(last=False)

    async def _lookup(self, digest: str) -> Principal:
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
        return Principal(digest, account_id, key_id, plan, int(anchor or created or 0), zone or "",
                         key_limits(json.loads(limits)) if limits else (),
                         tuple(s for s in (scopes or "").split(",") if s))

    def prompt_rate_floor(self, config: Config, plan: str, dialect: str) -> int:
        """`prompt_rate_floor`, computed once per configuration (a reload brings a new one)."""
        loaded, floors = self._floors
        if loaded is not config:
            floors = {}
            self._floors = (config, floors)
        if (plan, dialect) not in floors:
            floors[(plan, dialect)] = prompt_rate_floor(config, plan, dialect)
        return floors[(plan, dialect)]

    async def precheck(self, principal: Principal, dialect: str, body_bytes: int, config: Config,
                       clock_offset_ms: int = 0) -> None:
        """Before a body of `body_bytes` is parsed: 402 when the account's available balance (allowance
        + purchased - held) cannot pay even that many prompt tokens at the cheapest rate a request of
        `dialect` can be held at under its plan, a lower bound of any hold the body could get. Bodies
        under PRECHECK_MIN_BYTES skip it (parsing them is cheap, and the reserve script decides);
        larger ones cost one HMGET. Near a cycle or subscription end it stands aside: the reserve
        script may credit a new allowance first."""
        if body_bytes < PRECHECK_MIN_BYTES:
            return
        keys = self._schema.for_account(principal.account_id)
        async with redis_guard():
            plan, allow, extra, held, cycle_end, plan_expires = await self._redis.hmget(
                keys.account, ["plan", "allow", "extra", "held", "cycle_end_ms", "plan_expires_ms"])
        now = time.time() * 1000 + clock_offset_ms + _CLOCK_MARGIN_MS
        if plan is None or int(cycle_end or 0) <= now or 0 < int(plan_expires or 0) <= now:
            return
        rate = self.prompt_rate_floor(config, plan, dialect)
        need = ceil_div(body_bytes * rate, MICRO)
        available = int(allow or 0) + int(extra or 0) - int(held or 0)
        if rate and available < need:
            refusal = InsufficientCredits(
                f"Insufficient credits: {format_credits(max(available, 0))} credits available, not enough to "
                f"cover this request's prompt ({body_bytes} bytes need at least {format_credits(need)} credits). "
                "Add credits to continue.")
            refusal.available_micro, refusal.held_micro, refusal.needed_micro = available, int(held or 0), need
            raise refusal

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

    async def live_account(self, principal: Principal, reading: bool = False) -> dict[str, str]:
        """Re-check the key record and return the account hash (one round trip). `reading`: the key
        holder's own read-only routes, which a suspended account may still use (to see why, and its
        balance and statements); a closed one may not."""
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
        status = account.get("status")
        if status != "active" and not (reading and status == "suspended"):  # as the reserve refuses it
            raise AccountInactive(status or "suspended")
        return dict(account)

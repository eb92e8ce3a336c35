"""Accounts, API keys and credit grants in Redis: the operations behind the admin API and CLI.

Balances are only ever changed by the Lua scripts (grant, reserve, settle, release, reap); this
module creates records and reads them back as external views in decimal credits.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.budgets import BUDGET_FIELDS, budget_pairs, owner_of, sharing_keys, with_budgets
from gateway.config import Config
from gateway.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    ScriptStatus,
    StoreUnavailable,
    Unprocessable,
    balance_too_large,
)
from gateway.idempotency import IDEMPOTENCY_TTL_MS, request_fingerprint
from gateway.index import account_ids, add_account, bucket_accounts
from gateway.keys import INDEX_BUCKETS, KeySchema
from gateway.limits import cycle_bounds
from gateway.money import amount
from gateway.scripts import REDIS_DOWN, ScriptRunner
from gateway.views import iso, key_view, now_ms

KEY_PREFIX = "gwk_"  # every raw gateway key starts with this, so it is recognisable in a leak scan


def hash_key(raw: str) -> str:
    """SHA-256 of a raw key: the only form a key is stored in."""
    return hashlib.sha256(raw.encode()).hexdigest()


def add_month(moment: datetime) -> datetime:
    """The same day next month, clamped to the month's last day (a start on the 31st)."""
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def parse_expiry(value: Any) -> int:
    """An `expires_at` (ISO 8601 string or unix seconds) as unix milliseconds; 0 for never."""
    if value is None:
        return 0
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value <= 0:
            raise BadRequest("'expires_at' must be in the future.", param="expires_at")
        return int(value * 1000)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise BadRequest("'expires_at' must be an ISO 8601 time or unix seconds.", param="expires_at") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return int(moment.timestamp() * 1000)
    raise BadRequest("'expires_at' must be an ISO 8601 time or unix seconds.", param="expires_at")


@asynccontextmanager
async def redis_guard() -> AsyncIterator[None]:
    """Turn 'Redis is not there' into a 503, failing closed."""
    try:
        yield
    except REDIS_DOWN as exc:
        raise StoreUnavailable("The credit store is unavailable; try again shortly.") from exc


def check_credit_status(status: int, account_id: str, idempotency_key: str, micro: int, available: int) -> None:
    """The refusals a grant and an adjustment share (no account, a reused Idempotency-Key, a balance
    that would pass 2^53 micro-credits)."""
    if status == ScriptStatus.NO_ACCOUNT:
        raise NotFound(f"No account {account_id!r}.")
    if status == ScriptStatus.IDEMPOTENCY_MISMATCH:
        raise Unprocessable(f"The Idempotency-Key {idempotency_key!r} was already used with a different request "
                            "for this account; use a new key for a new request.", param="idempotency_key")
    if status == ScriptStatus.BALANCE_TOO_LARGE:
        raise Conflict(balance_too_large(micro, available), param="credits")


@dataclass(frozen=True, slots=True)
class Credited:
    """The answer to a grant or pack: what is available after it, and whether it is a replay of an
    earlier request with the same idempotency key (nothing credited this time)."""

    available: int
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class NewKey:
    id: str
    key: str  # the raw key: returned once, never stored
    prefix: str
    account_id: str
    label: str
    expires_ms: int


class Store:
    """Record-level operations on accounts and keys."""

    def __init__(self, redis: Any, schema: KeySchema, runner: ScriptRunner, clock_offset_ms: int = 0) -> None:
        self.redis = redis
        self.schema = schema
        self.runner = runner
        self.clock_offset_ms = clock_offset_ms

    def _now(self) -> int:
        """Now in ms on the scripts' clock (shifted by the test-only offset)."""
        return now_ms() + self.clock_offset_ms

    async def create_account(self, config: Config, name: str, plan: str, timezone: str | None = None,
                             external_id: str = "") -> str:
        """A new account on `plan`, its billing cycle anchored now in `timezone` (default: the plan's)."""
        if plan not in config.plans:
            raise BadRequest(f"Unknown plan {plan!r} (configured: {', '.join(config.plans)}).", param="plan")
        if timezone is not None:
            try:
                ZoneInfo(timezone)
            except (ZoneInfoNotFoundError, ValueError):
                raise BadRequest(f"Unknown timezone {timezone!r}: use an IANA name such as Europe/Paris.",
                                 param="timezone") from None
        account_id = "acct_" + secrets.token_hex(8)
        allowance = config.plans[plan].monthly_credits
        start_ms = now_ms() + self.clock_offset_ms
        cycle = cycle_bounds(start_ms, timezone or config.plans[plan].timezone, start_ms)
        keys = self.schema.for_account(account_id)
        async with redis_guard():
            await add_account(self.redis, self.schema, account_id)  # listed first: a bare id is skipped
            pipe = self.redis.pipeline(transaction=True)  # the record and its ledger event together
            pipe.hset(keys.account, mapping={
                "name": name, "plan": plan, "status": "active", "allow": allowance, "extra": 0, "held": 0,
                "charged": 0, "granted": allowance, "cycle_used": 0, "requests": 0, "cycle_allowance": allowance,
                "key_index": 1,
                "created_ms": start_ms, "anchor_ms": start_ms, "expired": 0, "timezone": timezone or "",
                "cycle_start_ms": cycle[0], "cycle_end_ms": cycle[1], "cycle_allowance_start": cycle[0],
                **({"external_id": external_id} if external_id else {}),
            })
            pipe.xadd(keys.ledger, {"type": "account_created", "ts": start_ms, "plan": plan, "name": name,
                                    "allowance": allowance})
            await pipe.execute()
        return account_id

    async def account_raw(self, account_id: str) -> dict[str, str]:
        async with redis_guard():
            data: dict[str, str] = await self.redis.hgetall(self.schema.for_account(account_id).account)
        if not data:
            raise NotFound(f"No account {account_id!r}.")
        return data

    async def grant(self, account_id: str, micro: int, note: str = "", idempotency_key: str = "",
                    request: dict[str, Any] | None = None, kind: str = "grant") -> Credited:
        """Add non-expiring credits. With an `idempotency_key`, at most once: a retry of the same
        `request` (what the caller asked, default the amount and note) within IDEMPOTENCY_TTL_MS gets
        the first answer; the same key with another request is refused (422). `kind` ('grant' or 'pack')
        is counted apart for statements."""
        if micro <= 0:
            raise BadRequest("'credits' must be a positive number.", param="credits")
        keys = self.schema.for_account(account_id)
        fingerprint = request_fingerprint(request if request is not None else {"credits": micro, "note": note})
        status, available = await self.runner.run(
            "grant", [keys.account, keys.ledger, keys.idempotency(idempotency_key)],
            [micro, self.clock_offset_ms, note, idempotency_key, fingerprint, IDEMPOTENCY_TTL_MS,
             "credited_packs" if kind == "pack" else "credited_grants"])
        check_credit_status(status, account_id, idempotency_key, micro, int(available))
        if status == ScriptStatus.ACCOUNT_IS_CLOSED:
            raise Conflict(f"The account {account_id!r} is closed, which is final: it takes no more credits.")
        return Credited(int(available), replayed=status == ScriptStatus.IDEMPOTENT_REPLAY)

    async def create_key(self, account_id: str, label: str = "", expires_ms: int = 0,
                         scopes: tuple[str, ...] = (), limits: dict[str, int] | None = None,
                         max_keys: int | None = None, budgets: dict[str, int | None] | None = None) -> NewKey:
        """A new key; refused when the account already has `max_keys` usable keys (atomic): keys
        that can still authenticate, a rotated key until its grace period ends."""
        await self._index_keys(account_id)
        raw, key_id, pairs = _new_key_record(label, scopes, limits)
        keys = self.schema.for_account(account_id)
        status, usable = await self.runner.run(
            "addkey", [keys.account, keys.key_ids, keys.api_key(key_id), keys.usable_keys, keys.ledger],
            [key_id, max_keys or 0, self.clock_offset_ms, label, expires_ms, *pairs, *budget_pairs(budgets or {}),
             "expires_ms", expires_ms])
        if status == ScriptStatus.NO_ACCOUNT:
            raise NotFound(f"No account {account_id!r}.")
        if status == ScriptStatus.ACCOUNT_IS_CLOSED:
            raise Conflict(f"The account {account_id!r} is closed, which is final: it gets no new keys.")
        if status == ScriptStatus.TOO_MANY_KEYS:
            raise Forbidden(f"The account already has {usable} active keys, the most its plan allows; "
                            "revoke one first (a rotated key counts until its grace period ends).")
        await self._register_key(account_id, key_id, raw)
        return NewKey(key_id, raw, raw[:12], account_id, label, expires_ms)

    async def _register_key(self, account_id: str, key_id: str, raw: str) -> None:
        async with redis_guard():  # the global lookups, once the record exists
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(self.schema.key_hash(hash_key(raw)), f"{account_id}:{key_id}")
            pipe.set(self.schema.key_id(key_id), account_id)
            await pipe.execute()

    async def _index_keys(self, account_id: str) -> None:
        """Index the usable keys of an account made before the index (once, key by key, idempotent);
        the key scripts run only after this returns, so they count on a complete index."""
        keys = self.schema.for_account(account_id)
        async with redis_guard():
            if await self.redis.hget(keys.account, "key_index"):
                return
            key_ids = sorted(await self.redis.smembers(keys.key_ids))
        for key_id in key_ids:
            await self.runner.run("indexkey", [keys.account, keys.api_key(key_id), keys.usable_keys],
                                  [key_id, self.clock_offset_ms])
        async with redis_guard():  # (`active_keys`: the old counter, never decremented on expiry)
            if await self.redis.exists(keys.account):
                await self.redis.hset(keys.account, "key_index", 1)
                await self.redis.hdel(keys.account, "active_keys")

    async def change_plan(self, config: Config, account_id: str, plan: str, when: str | None = None,
                          expires_ms: int = -1) -> dict[str, Any]:
        """Upgrade at once, downgrade at the next cycle, unless `when` says otherwise; `expires_ms`
        sets the subscription's end (0: none). At once, an upgrade credits only what the new plan's
        allowance exceeds the largest one credited this cycle, and a downgrade leaves no more than
        the new allowance minus this cycle's use (see lua/plan-2.lua)."""
        if plan not in config.plans:
            raise BadRequest(f"Unknown plan {plan!r} (configured: {', '.join(config.plans)}).", param="plan")
        if when not in (None, "now", "next_cycle"):
            raise BadRequest("'effective' must be 'now' or 'next_cycle'.", param="effective")
        keys = self.schema.for_account(account_id)
        for _ in range(3):
            record = await self.account_raw(account_id)
            current = record.get("plan", "")
            old = config.plans.get(current)
            old_allow = old.monthly_credits if old else 0
            new_allow = config.plans[plan].monthly_credits
            effective = when or ("now" if new_allow >= old_allow else "next_cycle")
            zone = record.get("timezone") or (old.timezone if old else "UTC")
            next_cycle = cycle_bounds(int(record.get("anchor_ms") or 0), zone, now_ms() + self.clock_offset_ms)[1]
            status, credited, removed = await self.runner.run(
                "plan", [keys.account, keys.ledger],
                [current, plan, effective, new_allow, old_allow, expires_ms, self.clock_offset_ms, next_cycle])
            if status == ScriptStatus.OK:
                return {"plan": plan if effective == "now" else current, "next_plan": None if effective == "now"
                        else plan, "effective": effective, **amount("credited", int(credited)),
                        **amount("allowance_removed", int(removed))}
            if status == ScriptStatus.NO_ACCOUNT:
                raise NotFound(f"No account {account_id!r}.")
        raise BadRequest("The account's plan changed while it was being changed; try again.")

    async def renew(self, account_id: str, months: int) -> int:
        """Move the subscription's end on by whole months (the same day of the month, UTC); the plan
        and a pending plan change stay. A subscription without an end, or whose end has passed, has
        nothing to extend (400: set an end with a plan change). Returns the new end (ms)."""
        if not isinstance(months, int) or isinstance(months, bool) or not 1 <= months <= 120:
            raise BadRequest("'months' must be a whole number from 1 to 120.", param="months")
        keys = self.schema.for_account(account_id)
        for _attempt in range(3):
            ends = int((await self.account_raw(account_id)).get("plan_expires_ms") or 0)
            moment = datetime.fromtimestamp(ends / 1000, UTC)
            for _month in range(months):
                moment = add_month(moment)
            status, ended = await self.runner.run(
                "renew", [keys.account, keys.ledger],
                [ends, int(moment.timestamp() * 1000), self.clock_offset_ms, months])
            if status == ScriptStatus.OK:
                return int(ended)
            if status == ScriptStatus.NO_ACCOUNT:
                raise NotFound(f"No account {account_id!r}.")
            if status == ScriptStatus.NO_SUBSCRIPTION_END:
                raise BadRequest("The subscription has no end date to extend: give it one with a plan change "
                                 "and 'expires_at'.", param="months")
            if status == ScriptStatus.SUBSCRIPTION_ENDED:
                raise BadRequest(f"The subscription ended at {iso(int(ended))}: start a new one with a plan change "
                                 "and 'expires_at'.", param="months")
        raise BadRequest("The subscription's end changed while it was being renewed; try again.")

    async def buy_pack(self, config: Config, account_id: str, pack: str, idempotency_key: str = "") -> Credited:
        """Add a pack's credits (they never expire), at most once per idempotency key."""
        if pack not in config.packs:
            raise BadRequest(f"Unknown pack {pack!r} (configured: {', '.join(config.packs) or 'none'}).",
                             param="pack")
        chosen = config.packs[pack]
        return await self.grant(account_id, chosen.credits, f"pack:{pack} usd:{chosen.price_usd}",
                                idempotency_key, {"pack": pack}, kind="pack")

    async def list_keys(self, account_id: str) -> list[dict[str, Any]]:
        await self.account_raw(account_id)
        keys = self.schema.for_account(account_id)
        async with redis_guard():
            ids = sorted(await self.redis.smembers(keys.key_ids))
            pipe = self.redis.pipeline(transaction=False)
            for key_id in ids:
                pipe.hgetall(keys.api_key(key_id))
            records = [(key_id, rec) for key_id, rec in zip(ids, await pipe.execute(), strict=True) if rec]
            views = [key_view(key_id, account_id, rec, self._now()) for key_id, rec in records]
            return await with_budgets(self.redis, keys, views, [rec for _, rec in records], self._now())

    async def revoke_key(self, key_id: str, note: str = "revoked") -> dict[str, Any]:
        """Revoke a key at once: the reserve script refuses it on every gateway process."""
        async with redis_guard():
            account_id = await self.redis.get(self.schema.key_id(key_id))
            if not account_id:
                raise NotFound(f"No key {key_id!r}.")
        keys = self.schema.for_account(account_id)
        record_key = keys.api_key(key_id)
        await self.runner.run("revokekey", [record_key, keys.usable_keys, keys.ledger],
                              [self.clock_offset_ms, key_id, note])
        async with redis_guard():
            record = await self.redis.hgetall(record_key)
            if record.get("sha256"):
                await self.redis.delete(self.schema.key_hash(record["sha256"]))
        return key_view(key_id, account_id, record, self._now())


    async def admin_event(self, account_id: str, event: dict[str, Any], record: str | None = None,
                          changes: dict[str, Any] | None = None) -> None:
        """Apply `changes` to `record` (a hash of the account) and append the admin `event` to the
        account's ledger in one MULTI/EXEC: the change and its record never part."""
        keys = self.schema.for_account(account_id)
        async with redis_guard():
            pipe = self.redis.pipeline(transaction=True)
            if record is not None and changes:
                pipe.hset(record, mapping=changes)
            pipe.xadd(keys.ledger, {"ts": now_ms() + self.clock_offset_ms,
                                    **{k: str(v) for k, v in event.items()}})
            await pipe.execute()

    async def key_record(self, key_id: str) -> tuple[str, dict[str, str]]:
        async with redis_guard():
            account_id = await self.redis.get(self.schema.key_id(key_id))
            record = await self.redis.hgetall(self.schema.for_account(account_id).api_key(key_id)) \
                if account_id else {}
        if not account_id or not record:
            raise NotFound(f"No key {key_id!r}.")
        return account_id, record

    async def rotate_key(self, key_id: str, grace_ms: int, max_keys: int | None = None
                         ) -> tuple[NewKey, dict[str, Any]]:
        """A new key with the old one's label, scopes, limits and expiry; the old key stays valid for
        `grace_ms` more (never longer than it already would), so clients can switch without an outage.
        The new key takes the old one's place under `max_keys`, but the old one counts until its grace
        ends: refused (403) while the account's other usable keys already fill the limit."""
        if not 0 <= grace_ms <= 30 * 86_400_000:
            raise BadRequest("'grace_seconds' must be between 0 and 30 days.", param="grace_seconds")
        account_id, old = await self.key_record(key_id)
        await self._index_keys(account_id)
        limits = json.loads(old["limits"]) if old.get("limits") else None
        scopes = tuple(s for s in old.get("scopes", "").split(",") if s)
        label = old.get("label", "")
        raw, new_id, pairs = _new_key_record(label, scopes, limits)
        pairs += [v for name in BUDGET_FIELDS.values() if old.get(name) for v in (name, old[name])]
        pairs += ["budget_id", owner_of(key_id, old)]  # the replacement spends from the same budget
        keys = self.schema.for_account(account_id)
        status, detail, _until = await self.runner.run(
            "rotatekey", [keys.account, keys.key_ids, keys.api_key(key_id), keys.api_key(new_id), keys.usable_keys,
                          keys.ledger],
            [key_id, new_id, max_keys or 0, self.clock_offset_ms, grace_ms, label, *pairs])
        if status == ScriptStatus.NO_ACCOUNT:
            raise NotFound(f"No key {key_id!r}.")
        if status == ScriptStatus.ACCOUNT_IS_CLOSED:
            raise Conflict(f"The account {account_id!r} is closed, which is final: it gets no new keys.")
        if status == ScriptStatus.KEY_NOT_ACTIVE:
            raise BadRequest(f"The key {key_id!r} is {detail}: only an active key can be rotated.")
        if status == ScriptStatus.KEY_ALREADY_ROTATED:
            raise BadRequest(f"The key {key_id!r} was already rotated to {detail}: rotate that key instead.")
        if status == ScriptStatus.TOO_MANY_KEYS:
            raise Forbidden(f"The account has {detail} active keys counting those in a rotation grace period, "
                            "more than its plan allows once this one is replaced; wait for the grace period to end "
                            "or revoke a key first.")
        await self._register_key(account_id, new_id, raw)
        _, record = await self.key_record(key_id)
        new = NewKey(new_id, raw, raw[:12], account_id, label, int(old.get("expires_ms") or 0))
        return new, key_view(key_id, account_id, record, self._now())

    async def update_key(self, key_id: str, *, label: str | None = None, expires_ms: int | None = None,
                         max_keys: int | None = None, budgets: dict[str, int | None] | None = None
                         ) -> dict[str, Any]:
        """Change a key's label or expiry (0: never); the reserve script applies a new expiry at once.
        An expiry that lets the key authenticate longer is refused (403) when the account's other usable
        keys already fill `max_keys`."""
        budgets = budgets or {}
        if label is None and expires_ms is None and not budgets:
            raise BadRequest("Nothing to change: give 'label', 'expires_at' or a budget.")
        account_id, rec = await self.key_record(key_id)
        await self._index_keys(account_id)
        keys = self.schema.for_account(account_id)
        caps = [str(budgets[f] or "none") if f in budgets else "" for f in BUDGET_FIELDS.values()]
        status, usable = await self.runner.run(
            "updatekey", [keys.api_key(key_id), keys.usable_keys, keys.ledger],
            [key_id, max_keys or 0, self.clock_offset_ms, "0" if label is None else "1", label or "",
             "" if expires_ms is None else expires_ms, *caps])
        if status == ScriptStatus.NO_ACCOUNT:
            raise NotFound(f"No key {key_id!r}.")
        if status == ScriptStatus.TOO_MANY_KEYS:
            raise Forbidden(f"The account's other {usable} active keys already fill its plan's key limit: "
                            "a later expiry would let one more key authenticate. Revoke a key first.",
                            param="expires_at")
        async with redis_guard():
            for other in await sharing_keys(self.redis, keys, key_id, rec) if budgets else []:
                await self.runner.run("updatekey", [keys.api_key(other), keys.usable_keys, keys.ledger],
                                      [other, 0, self.clock_offset_ms, "0", "", "", *caps])
        return await self.key_view_of(key_id)

    async def key_view_of(self, key_id: str) -> dict[str, Any]:
        """One key's view, its budgets included."""
        account_id, record = await self.key_record(key_id)
        async with redis_guard():
            return (await with_budgets(self.redis, self.schema.for_account(account_id),
                                       [key_view(key_id, account_id, record, self._now())], [record], self._now()))[0]

    async def list_accounts(self, plan: str | None = None, status: str | None = None, name: str | None = None,
                            limit: int = 50, after: str | None = None) -> tuple[list[tuple[str, dict[str, str]]], bool]:
        """Accounts in id order after `after`, filtered by plan, status and a name substring; and
        whether more follow. Walks the sharded index in id order and pipelines the records 200 at a time."""
        found: list[tuple[str, dict[str, str]]] = []
        needle = (name or "").lower()
        batch: list[str] = []

        async def keep(ids: list[str]) -> bool:  # True once the page is full and one more matched
            async with redis_guard():
                pipe = self.redis.pipeline(transaction=False)
                for account_id in ids:
                    pipe.hgetall(self.schema.for_account(account_id).account)
                records = await pipe.execute()
            for account_id, rec in zip(ids, records, strict=True):
                if not rec or (plan and rec.get("plan") != plan) or (status and rec.get("status") != status) \
                        or (needle and needle not in rec.get("name", "").lower()):
                    continue
                if len(found) == limit:
                    return True
                found.append((account_id, rec))
            return False

        page = min(max(limit + 1, 16), 200)
        async with redis_guard():
            async for account_id in account_ids(self.redis, self.schema, after, batch=page):
                batch.append(account_id)
                if len(batch) == page:
                    if await keep(batch):
                        return found, True
                    batch = []
        return found, await keep(batch) if batch else False

    async def stats(self) -> dict[str, Any]:
        """Platform totals over every account: by plan and status, spend, requests and tokens. Reads
        the index one bucket and one page at a time, and only the fields it sums."""
        by_plan: dict[str, int] = {}
        by_status: dict[str, int] = {}
        fields = ("plan", "status", "allow", "extra", "cycle_used", "charged", "requests", "cycle_requests",
                  "tokens", "cycle_tokens", "held")
        sums = {f: 0 for f in fields[4:]}
        remaining = accounts = 0
        for bucket in range(INDEX_BUCKETS):
            async with redis_guard():
                async for ids in bucket_accounts(self.redis, self.schema, bucket):
                    pipe = self.redis.pipeline(transaction=False)
                    for account_id in ids:
                        pipe.hmget(self.schema.for_account(account_id).account, fields)
                    for values in await pipe.execute():
                        rec = dict(zip(fields, values, strict=True))
                        if rec["plan"] is None:
                            continue  # indexed, but its record was never written (see create_account)
                        accounts += 1
                        by_plan[rec["plan"]] = by_plan.get(rec["plan"], 0) + 1
                        by_status[rec["status"] or ""] = by_status.get(rec["status"] or "", 0) + 1
                        for field in sums:
                            sums[field] += int(rec[field] or 0)
                        remaining += int(rec["allow"] or 0) + int(rec["extra"] or 0) - int(rec["held"] or 0)
        return {
            "accounts": accounts, "accounts_by_plan": by_plan, "accounts_by_status": by_status,
            **amount("credits_used_this_cycle", sums["cycle_used"]), **amount("credits_used_lifetime", sums["charged"]),
            **amount("credits_remaining", remaining), **amount("credits_held", sums["held"]),
            "requests_this_cycle": sums["cycle_requests"], "requests_lifetime": sums["requests"],
            "tokens_this_cycle": sums["cycle_tokens"], "tokens_lifetime": sums["tokens"],
        }


def _new_key_record(label: str, scopes: tuple[str, ...], limits: dict[str, int] | None
                    ) -> tuple[str, str, list[str]]:
    """A new raw key, its id, and its record's fields as flat `field, value` pairs (no expiry)."""
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    record: dict[str, Any] = {
        "status": "active", "label": label, "prefix": raw[:12], "created_ms": now_ms(),
        "scopes": ",".join(scopes), "sha256": hash_key(raw),
    }
    if limits:
        record["limits"] = json.dumps(limits, separators=(",", ":"))
    return raw, "key_" + secrets.token_hex(8), [str(item) for pair in record.items() for item in pair]

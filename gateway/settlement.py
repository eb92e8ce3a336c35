"""What keeps every hold ending exactly once while Redis or the client misbehaves.

- `Leases`: the holds of this process's requests in flight, whose leases a background loop renews
  (invariant 3: the reaper only ever returns holds of requests that are gone).
- `Retries`: settlements (and cancellations of reserves that timed out) that could not reach Redis,
  kept in the process by request id and retried until they land; drained at shutdown, and logged
  and counted if they are ever abandoned (invariant 7: served means charged).
Both scripts are idempotent per request id, so a retry that lands twice has no further effect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from gateway.errors import StoreUnavailable
from gateway.keys import AccountKeys
from gateway.metering import Meter
from gateway.metrics import Metrics
from gateway.scripts import REDIS_DOWN

log = logging.getLogger("gateway.settlement")

Attempt = Callable[[], Awaitable[Any]]


@dataclass
class Leases:
    """Request ids in flight in this process, by account, for lease renewal."""

    by_account: dict[str, tuple[AccountKeys, set[str]]] = field(default_factory=dict)

    def add(self, keys: AccountKeys, request_id: str) -> None:
        entry = self.by_account.setdefault(keys.account_id, (keys, set()))
        entry[1].add(request_id)

    def discard(self, account_id: str, request_id: str) -> None:
        entry = self.by_account.get(account_id)
        if entry is not None:
            entry[1].discard(request_id)
            if not entry[1]:
                del self.by_account[account_id]

    async def renew_all(self, meter: Meter, metrics: Metrics) -> int:
        """One renewal per account with requests in flight (one script call each)."""
        renewed = 0
        for keys, request_ids in list(self.by_account.values()):
            if request_ids:
                renewed += await meter.renew(keys, sorted(request_ids))
        metrics.lease_renewals.inc(renewed)
        return renewed


@dataclass
class Retries:
    """Settlement work that failed for Redis reasons, retried by request id until it lands.

    An item is retried for at most `max_age` seconds: the scripts remember an ended hold (its
    tombstone) only for a while, and a settlement retried after that could charge twice. An item
    given up is logged and counted, never dropped silently.
    """

    metrics: Metrics
    max_age: float = 1800.0
    queued: dict[str, tuple[str, Attempt, float]] = field(default_factory=dict)  # id -> (op, attempt, since)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, request_id: str, op: str, attempt: Attempt) -> None:
        """Queue `attempt` (a settle or a cancel) for `request_id`; a later op replaces an earlier one
        only when it is a settlement (a cancel never overrides a charge)."""
        current = self.queued.get(request_id)
        if current is not None and current[0] == "settle" and op != "settle":
            return
        self.queued[request_id] = (op, attempt, current[2] if current else time.monotonic())
        self.metrics.settle_retries.labels(op).inc()
        log.warning("%s for %s queued: the credit store is unavailable; retrying", op, request_id)
        self.wake.set()

    async def run_once(self) -> int:
        """Try the queued items in order until one fails (Redis is still unwell: the rest would
        fail too, each after a timeout); returns how many are still queued."""
        now = time.monotonic()
        for request_id, (op, attempt, since) in list(self.queued.items()):
            if now - since > self.max_age:
                self._abandon(request_id, op, "it stayed unlanded longer than an ended hold is remembered")
                continue
            try:
                await attempt()
            except (StoreUnavailable, *REDIS_DOWN, RedisError):
                break
            except Exception:  # a bug: keep the item, say so, try again later
                log.exception("%s for %s failed; will retry", op, request_id)
                break
            if self.queued.get(request_id, (None,))[0] == op:
                del self.queued[request_id]
                log.info("%s for %s landed after a retry", op, request_id)
        return len(self.queued)

    def _abandon(self, request_id: str, op: str, why: str) -> None:
        del self.queued[request_id]
        self.metrics.settle_abandoned.labels(op).inc()
        log.error("%s for %s abandoned: %s", op, request_id, why)

    async def run_forever(self, stopping: Callable[[], bool]) -> None:
        delay = 0.2
        while not stopping():
            if not self.queued:
                self.wake.clear()
                await self.wake.wait()
                delay = 0.2
            await asyncio.sleep(delay)
            left = await self.run_once()
            delay = 0.2 if not left else min(delay * 2, 5.0)

    async def drain(self, seconds: float) -> None:
        """At shutdown: keep retrying for up to `seconds`, then log and count what is abandoned."""
        deadline = time.monotonic() + seconds
        while self.queued and time.monotonic() < deadline:
            if await self.run_once():
                await asyncio.sleep(0.2)
        for request_id, (op, _attempt, _since) in list(self.queued.items()):
            self._abandon(request_id, op, "abandoned at shutdown: the credit store stayed unavailable")


async def land(leases: Leases, retries: Retries, account_id: str, request_id: str, op: str,
               attempt: Attempt) -> Any:
    """Run a settle or release of `request_id` now; when Redis cannot take it (down, timing out, or
    answering an error such as OOM, READONLY or TRYAGAIN), queue it to be retried until it lands.
    The hold's lease stays renewed until then. Returns the script's result, or None when queued."""

    async def landed() -> Any:
        result = await attempt()
        leases.discard(account_id, request_id)
        return result

    try:
        return await landed()
    except (StoreUnavailable, *REDIS_DOWN, RedisError):
        retries.add(request_id, op, landed)
        return None

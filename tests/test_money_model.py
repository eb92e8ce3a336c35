"""The money invariants, proved by a model (issue 10): a hypothesis `RuleBasedStateMachine` drives the
Lua scripts through `Meter` and `Store` against the session's real redis-server, in random
interleavings over 2-3 accounts with 1-2 keys each, and after every step compares Redis with a plain
Python model of each account written from DESIGN.md and the script headers (not from the Lua).

Left out on purpose: `Store.change_plan(..., 'now')`, subscription ends (plan lapse) and `Store.renew`
are being rewritten elsewhere; the machine only queues plan changes for the next cycle.

Time: the scripts read Redis TIME plus the test-only `clock_offset_ms`. The machine keeps a model
clock `now` and, right before every script call, sets the offset so that the script sees that moment,
give or take how long the call takes (on a starved CI machine, up to seconds). So everything lives on
a 10 s grid: `now` is always 5 s into a grid step and moves by whole steps, leases and tombstones end
on the grid, and the request window counts in 10 s buckets: no outcome depends on a 5 s delay.

Run longer: MONEY_MODEL_EXAMPLES=2000 (and MONEY_MODEL_STEPS=60, MONEY_MODEL_RANDOM=1 for fresh
sequences instead of the fixed CI ones).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from gateway.app import connect_redis
from gateway.config import Config, load_config
from gateway.errors import (
    AccountInactive,
    Conflict,
    InsufficientCredits,
    KeyBudgetExhausted,
    StoreUnavailable,
    Unauthorized,
    Unprocessable,
)
from gateway.keys import AccountKeys, KeySchema
from gateway.limits import Limit, cycle_bounds, encode, rate_limits
from gateway.metering import LimitReached, Meter, PlanChanged, Reservation, ReserveSpec, quote
from gateway.scripts import ScriptRunner, load_scripts
from gateway.store import Store
from gateway.store_billing import adjust, set_status

PLANS = """
default_plan: free
plans:
  free: {monthly_credits: 0, models: ["demo-*"]}
  small: {monthly_credits: 0.002, models: ["demo-*"]}
  big: {monthly_credits: 0.006, markup: 1.5, models: ["demo-*"]}
"""
MODEL = "demo-mini"  # 0.15 / 0.60 USD per 1M tokens: a request costs tens to thousands of micro-credits
STEP = 10_000  # the model clock's grid (ms)
LEASE_MS = 65_000
TOMBSTONE_MS = 155_000  # above 2 leases, so Meter keeps it as given
# The limit rows a reserve may carry (each request draws a subset): a per-key rolling window,
# an account concurrency cap and an account per-cycle token quota. The window counts in 10 s buckets
# instead of 1 s ones, so that which bucket a call lands in never depends on how long the call took.
RPM = replace(rate_limits({"requests_per_minute": 3}, "k")[0], bucket_ms=STEP)
CONCURRENT = rate_limits({"concurrent_requests": 3}, "a")[0]
TOKEN_QUOTA = Limit("tokens_per_cycle", "t", 6000, "a", 0, 0)
ROWS = (RPM, CONCURRENT, TOKEN_QUOTA)
ROW = {row.id: row for row in ROWS}
ENDED_MARK = {"settled": "s", "released": "x", "reaped": "r"}


@pytest.fixture
def plans_yaml() -> str:
    return PLANS


# ---------------------------------------------------------------- the model


def scoped(row: Limit, key_id: str) -> str:
    """`<scope>:<id>`: the part of a limits hash field naming one limit of one key or account."""
    return f"k:{key_id}:{row.id}" if row.scope == "k" else f"a:{row.id}"


@dataclass
class Hold:
    """A live reservation as the model expects it."""

    rid: str
    key_id: str
    amount: int
    allow_part: int  # what it claims of the allowance (spend draws on the allowance first)
    gen: int  # the allowance generation it was taken in
    lowered: bool
    tokens: int
    usd: int
    rows: tuple[Limit, ...]
    limit_held: dict[str, int]  # limits hash field -> amount this request holds in it
    lease_until: int
    spec: tuple[Any, ...]  # what the reserve was called with, for a retry
    budget: str | None = None  # the key whose budget counters its charge goes to (it had a budget)

    def record(self) -> str:
        owner = f" {self.budget}" if self.budget else ""
        return f"{self.amount} {self.allow_part} {self.gen} {int(self.lowered)} {self.tokens} {self.usd}{owner}"


@dataclass
class Ended:
    """A request whose hold ended; Redis remembers it (a tombstone) until `until`, if reaped then."""

    how: str  # settled, released (or cancelled), reaped
    until: int
    rows: tuple[Limit, ...] = ()
    key_id: str = ""
    remembered: bool = True
    budget: str | None = None  # a reaped hold under a key budget: its tombstone names the key

    def tombstone(self) -> str:
        return "~" + ENDED_MARK[self.how] + (f" {self.budget}" if self.how == "reaped" and self.budget else "")


@dataclass(repr=False)
class AccountModel:
    name: str  # what a failing example prints
    id: str
    keys: AccountKeys
    anchor: int
    plan: str
    allow: int
    cycle_end: int
    key_ids: list[str]
    extra: int = 0
    charged: int = 0
    granted: int = 0
    expired: int = 0
    uncollected: int = 0
    agen: int = 0
    next_plan: str | None = None
    next_allow: int = 0
    cycle_used: int = 0
    requests: int = 0
    cycle_requests: int = 0
    tokens: int = 0
    cycle_tokens: int = 0
    revoked: set[str] = field(default_factory=set)
    status: str = "active"  # active | suspended | closed (the lifecycle rule)
    holds: dict[str, Hold] = field(default_factory=dict)
    ended: dict[str, Ended] = field(default_factory=dict)
    cycle_counters: dict[str, int] = field(default_factory=dict)  # c:<scope>:<id> -> used this cycle
    windows: dict[str, dict[int, int]] = field(default_factory=dict)  # <scope>:<id> -> bucket -> amount
    events: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)  # rid -> ledger events
    grants: list[int] = field(default_factory=list)  # grant events, in order
    key_budgets: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)  # per cycle, lifetime
    lifetime_counters: dict[str, int] = field(default_factory=dict)  # l:a:key_lifetime:<key> -> spent
    adjusted: int = 0  # refunds minus deductions (the account's `adjusted` counter)
    adjustment_keys: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (amount, available after)

    def __repr__(self) -> str:
        return self.name

    @property
    def held(self) -> int:
        return sum(h.amount for h in self.holds.values())

    @property
    def held_allow(self) -> int:
        return sum(h.allow_part for h in self.holds.values())

    @property
    def available(self) -> int:
        return self.allow + self.extra - self.held

    def limit_holds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for h in self.holds.values():
            for name, amount in h.limit_held.items():
                out[name] = out.get(name, 0) + amount
        return out

    def roll(self, cycle_end: int, allowance: int) -> None:
        """A new billing cycle starts at a reserve: only the unheld allowance expires; what holds in
        flight claim of it is carried (and expires when they end unused)."""
        new_plan, new_allow = (self.next_plan, self.next_allow) if self.next_plan else (self.plan, allowance)
        carried = self.held_allow
        self.expired += self.allow - carried
        self.allow = new_allow + carried
        self.granted += new_allow
        self.agen += 1
        self.plan, self.next_plan, self.next_allow = new_plan, None, 0
        self.cycle_end = cycle_end
        self.cycle_used = self.cycle_requests = self.cycle_tokens = 0
        self.cycle_counters.clear()

    def end_hold(self, h: Hold | None, actual: int) -> int:
        """End hold `h` (None: it was reaped) charging `actual`: out of the hold first (its allowance
        part first), then only out of credits no hold claims (allowance first); returns the charge."""
        amount, allow_part = (h.amount, h.allow_part) if h else (0, 0)
        free_allow, free_extra = self.allow - self.held_allow, self.extra - (self.held - self.held_allow)
        charge = min(actual, amount + free_allow + free_extra)
        from_allow = min(charge, allow_part)
        from_extra = min(charge - from_allow, amount - allow_part)
        rest = charge - from_allow - from_extra
        spare_allow = min(rest, free_allow)
        self.allow -= from_allow + spare_allow
        self.extra -= from_extra + rest - spare_allow
        if h is not None:
            if h.gen != self.agen:  # taken from an earlier cycle's allowance: what it left unused expires
                self.allow -= allow_part - from_allow
                self.expired += allow_part - from_allow
            del self.holds[h.rid]
        return charge

    def count(self, rows: tuple[Limit, ...], key_id: str, used: dict[str, int], now: int, windows_only: bool) -> None:
        """What a request used counts in each cycle counter, or in the current bucket of each window."""
        for row in rows:
            if row.window_ms == 0 and not windows_only:
                name = "c:" + scoped(row, key_id)
                self.cycle_counters[name] = self.cycle_counters.get(name, 0) + used[row.metric]
            elif row.window_ms > 0 and used[row.metric] > 0:
                buckets = self.windows.setdefault(scoped(row, key_id), {})
                current, count = now // row.bucket_ms, row.window_ms // row.bucket_ms
                buckets[current] = buckets.get(current, 0) + used[row.metric]
                for stale in [b for b in buckets if b <= current - count]:
                    del buckets[stale]  # a bucket that left its window is deleted when the window moves

    def limit_used(self, row: Limit, key_id: str, now: int) -> int:
        """A limit's value for a new request: what requests in flight hold of it, plus its cycle
        counter or the buckets of its window (a concurrency cap counts only what is held)."""
        held = self.limit_holds().get("h:" + scoped(row, key_id), 0)
        if row.window_ms == 0:
            return self.cycle_counters.get("c:" + scoped(row, key_id), 0) + held
        if row.window_ms < 0:
            return held
        current, count = now // row.bucket_ms, row.window_ms // row.bucket_ms
        return held + sum(v for b, v in self.windows.get(scoped(row, key_id), {}).items() if b > current - count)


# ---------------------------------------------------------------- the machine


def run_in(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]) -> Any:
    return loop.run_until_complete(coro)


class MoneyMachine(RuleBasedStateMachine):
    """Reserve, retry, settle, release, cancel, reap, renew, grant, plan changes and key revocation
    against real Redis, checked against `AccountModel` after every step."""

    redis_url = ""
    config: Config

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()  # the machine is synchronous: it drives Meter on its own loop
        self.redis = connect_redis(self.redis_url, 5.0)
        runner = ScriptRunner(self.redis, load_scripts())
        self.schema = KeySchema(f"mm{uuid.uuid4().hex[:10]}:")
        self.store = Store(self.redis, self.schema, runner)
        self.meter = Meter(runner, lease_ms=LEASE_MS, tombstone_ms=TOMBSTONE_MS)
        route = self.config.route(MODEL)
        assert route is not None
        self.route = route
        self.accounts: list[AccountModel] = []
        self.now = 0
        self.serial = 0
        self.owner: dict[str, AccountModel] = {}  # request id -> its account
        self.ledger_seen: dict[str, str] = {}
        self.ledger_events: dict[str, dict[str, list[tuple[Any, ...]]]] = {}  # account -> rid -> events
        self.ledger_grants: dict[str, list[int]] = {}

    def teardown(self) -> None:
        async def cleanup() -> None:
            names = [name async for name in self.redis.scan_iter(match=self.schema.prefix + "*", count=500)]
            if names:
                await self.redis.delete(*names)
            await self.redis.aclose()

        try:
            run_in(self.loop, cleanup())
        finally:
            self.loop.close()

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run one Meter/Store call with the scripts' clock at the model's `now` (plus the call's delay)."""

        async def at_now() -> Any:
            seconds, micros = await self.redis.time()
            offset = self.now - (int(seconds) * 1000 + int(micros) // 1000)
            self.meter.clock_offset_ms = self.store.clock_offset_ms = offset
            return await coro

        return run_in(self.loop, at_now())

    def fresh_rid(self, acct: AccountModel) -> str:
        self.serial += 1
        self.owner[f"req_{self.serial}"] = acct
        return f"req_{self.serial}"

    def allowance(self, plan: str) -> int:
        return self.config.plans[plan].monthly_credits

    # ------------------------------------------------------------ set-up

    @initialize(plans=st.lists(st.sampled_from(["free", "small", "big"]), min_size=2, max_size=3),
                keys=st.lists(st.integers(1, 2), min_size=3, max_size=3),
                grants=st.lists(st.integers(0, 4000), min_size=3, max_size=3))
    def create_accounts(self, plans: list[str], keys: list[int], grants: list[int]) -> None:
        for i, plan in enumerate(plans):
            account_id = run_in(self.loop, self.store.create_account(self.config, f"model{i}", plan))
            key_ids = [run_in(self.loop, self.store.create_key(account_id)).id for _ in range(keys[i])]
            raw = run_in(self.loop, self.redis.hgetall(self.schema.for_account(account_id).account))
            anchor = int(raw["anchor_ms"])
            assert int(raw["cycle_end_ms"]) == cycle_bounds(anchor, "UTC", anchor)[1]
            model = AccountModel(f"account{i}", account_id, self.schema.for_account(account_id), anchor, plan,
                                 self.allowance(plan), int(raw["cycle_end_ms"]), key_ids, granted=self.allowance(plan))
            self.accounts.append(model)
            self.ledger_events[account_id], self.ledger_grants[account_id] = {}, []
            if grants[i]:
                run_in(self.loop, self.store.grant(account_id, grants[i]))
                model.extra += grants[i]
                model.granted += grants[i]
                model.grants.append(grants[i])
        self.now = (max(a.anchor for a in self.accounts) // STEP + 1) * STEP + STEP // 2

    # ------------------------------------------------------------ reserve

    @rule(data=st.data(), prompt=st.integers(1, 3000), output=st.integers(0, 3000),
          rows=st.sets(st.sampled_from(range(len(ROWS)))))
    def reserve(self, data: st.DataObject, prompt: int, output: int, rows: set[int]) -> None:
        """A new request: held in full, lowered to what the balance or a limit affords, or refused."""
        acct = data.draw(st.sampled_from(self.accounts), label="account")
        key_id = data.draw(st.sampled_from(acct.key_ids), label="key")
        self._reserve(acct, key_id, prompt, output, tuple(r for i, r in enumerate(ROWS) if i in rows))

    @rule(data=st.data(), sizes=st.lists(st.tuples(st.integers(1, 800), st.integers(0, 800)), min_size=2, max_size=4))
    def reserve_burst(self, data: st.DataObject, sizes: list[tuple[int, int]]) -> None:
        """Several requests of one key at once, under every limit row (some are refused by a limit)."""
        acct = data.draw(st.sampled_from(self.accounts), label="account")
        key_id = data.draw(st.sampled_from(acct.key_ids), label="key")
        for prompt, output in sizes:
            self._reserve(acct, key_id, prompt, output, ROWS)

    def _recent_windows(self) -> list[tuple[AccountModel, str, int]]:
        """(account, key id, newest bucket) of every rolling window the clock can still move to the edge of."""
        out = []
        for acct in self.accounts:
            for key_id in acct.key_ids:
                buckets = acct.windows.get(scoped(RPM, key_id), {})
                if buckets and (max(buckets) + RPM.window_ms // STEP) * STEP + STEP // 2 > self.now:
                    out.append((acct, key_id, max(buckets)))
        return out

    @precondition(lambda self: self._recent_windows())
    @rule(data=st.data(), age=st.sampled_from([RPM.window_ms // STEP - 1, RPM.window_ms // STEP]))
    def probe_a_window_at_its_edge(self, data: st.DataObject, age: int) -> None:
        """The clock moves to where a key's newest request-window bucket is just inside or just
        outside its one-minute window, and a probe asks what the window counts."""
        acct, key_id, newest = data.draw(st.sampled_from(self._recent_windows()), label="window")
        self.now = max(self.now, (newest + age) * STEP + STEP // 2)
        self._reserve(acct, key_id, 1, 0, (replace(RPM, cap=0),))

    def _reserve(self, acct: AccountModel, key_id: str, prompt: int, output: int, chosen: tuple[Limit, ...]) -> None:
        rid = self.fresh_rid(acct)
        priced_plan = acct.plan
        q = quote(self.config.rates(priced_plan, self.route), prompt, output)
        usd = quote(self.config.usd_rates(self.route), prompt, output)
        cycle = cycle_bounds(acct.anchor, "UTC", self.now)
        spec = ReserveSpec(prompt + output, prompt + min(output, 1), usd.full_cost, usd.min_cost, encode(list(chosen)),
                           cycle, self.allowance(priced_plan), "free", self.allowance("free"))
        call = self.meter.reserve(acct.keys, key_id, rid, priced_plan, q, spec)
        if acct.status != "active":  # checked before the key and before the cycle rolls: nothing written
            with pytest.raises(AccountInactive) as inactive:
                self.call(call)
            assert inactive.value.code == f"account_{acct.status}"
            return
        if key_id in acct.revoked:
            with pytest.raises(Unauthorized):
                self.call(call)
            return
        if self.now >= acct.cycle_end:
            acct.roll(cycle[1], self.allowance(priced_plan))
        if acct.plan != priced_plan:
            with pytest.raises(PlanChanged) as changed:
                self.call(call)
            assert changed.value.plan == acct.plan
            return
        available = acct.available
        if available < q.min_cost:
            with pytest.raises(InsufficientCredits) as poor:
                self.call(call)
            assert (poor.value.available_micro, poor.value.held_micro) == (available, acct.held)
            return
        want = {"c": min(q.full_cost, available), "t": spec.tokens_full, "u": spec.usd_full, "n": 1}
        least = {"c": q.min_cost, "t": spec.tokens_min, "u": spec.usd_min, "n": 1}
        budget_held = self._key_budgets_allow(acct, key_id, want, least, call)
        if budget_held is None:
            return
        for row in chosen:
            used = acct.limit_used(row, key_id, self.now)
            if row.cap - used < least[row.metric]:
                with pytest.raises(LimitReached) as reached:
                    self.call(call)
                got = reached.value
                assert (got.limit_id, got.used, got.cap, got.scope) == (row.id, used, row.cap, row.scope)
                return
            want[row.metric] = min(want[row.metric], row.cap - used)
        lowered = want["c"] < q.full_cost or want["t"] < spec.tokens_full or want["u"] < spec.usd_full
        hold = Hold(rid, key_id, want["c"], max(min(want["c"], acct.allow - acct.held_allow), 0), acct.agen, lowered,
                    want["t"], want["u"], chosen, {**{name: want["c"] for name in budget_held},
                                                   **{"h:" + scoped(r, key_id): want[r.metric] for r in chosen}},
                    self.now + LEASE_MS, (key_id, priced_plan, q, spec), key_id if budget_held else None)
        got_res = self.call(call)
        assert got_res == Reservation(rid, hold.amount, available - hold.amount, lowered, hold.tokens, hold.usd)
        acct.holds[rid] = hold

    def _live(self) -> list[str]:
        return sorted(rid for a in self.accounts for rid in a.holds)

    def _ended(self, *hows: str, forgotten_too: bool = False) -> list[str]:
        """Request ids whose hold ended so (by default only those Redis still remembers)."""
        return sorted(rid for a in self.accounts for rid, e in a.ended.items()
                      if e.how in hows and (e.remembered or forgotten_too))

    def _pick_hold(self, data: st.DataObject) -> tuple[AccountModel, Hold]:
        rid = data.draw(st.sampled_from(self._live()), label="hold")
        return self.owner[rid], self.owner[rid].holds[rid]

    @precondition(lambda self: self._live() or self._ended("settled", "released", "reaped"))
    @rule(data=st.data())
    def retried_reserve(self, data: st.DataObject) -> None:
        """A reserve whose reply was lost, retried: the same hold again (nothing more held), or a
        refusal when the request has already ended (its tombstone)."""
        live = self._live()
        if live and data.draw(st.booleans(), label="live"):
            acct, hold = self._pick_hold(data)
            key_id, plan, q, spec = hold.spec
            got = self.call(self.meter.reserve(acct.keys, key_id, hold.rid, plan, q, spec))
            assert got == Reservation(hold.rid, hold.amount, acct.available, hold.lowered, hold.tokens, hold.usd)
            return
        ended = self._ended("settled", "released", "reaped")
        if not ended:
            return
        rid = data.draw(st.sampled_from(ended), label="ended")
        acct = self.owner[rid]
        q = quote(self.config.rates(acct.plan, self.route), 10, 10)
        spec = ReserveSpec(20, 11, 0, 0, "", cycle_bounds(acct.anchor, "UTC", self.now), self.allowance(acct.plan),
                           "free", 0)
        with pytest.raises(StoreUnavailable):
            self.call(self.meter.reserve(acct.keys, acct.key_ids[0], rid, acct.plan, q, spec))

    @rule(data=st.data())
    def cancel_then_reserve(self, data: st.DataObject) -> None:
        """A reserve that timed out is cancelled by request id before it runs: it is then refused."""
        acct = data.draw(st.sampled_from(self.accounts), label="account")
        rid = self.fresh_rid(acct)
        assert self.call(self.meter.release(acct.keys, rid, "cancelled")) is False
        acct.ended[rid] = Ended("released", self.now + TOMBSTONE_MS)
        q = quote(self.config.rates(acct.plan, self.route), 10, 10)
        spec = ReserveSpec(20, 11, 0, 0, encode(list(ROWS)), cycle_bounds(acct.anchor, "UTC", self.now),
                           self.allowance(acct.plan), "free", 0)
        with pytest.raises(StoreUnavailable):
            self.call(self.meter.reserve(acct.keys, acct.key_ids[0], rid, acct.plan, q, spec))

    # ------------------------------------------------------------ ending holds

    def _settle(self, acct: AccountModel, rid: str, hold: Hold | None, rows: tuple[Limit, ...], key_id: str,
                actual: int, tokens: int, usd: int, budget: str | None = None) -> None:
        expected = acct.end_hold(hold, actual)
        if budget and expected:  # a hold under a key budget: its charge counts there, this cycle and for ever
            for counters, name in ((acct.cycle_counters, f"c:a:key_budget:{budget}"),
                                   (acct.lifetime_counters, f"l:a:key_lifetime:{budget}")):
                counters[name] = counters.get(name, 0) + expected
        got = self.call(self.meter.settle(acct.keys, rid, key_id, actual, {"outcome": "model"}, encode(list(rows)),
                                          tokens, usd))
        acct.charged += expected
        acct.cycle_used += expected
        acct.uncollected += actual - expected
        acct.requests += 1
        acct.cycle_requests += 1
        acct.tokens += tokens
        acct.cycle_tokens += tokens
        acct.count(rows, key_id, {"c": expected, "t": tokens, "u": usd, "n": 1}, self.now, windows_only=False)
        acct.ended[rid] = Ended("settled", self.now + TOMBSTONE_MS)
        acct.events.setdefault(rid, []).append(
            ("usage", expected, hold.amount if hold else 0, actual - expected, int(hold is None), key_id))
        assert (got.settled, got.charged, got.available) == (True, expected, acct.available)
        assert got.cycle_used == acct.cycle_used

    @precondition(lambda self: self._live())
    @rule(data=st.data(), how=st.sampled_from(["below", "equal"]))
    def settle(self, data: st.DataObject, how: str) -> None:
        """The provider's usage arrives: charge it, release the rest of the hold."""
        acct, hold = self._pick_hold(data)
        self._settle_hold(data, acct, hold, data.draw(st.integers(0, max(hold.amount - 1, 0)), label="actual")
                          if how == "below" else hold.amount)

    @precondition(lambda self: self._live())
    @rule(data=st.data(), over=st.integers(1, 5000))
    def settle_above_the_hold(self, data: st.DataObject, over: int) -> None:
        """Usage above the hold (an estimate, a provider's surprise): the excess comes only out of
        credits no other hold claims; the rest is recorded as uncollected."""
        acct, hold = self._pick_hold(data)
        self._settle_hold(data, acct, hold, hold.amount + over)

    def _settle_hold(self, data: st.DataObject, acct: AccountModel, hold: Hold, actual: int) -> None:
        tokens = data.draw(st.integers(0, hold.tokens + 500), label="tokens")
        usd = data.draw(st.integers(0, hold.usd), label="usd")
        self._settle(acct, hold.rid, hold, hold.rows, hold.key_id, actual, tokens, usd, hold.budget)

    @precondition(lambda self: self._ended("reaped", forgotten_too=True))
    @rule(data=st.data(), actual=st.integers(0, 6000), tokens=st.integers(0, 3000))
    def settle_after_reap(self, data: st.DataObject, actual: int, tokens: int) -> None:
        """A request whose lease ran out (reaped) settles late: still charged, out of unclaimed credits."""
        rid = data.draw(st.sampled_from(self._ended("reaped", forgotten_too=True)), label="reaped")
        acct, ended = self.owner[rid], self.owner[rid].ended[rid]
        # its key's budget is known while Redis remembers the reaped hold (`~r <key>`), not after
        self._settle(acct, rid, None, ended.rows, ended.key_id, actual, tokens, 0,
                     ended.budget if ended.remembered else None)

    @precondition(lambda self: self._ended("settled", "released", "reaped"))
    @rule(data=st.data(), actual=st.integers(0, 6000), settle=st.booleans())
    def retried_end(self, data: st.DataObject, actual: int, settle: bool) -> None:
        """A settle or release retried after its hold ended (settled or released; release after a reap):
        no effect at all. Only while Redis remembers the end (its tombstone, `Meter.tombstone_ms`): a
        settle retried after a reap has forgotten it is charged again, as a late settle of a reaped hold."""
        hows = ("settled", "released") if settle else ("settled", "released", "reaped")
        candidates = self._ended(*hows)
        if not candidates:
            return
        rid = data.draw(st.sampled_from(candidates), label="ended")
        acct = self.owner[rid]
        if settle:
            got = self.call(self.meter.settle(acct.keys, rid, acct.key_ids[0], actual, {}, encode(list(ROWS)), 5, 5))
            assert (got.settled, got.charged) == (False, 0)
        else:
            assert self.call(self.meter.release(acct.keys, rid, "retry", encode(list(ROWS)), acct.key_ids[0],
                                                True)) is False

    @precondition(lambda self: self._live())
    @rule(data=st.data(), answered=st.booleans())
    def release(self, data: st.DataObject, answered: bool) -> None:
        """The provider refused or never answered: no charge (a refusal counts in request windows)."""
        acct, hold = self._pick_hold(data)
        acct.end_hold(hold, 0)
        got = self.call(self.meter.release(acct.keys, hold.rid, "upstream", encode(list(hold.rows)), hold.key_id,
                                           answered))
        assert got is True
        if answered:
            acct.count(hold.rows, hold.key_id, {"c": 0, "t": 0, "u": 0, "n": 1}, self.now, windows_only=True)
        acct.ended[hold.rid] = Ended("released", self.now + TOMBSTONE_MS)
        acct.events.setdefault(hold.rid, []).append(("released", 0, hold.amount, "upstream"))

    # ------------------------------------------------------------ time, leases, reaper

    @rule(ms=st.sampled_from([10_000, 30_000, 50_000, 60_000, 70_000, 160_000, "past the cycle end"]))
    def advance(self, ms: int | str) -> None:
        """Time moves (by whole grid steps), or to an hour past every account's next cycle boundary."""
        if isinstance(ms, int):
            self.now += ms
        else:
            boundary = max(cycle_bounds(a.anchor, "UTC", self.now)[1] for a in self.accounts)
            self.now = (boundary // STEP + 3_600_000 // STEP) * STEP + STEP // 2

    @precondition(lambda self: any(a.held_allow for a in self.accounts))
    @rule(data=st.data(), prompt=st.integers(1, 800), output=st.integers(0, 800))
    def new_cycle_with_requests_in_flight(self, data: st.DataObject, prompt: int, output: int) -> None:
        """The billing cycle ends while requests hold allowance; the next reserve starts the new cycle
        (issue 10, hole 3): the held allowance is carried, only the unheld part expires."""
        acct = data.draw(st.sampled_from([a for a in self.accounts if a.held_allow]), label="account")
        self.advance("past the cycle end")
        key_id = data.draw(st.sampled_from(acct.key_ids), label="key")
        self._reserve(acct, key_id, prompt, output, ())

    def _reap(self, acct: AccountModel) -> tuple[int, int]:
        expired = [h for h in acct.holds.values() if h.lease_until <= self.now]
        for ended in acct.ended.values():
            if ended.remembered and ended.until <= self.now:
                ended.remembered = False
        for h in expired:
            acct.end_hold(h, 0)
            acct.ended[h.rid] = Ended("reaped", self.now + TOMBSTONE_MS, h.rows, h.key_id, budget=h.budget)
            acct.events.setdefault(h.rid, []).append(("reaped", 0, h.amount))
        expected = (len(expired), sum(h.amount for h in expired))
        assert self.call(self.meter.reap(acct.keys)) == expected
        return expected

    @rule(data=st.data())
    def reap(self, data: st.DataObject) -> None:
        """The reaper returns holds whose lease passed (their gateway is gone), once."""
        self._reap(data.draw(st.sampled_from(self.accounts), label="account"))

    @rule()
    def leases_pass_and_the_reaper_runs(self) -> None:
        """Every gateway goes quiet for a lease: the reaper returns what is in flight, everywhere."""
        self.now += LEASE_MS + STEP // 2
        for acct in self.accounts:
            self._reap(acct)

    @precondition(lambda self: any(a.holds for a in self.accounts))
    @rule(data=st.data())
    def renew(self, data: st.DataObject) -> None:
        """Renew some leases (ended requests among them are left alone)."""
        acct = data.draw(st.sampled_from([a for a in self.accounts if a.holds]), label="account")
        rids = data.draw(st.lists(st.sampled_from([*acct.holds, *acct.ended]), min_size=1, unique=True), label="rids")
        renewed = [acct.holds[rid] for rid in rids if rid in acct.holds]
        assert self.call(self.meter.renew(acct.keys, rids)) == len(renewed)
        for h in renewed:
            h.lease_until = self.now + LEASE_MS

    @precondition(lambda self: any(a.holds for a in self.accounts))
    @rule(data=st.data())
    def renew_all_then_reap_before_the_lease(self, data: st.DataObject) -> None:
        """A process renews its requests in flight; a reaper running just short of the new lease
        returns none of them."""
        acct = data.draw(st.sampled_from([a for a in self.accounts if a.holds]), label="account")
        assert self.call(self.meter.renew(acct.keys, list(acct.holds))) == len(acct.holds)
        for h in acct.holds.values():
            h.lease_until = self.now + LEASE_MS
        self.now += LEASE_MS - STEP // 2  # 5 s before the renewed leases end
        assert self._reap(acct) == (0, 0)

    # ------------------------------------------------------------ admin

    @rule(data=st.data(), amount=st.integers(1, 5000))
    def grant(self, data: st.DataObject, amount: int) -> None:
        acct = data.draw(st.sampled_from(self.accounts), label="account")
        if acct.status == "closed":  # a closed account takes no more credits
            with pytest.raises(Conflict):
                self.call(self.store.grant(acct.id, amount))
            return
        self.call(self.store.grant(acct.id, amount))
        acct.extra += amount
        acct.granted += amount
        acct.grants.append(amount)

    @precondition(lambda self: any(self.now < a.cycle_end for a in self.accounts))
    @rule(data=st.data(), plan=st.sampled_from(["free", "small", "big"]))
    def change_plan_next_cycle(self, data: st.DataObject, plan: str) -> None:
        """A plan change queued for the next cycle (applied by the reserve that starts it). Only while
        the account's current cycle has not ended: a change queued after a boundary no reserve has
        crossed yet waits for the boundary after (its own test below; here the store's clock and the
        model's could straddle a boundary)."""
        acct = data.draw(st.sampled_from([a for a in self.accounts if self.now < a.cycle_end]), label="account")
        got = self.call(self.store.change_plan(self.config, acct.id, plan, "next_cycle"))
        assert (got["plan"], got["next_plan"]) == (acct.plan, plan)
        acct.next_plan, acct.next_allow = plan, self.allowance(plan)

    @precondition(lambda self: not any(a.revoked for a in self.accounts)
                  and any(len(a.key_ids) > 1 for a in self.accounts))
    @rule(data=st.data())
    def revoke_key(self, data: st.DataObject) -> None:
        """A key is revoked (once per example, never an account's only key): its reserves are refused."""
        acct = data.draw(st.sampled_from([a for a in self.accounts if len(a.key_ids) > 1]), label="account")
        key_id = data.draw(st.sampled_from(acct.key_ids), label="key")
        self.call(self.store.revoke_key(key_id))
        acct.revoked.add(key_id)

    @rule(data=st.data(), action=st.sampled_from(["suspend", "reactivate", "reactivate", "close"]))
    def lifecycle(self, data: st.DataObject, action: str) -> None:
        """An operator suspends, reactivates or closes an account: its new reserves are refused while
        it is not active (checked in `_reserve`), its requests in flight still settle, release and are
        reaped by the other rules exactly as before, and closed is final. At most one account per
        example is closed, so the others keep the rest of the example meaningful."""
        acct = data.draw(st.sampled_from(self.accounts), label="account")
        if action == "close" and acct.status != "closed" and any(a.status == "closed" for a in self.accounts):
            action = "suspend"
        if acct.status == "closed" and action != "close":
            with pytest.raises(Conflict):
                self.call(set_status(self.store, acct.id, action, "model"))
            return
        after = self.call(set_status(self.store, acct.id, action, "model"))
        acct.status = {"suspend": "suspended", "reactivate": "active", "close": "closed"}[action]
        assert after == acct.status

    # ------------------------------------------------------------ per-key budgets (issue 15.4)

    def _key_budgets_allow(self, acct: AccountModel, key_id: str, want: dict[str, int], least: dict[str, int],
                           call: Coroutine[Any, Any, Any]) -> list[str] | None:
        """The key's budgets, checked before every limit row: each lowers the hold to its room (what it
        allows less what it spent, this cycle or for ever, and what requests in flight hold of it), or
        refuses the request (402) when not even the prompt fits. Returns the held fields the budgets
        take (in the script's order), or None after checking the refusal."""
        per_cycle, lifetime = acct.key_budgets.get(key_id, (None, None))
        held = acct.limit_holds()
        fields = []
        for which, cap, spent, name in (
                ("cycle", per_cycle, acct.cycle_counters.get(f"c:a:key_budget:{key_id}", 0), "key_budget"),
                ("lifetime", lifetime, acct.lifetime_counters.get(f"l:a:key_lifetime:{key_id}", 0), "key_lifetime")):
            if cap is None:
                continue
            used = spent + held.get(f"h:a:{name}:{key_id}", 0)
            if cap - used < least["c"]:
                with pytest.raises(KeyBudgetExhausted) as refused:
                    self.call(call)
                assert (refused.value.limited_by, refused.value.available_micro) == (f"key_budget_{which}",
                                                                                     max(cap - used, 0))
                return None
            want["c"] = min(want["c"], cap - used)
            fields.append(f"h:a:{name}:{key_id}")
        return fields

    @rule(data=st.data(), per_cycle=st.none() | st.integers(1, 8000), lifetime=st.none() | st.integers(1, 20000))
    def set_key_budget(self, data: st.DataObject, per_cycle: int | None, lifetime: int | None) -> None:
        """An operator sets (or removes) a key's budgets; the next reserve applies them, holds in flight
        keep what they hold, and what the key spent so far still counts."""
        acct = data.draw(st.sampled_from(self.accounts), label="account")
        key_id = data.draw(st.sampled_from(acct.key_ids), label="key")
        view = self.call(self.store.update_key(key_id, budgets={"budget_cycle": per_cycle, "budget_life": lifetime}))
        assert (view["budget_credits_per_cycle_micro"], view["budget_credits_lifetime_micro"]) == (per_cycle, lifetime)
        acct.key_budgets[key_id] = (per_cycle, lifetime)

    @invariant()
    def key_budget_counters_match_the_model(self) -> None:
        """Each key's lifetime spend (its per-cycle spend and holds are checked with the other limits)."""
        for acct, (_raw, _holds, _expiry, lim, _events) in zip(self.accounts, self._read(), strict=True):
            lifetime = {k: int(v) for k, v in lim.items() if k.startswith("l:") and int(v) != 0}
            assert lifetime == {k: v for k, v in acct.lifetime_counters.items() if v != 0}

    # ------------------------------------------------------------ adjustments (issue 15)

    @rule(data=st.data(), amount=st.integers(-6000, 6000).filter(bool), replay=st.booleans())
    def adjust(self, data: st.DataObject, amount: int, replay: bool) -> None:
        """A refund (to purchased credits) or a deduction (from what no hold claims, purchased first,
        refused past it), once per idempotency key: a replay changes nothing and answers the first
        result; the same key with another amount is refused."""
        acct = data.draw(st.sampled_from(self.accounts), label="account")
        if replay and acct.adjustment_keys:
            key = data.draw(st.sampled_from(sorted(acct.adjustment_keys)), label="key")
            first, available = acct.adjustment_keys[key]
            got = self.call(adjust(self.store, acct.id, first, "model", key))
            assert (got.replayed, got.available) == (True, available)
            if amount != first:
                with pytest.raises(Unprocessable):
                    self.call(adjust(self.store, acct.id, amount, "model", key))
            return
        key = f"adj-{uuid.uuid4().hex[:8]}"
        free_extra = max(acct.extra - max(acct.held - acct.held_allow, 0), 0)
        free_allow = max(acct.allow - acct.held_allow, 0)
        most = max(min(acct.available, free_extra + free_allow), 0)
        if -amount > most:
            with pytest.raises(Conflict):
                self.call(adjust(self.store, acct.id, amount, "model", key))
            return
        if amount > 0:
            acct.extra += amount
        else:
            from_extra = min(-amount, free_extra)
            acct.extra -= from_extra
            acct.allow -= -amount - from_extra
        acct.granted += amount
        acct.adjusted += amount
        got = self.call(adjust(self.store, acct.id, amount, "model", key))
        assert (got.replayed, got.available) == (False, acct.available)
        acct.adjustment_keys[key] = (amount, acct.available)
        adjusted = run_in(self.loop, self.redis.hget(acct.keys.account, "adjusted"))
        assert int(adjusted or 0) == acct.adjusted

    # ------------------------------------------------------------ invariants

    def _read(self) -> list[list[Any]]:
        async def read() -> list[list[Any]]:
            pipe = self.redis.pipeline(transaction=False)
            for a in self.accounts:
                pipe.hgetall(a.keys.account)
                pipe.hgetall(a.keys.holds)
                pipe.zrange(a.keys.hold_expiry, 0, -1, withscores=True)
                pipe.hgetall(a.keys.limits)
                pipe.xrange(a.keys.ledger, min=f"({self.ledger_seen[a.id]}" if a.id in self.ledger_seen else "-")
            replies = await pipe.execute()
            return [replies[i:i + 5] for i in range(0, len(replies), 5)]

        return run_in(self.loop, read())

    @invariant()
    def redis_matches_the_model(self) -> None:
        for acct, (raw, holds, expiry, lim, new_events) in zip(self.accounts, self._read(), strict=True):
            self._check_balances(acct, raw, holds)
            self._check_holds(acct, holds, expiry)
            self._check_limits(acct, lim)
            self._check_ledger(acct, raw, new_events)

    def _check_balances(self, acct: AccountModel, raw: dict[str, str], holds: dict[str, str]) -> None:
        n = {f: int(raw.get(f) or 0) for f in ("allow", "extra", "held", "held_allow", "charged", "granted", "expired",
                                                "uncollected", "agen", "cycle_used", "requests", "cycle_requests",
                                                "tokens", "cycle_tokens", "cycle_end_ms")}
        # the invariants on Redis alone (invariant 2), whatever the model says
        assert n["allow"] >= 0 and n["extra"] >= 0 and n["held"] >= 0 and n["held_allow"] <= n["allow"], n
        live = [v.split() for v in holds.values() if not v.startswith("~")]
        assert n["held"] == sum(int(f[0]) for f in live) and n["held_allow"] == sum(int(f[1]) for f in live), (n, live)
        assert n["granted"] == n["allow"] + n["extra"] + n["charged"] + n["expired"], n
        # ... and each field as the model has it
        expected = {"allow": acct.allow, "extra": acct.extra, "held": acct.held, "held_allow": acct.held_allow,
                    "charged": acct.charged, "granted": acct.granted, "expired": acct.expired,
                    "uncollected": acct.uncollected, "agen": acct.agen, "cycle_used": acct.cycle_used,
                    "requests": acct.requests, "cycle_requests": acct.cycle_requests, "tokens": acct.tokens,
                    "cycle_tokens": acct.cycle_tokens, "cycle_end_ms": acct.cycle_end}
        assert n == expected, {f: (n[f], v) for f, v in expected.items() if n[f] != v}
        assert (raw["plan"], raw.get("next_plan"), raw["status"]) == (acct.plan, acct.next_plan, acct.status)
        assert int(raw.get("next_allow") or 0) == (acct.next_allow if acct.next_plan else 0)

    def _check_holds(self, acct: AccountModel, holds: dict[str, str], expiry: list[tuple[str, float]]) -> None:
        expected = {rid: h.record() for rid, h in acct.holds.items()}
        expected.update({rid: e.tombstone() for rid, e in acct.ended.items() if e.remembered})
        assert holds == expected
        scores = {rid: int(score) for rid, score in expiry}
        assert set(scores) == set(expected)
        due = {rid: h.lease_until for rid, h in acct.holds.items()}
        due.update({rid: e.until for rid, e in acct.ended.items() if e.remembered})
        late = {rid: (scores[rid], due[rid]) for rid in due if not 0 <= scores[rid] - due[rid] < STEP // 2}
        assert not late, late  # within the time a call takes

    def _check_limits(self, acct: AccountModel, lim: dict[str, str]) -> None:
        counters = {k: int(v) for k, v in lim.items() if k[:2] in ("c:", "h:") and int(v) != 0}
        expected = {k: v for k, v in {**acct.cycle_counters, **acct.limit_holds()}.items() if v != 0}
        assert counters == expected
        records = {k[2:]: v for k, v in lim.items() if k.startswith("r:")}
        assert records == {rid: " ".join(f"{f} {v}" for f, v in h.limit_held.items())
                           for rid, h in acct.holds.items() if h.limit_held}
        for name, buckets in acct.windows.items():
            fields = {int(k.rsplit(":", 1)[1]): int(v) for k, v in lim.items() if k.startswith(f"w:{name}:")}
            assert fields == buckets, name
            assert {int(b) for b in lim.get(f"b:{name}", "").split()} == set(buckets), name
            row = ROW[name.rsplit(":", 1)[1]]
            assert len(fields) <= row.window_ms // row.bucket_ms + 1, name  # nothing older than the window
        window_names = {k.rsplit(":", 1)[0][2:] for k in lim if k.startswith("w:")}
        assert window_names <= set(acct.windows)

    def _check_ledger(self, acct: AccountModel, raw: dict[str, str], new_events: list[Any]) -> None:
        seen = self.ledger_events[acct.id]
        for event_id, f in new_events:
            self.ledger_seen[acct.id] = event_id
            if f["type"] == "usage":
                seen.setdefault(f["rid"], []).append((
                    "usage", int(f["cost"]), int(f["hold"]), int(f["uncollected"]), int(f["reaped"]), f["key_id"]))
            elif f["type"] == "released":
                seen.setdefault(f["rid"], []).append(("released", int(f["cost"]), int(f["hold"]), f["reason"]))
            elif f["type"] == "reaped":
                seen.setdefault(f["rid"], []).append(("reaped", int(f["cost"]), int(f["hold"])))
            elif f["type"] == "grant":
                self.ledger_grants[acct.id].append(int(f["amount"]))
        # every request ends exactly once (a reaped one may still settle once); usage sums to charged
        for rid, events in seen.items():
            assert [e[0] for e in events] in (["usage"], ["released"], ["reaped"], ["reaped", "usage"]), rid
        assert sum(e[1] for events in seen.values() for e in events if e[0] == "usage") == int(raw["charged"])
        assert seen == acct.events
        assert self.ledger_grants[acct.id] == acct.grants


async def test_a_downgrade_queued_after_an_unseen_cycle_boundary_waits_for_the_next_boundary(
        redis_url: str, config_dir: Path) -> None:
    """An account on `big` makes no request across its cycle boundary; an hour later a downgrade to
    `free` is queued for the next cycle. The cycle that began at the boundary is still a `big` one."""
    config = load_config(config_dir)
    client = connect_redis(redis_url, 5.0)
    runner = ScriptRunner(client, load_scripts())
    schema = KeySchema(f"mm{uuid.uuid4().hex[:10]}:")
    store, meter = Store(client, schema, runner), Meter(runner, lease_ms=LEASE_MS)
    try:
        account = await store.create_account(config, "quiet", "big")
        key = await store.create_key(account)
        keys = schema.for_account(account)
        raw = await client.hgetall(keys.account)
        now = int(raw["cycle_end_ms"]) + 3_600_000  # an hour into the next cycle, unseen by any reserve
        seconds, micros = await client.time()
        meter.clock_offset_ms = store.clock_offset_ms = now - (int(seconds) * 1000 + int(micros) // 1000)
        await store.change_plan(config, account, "free", "next_cycle")
        route = config.route(MODEL)
        assert route is not None
        q = quote(config.rates("big", route), 10, 10)
        spec = ReserveSpec(20, 11, 0, 0, "", cycle_bounds(int(raw["anchor_ms"]), "UTC", now),
                           config.plans["big"].monthly_credits, "free", 0)
        held = await meter.reserve(keys, key.id, "req_1", "big", q, spec)  # actual: PlanChanged('free')
        rec = await client.hgetall(keys.account)
        assert (rec["plan"], rec.get("next_plan")) == ("big", "free")
        assert int(rec["allow"]) == config.plans["big"].monthly_credits and held.hold == q.full_cost
    finally:
        names = [name async for name in client.scan_iter(match=schema.prefix + "*", count=500)]
        if names:
            await client.delete(*names)
        await client.aclose()


def _settings() -> settings:
    return settings(
        max_examples=int(os.environ.get("MONEY_MODEL_EXAMPLES", "100")),
        stateful_step_count=int(os.environ.get("MONEY_MODEL_STEPS", "30")),
        derandomize=os.environ.get("MONEY_MODEL_RANDOM", "") != "1",
        database=None, deadline=None,
    )


def test_money_invariants_hold_in_any_interleaving(redis_url: str, config_dir: Path) -> None:
    """Invariants 2, 3, 7 and 8 of DESIGN.md, step by step, against the session's redis-server."""
    machine = type("Machine", (MoneyMachine,), {"redis_url": redis_url, "config": load_config(config_dir)})
    run_state_machine_as_test(machine, settings=_settings())

"""Reserve and settle: pure argument builders, and the Meter that runs the Lua scripts.

Pure functions price a request from integer rates (`quote`, `cost_of`, `affordable_output`);
`Meter` does the I/O: one script call to reserve, one to settle (or release).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gateway.config import Rates
from gateway.errors import GatewayError, InsufficientCredits, KeyBudgetExhausted, ScriptStatus, error_for_status
from gateway.keys import AccountKeys
from gateway.money import MAX_SAFE, MICRO, ceil_div
from gateway.scripts import ScriptRunner
from gateway.usage import Usage

#: The ledger event's encoder, built once (`json.dumps` with options builds one per call); same bytes.
_EVENT_JSON = json.JSONEncoder(separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Quote:
    """What a request may cost: the prompt bound, the worst case and the least useful answer."""

    prompt_tokens_bound: int
    max_output_tokens: int  # the worst case: cap (or model ceiling) times the number of choices
    prompt_cost: int
    full_cost: int
    min_cost: int


def token_cost(tokens: int, rate_per_mtok: int) -> int:
    """Micro-credits for `tokens` at a rate in micro-credits per 1M tokens, rounded up."""
    return ceil_div(tokens * rate_per_mtok, MICRO)


def tier_rates(rates: Rates, tier: str | None, echoed: bool = False) -> Rates:
    """The price sheet of a service tier. A tier the upstream does not list: for a tier the
    response names (`echoed`) or `auto`, the dearest listed; when no tier is named, the tier the
    request was held for; with no tiers configured, the base sheet."""
    if not rates.service_tiers:
        return rates
    if tier is None and not echoed:
        tier = rates.service_tier or "default"
    for name, _ppm, sheet in rates.service_tiers:
        if name == tier:
            return sheet
    if tier == "default" and not echoed:
        return rates  # the request named no tier and "default" is not listed: list prices
    return max(rates.service_tiers, key=lambda t: t[1])[2]


def prompt_rates(rates: Rates, prompt_tokens: int) -> Rates:
    """The prompt-size tier for a prompt of `prompt_tokens` tokens (all its tokens are priced there)."""
    chosen = rates
    for threshold, sheet in rates.above:
        if prompt_tokens > threshold:
            chosen = sheet
    return chosen


def _fees(rates: Rates, calls: tuple[tuple[str, int], ...]) -> int:
    fee = dict(rates.tool_fees)
    return sum(n * fee.get(kind, 0) for kind, n in calls)


def hold_rates(rates: Rates, prompt_tokens_bound: int) -> Rates:
    """The sheet a request's hold is priced with: its service tier, the tier of its prompt bound."""
    return prompt_rates(tier_rates(rates, rates.service_tier), prompt_tokens_bound + rates.extra_prompt_tokens)


def quote(rates: Rates, prompt_tokens_bound: int, max_output_tokens: int) -> Quote:
    """Price the worst case of a request whose prompt has at most `prompt_tokens_bound` tokens.

    The prompt is priced at the highest input rate, since the provider decides what is cached; the
    request's extra prompt allowance and its built-in tool calls (bound x fee) are held too.
    """
    bound = prompt_tokens_bound + rates.extra_prompt_tokens
    sheet = hold_rates(rates, prompt_tokens_bound)
    prompt_rate = max(sheet.input, sheet.cached_input, sheet.cache_write, sheet.cache_write_long)
    prompt_cost = token_cost(bound, prompt_rate) + rates.per_request + _fees(rates, rates.tool_calls)
    full = prompt_cost + token_cost(max_output_tokens, sheet.output)
    minimum = prompt_cost + token_cost(1, sheet.output) if max_output_tokens > 0 else prompt_cost
    if full > MAX_SAFE:
        raise ValueError("request cost exceeds the largest amount the store can hold")
    return Quote(bound, max_output_tokens, prompt_cost, full, minimum)


def affordable_output(rates: Rates, q: Quote, hold: int) -> int:
    """The most output tokens a hold of `hold` micro-credits pays for beyond the prompt bound."""
    budget = hold - q.prompt_cost
    if budget <= 0:
        return 0
    output = hold_rates(rates, q.prompt_tokens_bound - rates.extra_prompt_tokens).output
    if output == 0:
        return q.max_output_tokens
    return min(q.max_output_tokens, budget * MICRO // output)


def cost_of(rates: Rates, usage: Usage) -> int:
    """The exact charge for reported usage, in micro-credits (one rounding, upwards): at the service
    tier the response names, the prompt-size tier of the reported prompt, plus built-in tool calls
    as reported (the request's bound when the response reports none)."""
    prompt = sum(n or 0 for n in (usage.input_tokens, usage.cached_input_tokens, usage.cache_write_tokens,
                                  usage.cache_write_1h_tokens))
    tier = tier_rates(rates, usage.service_tier, echoed=usage.service_tier is not None)
    sheet = prompt_rates(tier, prompt)
    total = (
        (usage.input_tokens or 0) * sheet.input
        + (usage.cached_input_tokens or 0) * sheet.cached_input
        + (usage.cache_write_tokens or 0) * sheet.cache_write
        + (usage.cache_write_1h_tokens or 0) * sheet.cache_write_long
        + (usage.output_tokens or 0) * sheet.output
    )
    reported = dict(usage.tool_calls or ())
    calls = tuple((kind, reported.get(kind, bound) if usage.tool_calls is not None else bound)
                  for kind, bound in rates.tool_calls)
    return ceil_div(total, MICRO) + rates.per_request + _fees(rates, calls)


@dataclass(frozen=True, slots=True)
class Window:
    """The tightest request or token window a request was held under, after its hold (rate-limit headers)."""

    cap: int
    remaining: int
    reset_ms: int  # until it is whole again


@dataclass(frozen=True, slots=True)
class Reservation:
    """A granted hold."""

    request_id: str
    hold: int
    available_after: int
    lowered: bool
    held_tokens: int = 0
    held_usd: int = 0
    requests_window: Window | None = field(default=None, compare=False)
    tokens_window: Window | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class ReserveSpec:
    """Everything besides credits the reserve script checks: limits, their worst-case amounts, the cycle."""

    tokens_full: int
    tokens_min: int
    usd_full: int
    usd_min: int
    limits: str  # limits.encode(...)
    cycle: tuple[int, int]
    allowance: int
    fallback_plan: str
    fallback_allowance: int


@dataclass(frozen=True, slots=True)
class Settlement:
    """What a settle call did, and the account's cycle counters right after it (for alerts)."""

    settled: bool
    charged: int
    available: int
    cycle_used: int = 0
    cycle_start_ms: int = 0
    cycle_limits: tuple[tuple[str, int, int], ...] = ()  # (limit id, value after, cap)
    balance: int = 0  # allowance + purchased credits after the charge (holds not subtracted)


class CycleStale(Exception):
    """The billing cycle ended at a moment the caller's cycle bounds do not cover."""

    def __init__(self, redis_now_ms: int) -> None:
        super().__init__(redis_now_ms)
        self.now_ms = redis_now_ms


class LimitReached(Exception):
    """A limit refused the request: which one, its value, its cap and when it frees up."""

    def __init__(self, limit_id: str, used: int, cap: int, frees_in_ms: int, scope: str, metric: str = "n",
                 window_ms: int = 0) -> None:
        super().__init__(limit_id)
        self.limit_id, self.used, self.cap, self.frees_in_ms, self.scope = limit_id, used, cap, frees_in_ms, scope
        self.metric, self.window_ms = metric, window_ms  # window: 0 the cycle, -1 in flight, > 0 rolling


class PlanChanged(Exception):
    """The account's plan differs from the one the request was priced with."""

    def __init__(self, plan: str) -> None:
        super().__init__(plan)
        self.plan = plan


class Meter:
    """Runs the reserve / settle / release / reap scripts for one gateway process."""

    def __init__(self, runner: ScriptRunner, lease_ms: int, clock_offset_ms: int = 0,
                 tombstone_ms: int = 3_600_000) -> None:
        self.runner = runner
        self.lease_ms = lease_ms
        self.clock_offset_ms = clock_offset_ms
        self.tombstone_ms = max(tombstone_ms, 2 * lease_ms)  # an ended hold is remembered this long

    async def reserve(self, keys: AccountKeys, key_id: str, request_id: str, plan: str, q: Quote,
                      spec: ReserveSpec) -> Reservation:
        """Hold the worst case of a request in the balance and every limit; raises the refusal."""
        reply = await self.runner.run(
            "reserve",
            [keys.account, keys.api_key(key_id), keys.holds, keys.hold_expiry, keys.limits],
            [request_id, plan, q.full_cost, q.min_cost, self.lease_ms, self.clock_offset_ms, key_id,
             spec.tokens_full, spec.tokens_min, spec.usd_full, spec.usd_min, spec.limits, spec.cycle[0],
             spec.cycle[1], spec.allowance, spec.fallback_plan, spec.fallback_allowance],
        )
        status, hold, available, actual_plan = reply[:4]
        if status == ScriptStatus.PLAN_CHANGED:
            raise PlanChanged(str(actual_plan))
        if status == ScriptStatus.CYCLE_STALE:
            raise CycleStale(int(reply[6]))
        if status == ScriptStatus.LIMIT_REACHED:
            raise LimitReached(str(reply[6]), int(reply[7]), int(reply[8]), int(reply[9]), str(reply[10]),
                               str(reply[11]), int(reply[12]))
        if status == ScriptStatus.KEY_BUDGET:
            raise KeyBudgetExhausted(str(reply[6]), int(available), int(reply[8]), q.min_cost)
        error: GatewayError | None = error_for_status(int(status), available_micro=int(available))
        if isinstance(error, InsufficientCredits):
            error.held_micro, error.needed_micro = int(reply[4]), q.min_cost
        if error is not None:
            raise error
        windows = [Window(*(int(v) for v in reply[i:i + 3])) for i in (6, 9)] if len(reply) > 6 else [None, None]
        return Reservation(request_id, int(hold), int(available), status == ScriptStatus.LOWERED,
                           int(reply[4]), int(reply[5]), *(w if w and w.cap >= 0 else None for w in windows))

    async def settle(
        self, keys: AccountKeys, request_id: str, key_id: str, cost: int, event: dict[str, Any],
        limits: str = "", tokens: int = 0, usd: int = 0,
    ) -> Settlement:
        """Charge `cost`, release the rest of the hold and append one ledger event whose
        descriptive fields (`event`, None values dropped) travel as one JSON field.
        Settling twice has no effect (`settled` False the second time).
        """
        data = _EVENT_JSON.encode({k: v for k, v in event.items() if v is not None})
        reply = await self.runner.run(
            "settle",
            [keys.account, keys.holds, keys.hold_expiry, keys.ledger, keys.limits],
            [request_id, cost, self.clock_offset_ms, key_id, data, limits, tokens, usd, self.tombstone_ms],
        )
        if reply[0] != ScriptStatus.OK:
            return Settlement(False, 0, 0)
        rest = reply[6:]
        counters = tuple((str(rest[i]), int(rest[i + 1]), int(rest[i + 2])) for i in range(0, len(rest), 3))
        return Settlement(True, int(reply[1]), int(reply[2]), int(reply[3]), int(reply[4]), counters,
                          int(reply[5]))

    async def release(self, keys: AccountKeys, request_id: str, reason: str, limits: str = "", key_id: str = "",
                      provider_answered: bool = False) -> bool:
        """End a hold without charge; returns False when it had already ended (or was never taken:
        a cancelled reserve that runs later is then refused). A request the provider answered with a
        refusal still counts in rolling request windows."""
        status, _released = await self.runner.run(
            "release",
            [keys.account, keys.holds, keys.hold_expiry, keys.ledger, keys.limits],
            [request_id, reason, self.clock_offset_ms, self.tombstone_ms, limits, key_id,
             "1" if provider_answered else "0"],
        )
        return bool(status == ScriptStatus.OK)

    async def renew(self, keys: AccountKeys, request_ids: list[str]) -> int:
        """Extend the leases of holds still in flight; returns how many were renewed."""
        (renewed,) = await self.runner.run(
            "lease", [keys.holds, keys.hold_expiry], [self.clock_offset_ms, self.lease_ms, *request_ids])
        return int(renewed)

    async def reap(self, keys: AccountKeys, limit: int = 100) -> tuple[int, int]:
        """Return expired holds of one account; (holds reaped, micro-credits returned)."""
        count, returned = await self.runner.run(
            "reap",
            [keys.account, keys.holds, keys.hold_expiry, keys.ledger, keys.limits],
            [self.clock_offset_ms, limit, self.tombstone_ms],
        )
        return int(count), int(returned)

"""Ending a metered request's hold exactly once: settled from reported usage, settled from an
estimate (the answer was served but its usage never arrived), or released (the provider refused it
or never answered). Once the upstream has answered 2xx the request is charged, whatever the client
or Redis does meanwhile: a settlement Redis cannot take now is queued in the process and retried
(`gateway.settlement.Retries`), never dropped silently (invariant 7).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from gateway import alerts
from gateway.auth import Principal
from gateway.config import ModelRoute, Rates
from gateway.dialects.base import Dialect, ParsedRequest
from gateway.keys import AccountKeys
from gateway.logs import Access, outcome_of
from gateway.metering import Quote, Reservation, Settlement, cost_of
from gateway.money import MAX_SAFE
from gateway.settlement import land
from gateway.state import Gateway
from gateway.usage import Usage

log = logging.getLogger("gateway.billing")


@dataclass
class Call:
    """One metered request in flight."""

    gw: Gateway
    dialect: Dialect
    principal: Principal
    parsed: ParsedRequest
    route: ModelRoute
    rates: Rates
    quote: Quote
    reservation: Reservation
    request_id: str
    started: float
    limits: str = ""  # the limits the hold was taken under (limits.encode)
    usd_quote: Quote | None = None
    usd_rates: Rates | None = None  # the provider's list price of this request (USD limits, the ledger)
    overhead: float = 0.0
    served: bool = False  # the upstream answered 2xx: from now on the request is charged
    ended: bool = False
    access: Access = field(default_factory=lambda: Access("", None, None, ""))  # the access record (gateway.logs)

    @property
    def keys(self) -> AccountKeys:
        return self.gw.schema.for_account(self.principal.account_id)


def billable(usage: Usage | None, parsed: ParsedRequest, estimate_out: int) -> tuple[Usage, bool]:
    """What to bill a served request: reported usage, with any missing count filled from the
    estimates (the prompt at least, at the input rate; the output seen, or `estimate_out`)."""
    if usage is not None and usage.input_tokens is not None and usage.output_tokens is not None:
        return usage, False
    reported = usage or Usage()
    return replace(
        reported,
        input_tokens=reported.input_tokens if reported.input_tokens is not None else parsed.prompt_tokens_estimate,
        output_tokens=reported.output_tokens if reported.output_tokens is not None else estimate_out,
    ), True


async def end_call(call: Call, usage: Usage | None, *, outcome: str, http_status: int, lowered: int | None = None,
                   estimate_out: int = 0, streamed: bool = False, output_unknown: bool = False,
                   wait: bool = True) -> int:
    """End the hold exactly once. Called from the request's forwarding task, which the app keeps
    alive (`Gateway.track`) whatever the client does, so the settlement is awaited in it; with
    `wait` False it lands in a tracked task of its own and the answer goes out meanwhile. Returns
    credits available (an estimate from the reservation when the settlement had to be queued, or
    when `wait` is False). The hold's lease is renewed until its settlement or release has landed.
    `output_unknown`: the provider may have generated up to the cap and never said how much: an
    estimate is then the whole hold."""
    call.ended = True
    call.access.outcome = outcome_of(outcome)
    if not call.served:
        return await _release(call, outcome, http_status)
    charge = _priced(call, usage, outcome, http_status, lowered, estimate_out, streamed, output_unknown)
    if not wait:
        call.gw.track(asyncio.ensure_future(_settle(call, charge, http_status)))
        return _available_after(call, charge[0])
    return await _settle(call, charge, http_status)


def _available_after(call: Call, cost: int) -> int:
    """Credits available once this request's charge lands, from its reservation (other requests
    may have moved the balance since: the settle script's figure is the exact one)."""
    return max(call.reservation.available_after + call.reservation.hold - cost, 0)


async def _land(call: Call, op: str, attempt: Callable[[], Awaitable[Any]]) -> Any:
    """`settlement.land` for this call's hold."""
    return await land(call.gw.leases, call.gw.retries, call.principal.account_id, call.request_id, op, attempt)


async def _release(call: Call, outcome: str, http_status: int) -> int:
    gw = call.gw
    assert gw.meter is not None
    meter, keys, rid = gw.meter, call.keys, call.request_id
    answered = outcome.startswith("upstream_") and http_status >= 400  # the provider refused it

    async def attempt() -> None:
        await meter.release(keys, rid, outcome, call.limits, call.principal.key_id, provider_answered=answered)

    gw.metrics.requests.labels(call.dialect.name, call.route.pattern, str(http_status)).inc()
    try:
        await _land(call, "release", attempt)
    finally:
        call.access.call_ended(http_status)
    return call.reservation.available_after + call.reservation.hold


Priced = tuple[int, int, int, Usage, dict[str, Any]]  # cost, tokens, micro-USD, billed usage, ledger event


def _priced(call: Call, usage: Usage | None, outcome: str, http_status: int, lowered: int | None,
            estimate_out: int, streamed: bool, output_unknown: bool) -> Priced:
    try:
        return _charge(call, usage, outcome, http_status, lowered, estimate_out, streamed, output_unknown)
    except Exception:  # a bug must not make a served request free: charge its hold, and say so
        log.exception("pricing the settlement of %s failed; charging its hold", call.request_id)
        event = {"model": call.parsed.model, "route": call.route.pattern, "outcome": "pricing_failed",
                 "estimated": 1, "status": http_status}
        return call.reservation.hold, 0, 0, Usage(), event


async def _settle(call: Call, priced: Priced, http_status: int) -> int:
    gw = call.gw
    assert gw.meter is not None
    settle_started = time.perf_counter()
    cost, tokens, usd, bill, event = priced
    meter, keys = gw.meter, call.keys

    async def attempt() -> Settlement:
        settlement = await meter.settle(keys, call.request_id, call.principal.key_id, cost, event, call.limits,
                                        tokens, usd)
        _account(call, bill, settlement, cost, usd, http_status)
        return settlement

    access = call.access
    settlement: Settlement | None = None
    try:
        settlement = await _land(call, "settle", attempt)
    finally:  # the access record carries what was charged (it is written once the call has ended)
        access.input_tokens, access.output_tokens = bill.input_tokens, bill.output_tokens
        access.credits_micro = cost if settlement is None else settlement.charged if settlement.settled else 0
        access.settled = settlement is not None
        access.call_ended(http_status)
    if settlement is None:
        return _available_after(call, cost)
    gw.metrics.overhead_seconds.observe(call.overhead + time.perf_counter() - settle_started)
    return int(settlement.available)


def _charge(call: Call, usage: Usage | None, outcome: str, http_status: int, lowered: int | None,
            estimate_out: int, streamed: bool, output_unknown: bool = False
            ) -> tuple[int, int, int, Usage, dict[str, Any]]:
    """(cost, tokens, micro-USD, billed usage, ledger event) of a served request. Amounts are
    clamped below 2^53: a hostile upstream's huge counts can't break the scripts' integer maths."""
    model = call.route.pattern
    bill, estimated = billable(usage, call.parsed, estimate_out)
    cost = cost_of(call.rates, bill)
    if estimated:
        cost = min(cost, max(call.reservation.hold, cost_of(call.rates, Usage(input_tokens=bill.input_tokens))))
        if output_unknown:
            cost = max(cost, call.reservation.hold)
        call.gw.metrics.estimated.labels(model).inc()
        outcome += "_estimated"
        call.access.estimated = True
    event: dict[str, Any] = {
        "model": call.parsed.model, "route": model,
        "upstream": call.route.upstream, "endpoint": call.parsed.endpoint, "dialect": call.dialect.name,
        "in": bill.input_tokens, "cached_in": bill.cached_input_tokens, "cache_write": bill.cache_write_tokens,
        "cache_write_1h": bill.cache_write_1h_tokens,
        "out": bill.output_tokens, "reasoning": bill.reasoning_tokens, "status": http_status,
        "service_tier": bill.service_tier or call.rates.service_tier,
        "tool_calls": dict(bill.tool_calls) if bill.tool_calls is not None else None,
        "outcome": outcome, "estimated": int(estimated), "lowered_cap": lowered, "stream": int(streamed),
        "latency_ms": int((time.perf_counter() - call.started) * 1000),
        "client_request_id": call.access.client_request_id,  # the client's X-Request-ID: a label, never a key
    }
    tokens = sum(n or 0 for n in (bill.input_tokens, bill.cached_input_tokens, bill.cache_write_tokens,
                                  bill.cache_write_1h_tokens, bill.output_tokens))
    usd = cost_of(call.usd_rates, bill) if call.usd_rates is not None else 0
    event["usd_micro"] = min(usd, MAX_SAFE)  # the provider's list cost, for billing exports
    return min(cost, MAX_SAFE), min(tokens, MAX_SAFE), min(usd, MAX_SAFE), bill, event


def _account(call: Call, bill: Usage, settlement: Settlement, cost: int, usd: int, http_status: int) -> None:
    """Metrics and alerts of a settlement that landed."""
    gw, model = call.gw, call.route.pattern
    plan = gw.config.plans.get(call.principal.plan)
    if settlement.settled and plan is not None:  # warnings, off the request's path
        alerts.notify(gw, call.principal.account_id, plan, alerts.due(plan, settlement), call.request_id)
    gw.metrics.requests.labels(call.dialect.name, model, str(http_status)).inc()
    if not settlement.settled:
        return
    gw.metrics.credits.labels(model).inc(settlement.charged / 1_000_000)
    if usd:
        gw.metrics.usd.labels(model).inc(usd / 1_000_000)
    if cost > settlement.charged:
        gw.metrics.uncollected.inc((cost - settlement.charged) / 1_000_000)
    for kind, count in (("input", bill.input_tokens), ("cached_input", bill.cached_input_tokens),
                        ("cache_write", (bill.cache_write_tokens or 0) + (bill.cache_write_1h_tokens or 0)),
                        ("output", bill.output_tokens)):
        if count:
            gw.metrics.tokens.labels(model, kind).inc(count)

"""Ending a metered request's hold exactly once: settled from reported usage, settled from an
estimate (the answer was served but its usage never arrived), or released (the provider refused it
or never answered). Once the upstream has answered 2xx the request is charged, whatever the client
or Redis does meanwhile: a settlement Redis cannot take now is queued in the process and retried
(`gateway.settlement.Retries`), never dropped silently (invariant 7).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Any

from gateway import alerts
from gateway.auth import Principal
from gateway.config import ModelRoute, Rates
from gateway.dialects.base import Dialect, ParsedRequest
from gateway.dialects.drivers import admit
from gateway.errors import StoreUnavailable
from gateway.keys import AccountKeys
from gateway.metering import Quote, Reservation, Settlement, cost_of
from gateway.scripts import REDIS_DOWN
from gateway.state import Gateway
from gateway.usage import Usage


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
    overhead: float = 0.0
    served: bool = False  # the upstream answered 2xx: from now on the request is charged
    ended: bool = False

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
                   estimate_out: int = 0, streamed: bool = False) -> int:
    """End the hold exactly once, in a task that outlives the request. Returns credits available
    (an estimate from the reservation when the settlement had to be queued)."""
    call.ended = True
    call.gw.leases.discard(call.principal.account_id, call.request_id)
    if not call.served:
        task = call.gw.track(asyncio.ensure_future(_release(call, outcome, http_status)))
    else:
        task = call.gw.track(asyncio.ensure_future(
            _settle(call, usage, outcome, http_status, lowered, estimate_out, streamed)))
    return int(await asyncio.shield(task))


async def _release(call: Call, outcome: str, http_status: int) -> int:
    gw = call.gw
    assert gw.meter is not None
    meter, keys, rid = gw.meter, call.keys, call.request_id
    answered = outcome.startswith("upstream_") and http_status >= 400  # the provider refused it

    async def attempt() -> None:
        await meter.release(keys, rid, outcome, call.limits, call.principal.key_id, provider_answered=answered)

    gw.metrics.requests.labels(call.dialect.name, call.route.pattern, str(http_status)).inc()
    try:
        await attempt()
    except (StoreUnavailable, *REDIS_DOWN):
        gw.retries.add(rid, "release", attempt)
    return call.reservation.available_after + call.reservation.hold


async def _settle(call: Call, usage: Usage | None, outcome: str, http_status: int, lowered: int | None,
                  estimate_out: int, streamed: bool) -> int:
    gw = call.gw
    assert gw.meter is not None
    settle_started = time.perf_counter()
    model = call.route.pattern
    bill, estimated = billable(usage, call.parsed, estimate_out)
    cost = cost_of(call.rates, bill)
    if estimated:
        cost = min(cost, max(call.reservation.hold, cost_of(call.rates, Usage(input_tokens=bill.input_tokens))))
        gw.metrics.estimated.labels(model).inc()
        outcome += "_estimated"
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
    }
    tokens = sum(n or 0 for n in (bill.input_tokens, bill.cached_input_tokens, bill.cache_write_tokens,
                                  bill.cache_write_1h_tokens, bill.output_tokens))
    usd = cost_of(admit(gw.config.upstreams[call.route.upstream], gw.config.usd_rates(call.route),
                        call.parsed.drivers), bill)
    event["usd_micro"] = usd  # the provider's list cost, for billing exports
    meter, keys = gw.meter, call.keys

    async def attempt() -> Settlement:
        settlement = await meter.settle(keys, call.request_id, call.principal.key_id, cost, event, call.limits,
                                        tokens, usd)
        _account(call, bill, settlement, cost, http_status)
        return settlement

    try:
        settlement = await attempt()
    except (StoreUnavailable, *REDIS_DOWN):
        gw.retries.add(call.request_id, "settle", attempt)
        return max(call.reservation.available_after + call.reservation.hold - cost, 0)
    gw.metrics.overhead_seconds.observe(call.overhead + time.perf_counter() - settle_started)
    return settlement.available


def _account(call: Call, bill: Usage, settlement: Settlement, cost: int, http_status: int) -> None:
    """Metrics and alerts of a settlement that landed."""
    gw, model = call.gw, call.route.pattern
    plan = gw.config.plans.get(call.principal.plan)
    if settlement.settled and plan is not None:  # warnings, off the request's path
        alerts.notify(gw, call.principal.account_id, plan, alerts.due(plan, settlement), call.request_id)
    gw.metrics.requests.labels(call.dialect.name, model, str(http_status)).inc()
    if not settlement.settled:
        return
    gw.metrics.credits.labels(model).inc(settlement.charged / 1_000_000)
    if cost > settlement.charged:
        gw.metrics.uncollected.inc((cost - settlement.charged) / 1_000_000)
    for kind, count in (("input", bill.input_tokens), ("cached_input", bill.cached_input_tokens),
                        ("cache_write", (bill.cache_write_tokens or 0) + (bill.cache_write_1h_tokens or 0)),
                        ("output", bill.output_tokens)):
        if count:
            gw.metrics.tokens.labels(model, kind).inc(count)

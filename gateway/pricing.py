"""Pricing a request and holding its worst case: its route and rates, the limits that apply, the
reserve call (re-priced when the plan or the billing cycle moved), the 429 of a limit reached, and
the output cap a lowered hold affords."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway import alerts
from gateway.auth import Principal
from gateway.billing import Call
from gateway.config import ModelRoute, Plan, Rates
from gateway.dialects.base import Dialect, ParsedRequest
from gateway.dialects.drivers import admit
from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    InsufficientCredits,
    KeyBudgetExhausted,
    NotFound,
    RateLimited,
    StoreUnavailable,
)
from gateway.keys import AccountKeys
from gateway.limits import MINUTE_MS, Limit, applicable, cycle_bounds, describe, encode
from gateway.metering import (
    CycleStale,
    LimitReached,
    PlanChanged,
    Quote,
    Reservation,
    ReserveSpec,
    affordable_output,
    quote,
)
from gateway.signals import rate_headers
from gateway.state import Gateway


def route_for(gw: Gateway, dialect: Dialect, principal: Principal, model: str) -> tuple[ModelRoute, Plan]:
    """The model's route, if its upstream speaks the caller's dialect and the plan allows it."""
    route = gw.config.route(model)
    if route is None or gw.config.upstreams[route.upstream].dialect != dialect.name:
        raise NotFound(f"The model '{model}' does not exist or is not served by this gateway on this API.",
                       param="model")
    plan = gw.config.plans.get(principal.plan)
    if plan is None:
        raise Forbidden(f"Your account's plan '{principal.plan}' is not configured on this gateway.")
    if not gw.config.allows(plan, model):
        raise Forbidden(f"Your plan '{plan.name}' does not include the model '{model}'.", param="model")
    principal.check_scope(dialect.name, model)
    return route, plan


def price(gw: Gateway, dialect: Dialect, principal: Principal, parsed: ParsedRequest
           ) -> tuple[ModelRoute, Plan, Rates, Quote]:
    """Route the model, check the plan allows it, and quote the worst case."""
    route, plan = route_for(gw, dialect, principal, parsed.model)
    if parsed.output_cap is not None and parsed.output_cap > route.max_output_tokens:
        raise BadRequest(f"{parsed.cap_field} is too large: {parsed.output_cap}. This model supports at most "
                         f"{route.max_output_tokens} completion tokens.", param=parsed.cap_field)
    per_choice = route.max_output_tokens if parsed.output_cap is None else parsed.output_cap
    rates = request_rates(gw, route, parsed, gw.config.rates(plan.name, route))
    return route, plan, rates, quote(rates, parsed.prompt_tokens_bound, per_choice * parsed.choices)


def request_rates(gw: Gateway, route: ModelRoute, parsed: ParsedRequest, rates: Rates) -> Rates:
    """`rates` (a plan's, or the USD list price) with this request's cost drivers priced: its
    service tier, built-in tool calls and provider-held prompt allowance; a 400 naming the parameter
    for any the route's upstream does not price."""
    return admit(gw.config.upstreams[route.upstream], rates, parsed.drivers)


def reserve_spec(gw: Gateway, principal: Principal, plan: Plan, route: ModelRoute, parsed: ParsedRequest, q: Quote,
          now_ms: int | None) -> tuple[ReserveSpec, Quote, Rates]:
    """The limits that apply to this request, their worst-case amounts and the current cycle; and the
    provider's list price of the request (USD rates and quote) for USD limits and the ledger."""
    _limits, encoded = gw.config.memo(("limits", plan.name, route.upstream, principal.key_limits),
                                      lambda: _limit_rows(plan, route.upstream, principal.key_limits))
    usd_rates = request_rates(gw, route, parsed, gw.config.usd_rates(route))
    usd = quote(usd_rates, parsed.prompt_tokens_bound, q.max_output_tokens)
    cycle = current_cycle(gw, principal, plan, now_ms)
    fallback = gw.config.plans[gw.config.default_plan]
    bound = parsed.prompt_tokens_bound
    spec = ReserveSpec(bound + q.max_output_tokens, bound + min(q.max_output_tokens, 1), usd.full_cost, usd.min_cost,
                       encoded, cycle, plan.monthly_credits, fallback.name, fallback.monthly_credits)
    return spec, usd, usd_rates


def _limit_rows(plan: Plan, upstream: str, key_limits: tuple[Limit, ...]) -> tuple[tuple[Limit, ...], str]:
    """The limits that apply to a request of `plan` routed to `upstream` by a key with `key_limits`,
    and their rows as the reserve and settle scripts read them."""
    limits = (*applicable(plan.limits, upstream), *key_limits)
    return limits, encode(list(limits))


def limit_error(gw: Gateway, dialect: Dialect, plan: str, reached: LimitReached) -> RateLimited:
    """429 naming the plan, the limit, its current value and when it frees up, with the rate-limit
    headers of the caller's dialect. A limit whose window is longer than a minute (or the billing
    cycle), or a wait over a minute, says `x-should-retry: false`: the SDKs' automatic retries would
    otherwise sleep on it (openai and anthropic retry a 429 twice, honouring `retry-after`)."""
    seconds = max(1, -(-reached.frees_in_ms // 1000))
    whose = "this API key" if reached.scope == "k" else f"your plan '{plan}'"
    message = (f"Limit reached: {describe(reached.limit_id, reached.used, reached.cap, reached.metric)} "
               f"for {whose}. It frees up in {seconds} s.")
    headers = {"Retry-After": str(seconds), "retry-after-ms": str(max(reached.frees_in_ms, 0))}
    if seconds > 60 or reached.window_ms == 0 or reached.window_ms > MINUTE_MS:
        headers["x-should-retry"] = "false"
    if reached.metric in ("n", "t"):
        kind = "tokens" if reached.metric == "t" else "requests"
        headers.update(rate_headers(dialect.name, kind, reached.cap, reached.cap - reached.used,
                                    reached.frees_in_ms))
    return RateLimited(message, headers=headers)


def cancel_later(gw: Gateway, keys: AccountKeys, request_id: str) -> None:
    """A reserve whose answer never came may still run when Redis is back: cancel it by request id
    (the release leaves a tombstone that a late reserve refuses), so it never becomes a phantom hold."""
    meter = gw.meter
    assert meter is not None

    async def attempt() -> None:
        await meter.release(keys, request_id, "cancelled")

    gw.retries.add(request_id, "cancel", attempt)


def lowered_cap(call: Call) -> int | None:
    """The output cap per choice the hold affords, when the hold is below the worst case."""
    if not call.reservation.lowered:
        return None
    res = call.reservation
    affordable = min(affordable_output(call.rates, call.quote, res.hold),
                     max(res.held_tokens - call.parsed.prompt_tokens_bound, 0))
    if call.usd_quote is not None and call.usd_rates is not None:
        affordable = min(affordable, affordable_output(call.usd_rates, call.usd_quote, res.held_usd))
    per_choice = affordable // call.parsed.choices
    asked = call.route.max_output_tokens if call.parsed.output_cap is None else call.parsed.output_cap
    return per_choice if per_choice < asked else None


@dataclass(frozen=True, slots=True)
class Priced:
    """What a metered call was priced with: its route, the plan's rates and the provider's list price."""

    route: ModelRoute
    rates: Rates
    usd_quote: Quote
    usd_rates: Rates


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at holding a request: the plan it was priced with, the quote and the reserve spec;
    `alerts`: whether a refusal may fire the plan's 100 % alerts (a metered call's can)."""

    plan: Plan
    quote: Quote
    spec: ReserveSpec
    alerts: bool = True
    priced: Priced | None = None  # a metered call's (token counting has no price)


async def hold(gw: Gateway, dialect: Dialect, principal: Principal, request_id: str,
               prepare: Callable[[Principal, int | None], Attempt]) -> tuple[Principal, Attempt, Reservation]:
    """Hold a request's worst case with the reserve script, pricing it with `prepare(principal, now)`
    again when the account's plan changed or the billing cycle moved meanwhile; the refusal otherwise
    (402, the 429 of a limit, 401/403 of the key or account). A reserve Redis did not answer in time
    is cancelled once Redis is back."""
    assert gw.meter is not None and gw.auth is not None
    keys = gw.schema.for_account(principal.account_id)
    now_ms: int | None = None
    for _ in range(4):
        attempt = prepare(principal, now_ms)
        plan, q, spec = attempt.plan, attempt.quote, attempt.spec
        try:
            return principal, attempt, await gw.meter.reserve(keys, principal.key_id, request_id, plan.name, q, spec)
        except StoreUnavailable:
            cancel_later(gw, keys, request_id)
            raise
        except PlanChanged as changed:
            principal = gw.auth.with_plan(principal, changed.plan)
        except CycleStale as stale:
            now_ms = stale.now_ms
        except LimitReached as reached:
            gw.metrics.limited.labels(reached.limit_id).inc()
            if attempt.alerts:
                alerts.notify(gw, principal.account_id, plan,
                              alerts.due_on_refusal(plan, spec.cycle[0], reached=reached), request_id)
            raise limit_error(gw, dialect, plan.name, reached) from None
        except InsufficientCredits as refused:
            if attempt.alerts and not isinstance(refused, KeyBudgetExhausted):  # a key's budget is not the account's
                alerts.notify(gw, principal.account_id, plan,
                              alerts.due_on_refusal(plan, spec.cycle[0], refused=refused, min_cost=q.min_cost),
                              request_id)
            raise
        except GatewayError as error:
            if error.status == 401:
                gw.auth.forget(principal)
            raise
    raise GatewayError("The account's plan changed repeatedly; try again.")


def current_cycle(gw: Gateway, principal: Principal, plan: Plan, now_ms: int | None) -> tuple[int, int]:
    """The billing cycle the account is in at `now_ms` (default: now on the scripts' clock), cached
    per (anchor, timezone)."""
    assert gw.meter is not None
    now = now_ms if now_ms is not None else int(time.time() * 1000) + gw.meter.clock_offset_ms
    zone = principal.timezone or plan.timezone
    cycle = gw.cycle_cache.get((principal.anchor_ms, zone))
    if cycle is None or not cycle[0] <= now < cycle[1]:
        cycle = cycle_bounds(principal.anchor_ms, zone, now)
        if len(gw.cycle_cache) > 100_000:
            gw.cycle_cache.clear()
        gw.cycle_cache[(principal.anchor_ms, zone)] = cycle
    return cycle

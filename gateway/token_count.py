"""Token counting (`/v1/messages/count_tokens`, `:countTokens`): forwarded for a live key, never
charged, but admitted and limited like a metered call, since it spends the operator's provider quota."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from gateway.auth import Principal
from gateway.dialects.base import Dialect
from gateway.errors import Forbidden, InsufficientCredits, KeyBudgetExhausted, UpstreamError, UpstreamTimeout
from gateway.limits import encode
from gateway.metering import Quote, Reservation, ReserveSpec
from gateway.pricing import Attempt, current_cycle, hold, route_for
from gateway.proxy import Handler
from gateway.settlement import land
from gateway.state import GATEWAY, REQUEST_DIALECT, REQUEST_ID, Gateway
from gateway.upstream import (
    forward_query,
    new_request_id,
    read_body,
    refuse_operator_problems,
    relayed_error,
    response_headers,
)


def make_token_count_handler(dialect: Dialect, endpoint: str) -> Handler:
    """A handler for an endpoint that is forwarded for a valid key but never charged (token counting).
    It spends the operator's provider quota, so the account's standing still applies: before the body
    is parsed, the reserve script admits the call like a metered one (key and account live, at least
    one micro-credit available, the plan's and the key's request-rate and concurrency limits) with a
    hold of nothing, and the call is released afterwards, counted in the rolling request windows when
    the provider answered. The release leaves a `released` ledger event (reason `count_tokens`), no charge."""

    def prepare(principal: Principal, now_ms: int | None, gw: Gateway) -> Attempt:
        plan = gw.config.plans.get(principal.plan)
        if plan is None:
            raise Forbidden(f"Your account's plan '{principal.plan}' is not configured on this gateway.")
        limits = encode([lim for lim in (*plan.limits, *principal.key_limits)
                         if lim.metric == "n" and lim.window_ms != 0 and lim.provider is None])
        fallback = gw.config.plans[gw.config.default_plan]
        spec = ReserveSpec(0, 0, 0, 0, limits, current_cycle(gw, principal, plan, now_ms), plan.monthly_credits,
                           fallback.name, fallback.monthly_credits)
        return Attempt(plan, Quote(0, 0, 0, 0, 1), spec, alerts=False)  # a hold of nothing, one micro-credit free

    async def admit_call(gw: Gateway, principal: Principal, request_id: str) -> tuple[Principal, str, Reservation]:
        try:
            principal, attempt, reservation = await hold(gw, dialect, principal, request_id,
                                                         lambda who, now: prepare(who, now, gw))
        except KeyBudgetExhausted:
            raise  # the key's own budget: its message says so
        except InsufficientCredits:
            raise InsufficientCredits("Insufficient credits: this account has no credits left. "
                                      "Add credits to continue.") from None
        return principal, attempt.spec.limits, reservation

    async def forward(request: web.Request, gw: Gateway, principal: Principal, raw: bytes,
                      reservation: Reservation, answered: list[bool]) -> web.StreamResponse:
        client = gw.upstream
        assert client is not None
        parsed = dialect.parse_request(endpoint, raw, gw.settings.max_choices, request.match_info.get("model"),
                                       headers=request.headers)
        route, _plan = route_for(gw, dialect, principal, parsed.model)
        upstream = gw.config.upstreams[route.upstream]
        try:
            async with asyncio.timeout(upstream.timeout_seconds), client.request(
                    "POST", upstream.base_url + dialect.upstream_path(request.path), body=raw,
                    headers=dialect.upstream_headers(upstream, request.headers), params=forward_query(request),
                    connect_timeout=upstream.connect_timeout_seconds) as up:
                answered.append(True)  # the provider counted it: so do the request windows
                data = await up.read()
                refuse_operator_problems(up.status)
                available = reservation.available_after + reservation.hold
                if up.status >= 400:
                    return relayed_error(dialect, up, data, parsed.model, reservation.request_id, available)
                return web.Response(body=data, status=up.status,
                                    headers=response_headers(up.headers, reservation.request_id, available))
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout("The upstream provider did not answer in time.") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"Could not reach the upstream provider ({type(exc).__name__}).") from None

    async def forward_and_release(request: web.Request, gw: Gateway, principal: Principal, raw: bytes,
                                  limits: str, reservation: Reservation) -> web.StreamResponse:
        meter, keys, rid = gw.meter, gw.schema.for_account(principal.account_id), reservation.request_id
        assert meter is not None
        answered: list[bool] = []
        try:
            return await forward(request, gw, principal, raw, reservation, answered)
        finally:

            async def attempt() -> None:
                await meter.release(keys, rid, "count_tokens", limits, principal.key_id,
                                    provider_answered=bool(answered))

            await land(gw.leases, gw.retries, principal.account_id, rid, "release", attempt)

    async def handler(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY]
        assert gw.auth is not None
        with gw.serving(request):
            return await counted(request, gw)

    async def counted(request: web.Request, gw: Gateway) -> web.StreamResponse:
        assert gw.auth is not None
        request_id = new_request_id()
        request[REQUEST_ID] = request_id
        request[REQUEST_DIALECT] = dialect
        principal = await gw.auth.authenticate(dialect.client_key(request.headers, request.query), request.remote)
        raw = await read_body(request, dialect)
        principal, limits, reservation = await admit_call(gw, principal, request_id)
        gw.leases.add(gw.schema.for_account(principal.account_id), request_id)
        # like a metered call, the rest runs in this handler's task, which nothing cancels while it runs:
        # a client that goes away never leaves the admission's hold behind
        return await forward_and_release(request, gw, principal, raw, limits, reservation)

    return handler



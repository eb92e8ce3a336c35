"""The metered proxy: authenticate, reserve, forward (streaming untouched), settle.

Every request that got a hold ends it exactly once: settled from reported usage, settled from an
estimate (stream cut short), or released (the provider never produced output). Settlement runs in a
task the app keeps alive, so a client that disconnects is still billed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError

from gateway import alerts
from gateway.auth import Principal
from gateway.billing import Call, end_call
from gateway.config import ModelRoute, Plan, Rates
from gateway.dialects.base import Dialect, ParsedRequest, StreamMeter
from gateway.dialects.drivers import admit
from gateway.errors import (
    BadRequest,
    ClientDisconnected,
    Forbidden,
    GatewayError,
    InsufficientCredits,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    StoreUnavailable,
    UnreadableBody,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.keys import AccountKeys
from gateway.limits import Limit, applicable, cycle_bounds, describe, encode
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
from gateway.money import format_credits
from gateway.scripts import REDIS_DOWN
from gateway.state import GATEWAY, REQUEST_DIALECT, REQUEST_ID, Gateway
from gateway.upstream_errors import relay_body

Handler = Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]]

#: Upstream response headers not copied to the client: hop-by-hop, recomputed, or the operator's own.
_DROP_RESPONSE = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "set-cookie",
    "openai-organization", "openai-project", "x-request-id", "request-id", "date", "server", "trailer",
    "upgrade",
})
_DROP_RESPONSE_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-", "anthropic-organization")


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


def _response_headers(upstream_headers: Any, request_id: str, available: int) -> dict[str, str]:
    headers = {
        name: value
        for name, value in upstream_headers.items()
        if name.lower() not in _DROP_RESPONSE and not name.lower().startswith(_DROP_RESPONSE_PREFIXES)
    }
    upstream_id = upstream_headers.get("x-request-id") or upstream_headers.get("request-id")
    if upstream_id:
        headers["x-upstream-request-id"] = upstream_id
    headers["x-request-id"] = request_id
    headers["request-id"] = request_id  # the Anthropic SDK's name for it
    headers["x-credits-remaining"] = format_credits(max(available, 0))
    return headers


#: Content-Encodings aiohttp decodes while reading a request body (as its parser spells them).
_DECODED_ENCODINGS = frozenset({"gzip", "deflate", "br", "zstd"})


async def read_body(request: web.Request, dialect: Dialect) -> bytes:
    """The request body, decoded: what the dialect parses and what goes upstream (without its
    Content-Encoding, see `forward_headers`). The size limit applies after decoding."""
    if dialect.json_body and request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"Unsupported Content-Type {request.content_type!r}: send the body as application/json.")
    encodings = request.headers.getall("Content-Encoding", [])
    encoding = encodings[0].lower() if len(encodings) == 1 else ",".join(encodings)
    if encodings and encoding not in _DECODED_ENCODINGS and encoding not in ("identity", ""):
        shown = encoding[:40].encode("unicode_escape").decode("ascii")
        raise UnsupportedMediaType(f"Unsupported Content-Encoding {shown!r}: send the body uncompressed, "
                                   "or with Content-Encoding gzip or deflate.")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[GATEWAY].settings.max_body_bytes
        raise PayloadTooLarge(f"The request body is larger than this gateway's limit of {limit} bytes.") from None
    except web.RequestPayloadError:
        # aiohttp's parser stopped at the bad bytes; marking the payload ended keeps aiohttp from
        # draining it after the answer (which re-raises and logs a traceback)
        request.content.feed_eof()
        if encoding in _DECODED_ENCODINGS:
            raise UnreadableBody(
                f"The request body is not valid {encoding} data (Content-Encoding: {encoding}).") from None
        raise UnreadableBody("The request body could not be read: its framing (Content-Length or chunked "
                             "encoding) is broken.") from None
    except ConnectionError:  # the client hung up mid-upload (not Redis: see error_middleware)
        raise ClientDisconnected("The client closed the connection before its request body was read.") from None


def route_for(gw: Gateway, dialect: Dialect, principal: Principal, model: str) -> tuple[ModelRoute, Plan]:
    """The model's route, if its upstream speaks the caller's dialect and the plan allows it."""
    route = gw.config.route(model)
    if route is None or gw.config.upstreams[route.upstream].dialect != dialect.name:
        raise NotFound(f"The model '{model}' does not exist or is not served by this gateway on this API.",
                       param="model")
    plan = gw.config.plans.get(principal.plan)
    if plan is None:
        raise Forbidden(f"Your account's plan '{principal.plan}' is not configured on this gateway.")
    if not plan.allows(model):
        raise Forbidden(f"Your plan '{plan.name}' does not include the model '{model}'.", param="model")
    principal.check_scope(dialect.name, model)
    return route, plan


def _price(gw: Gateway, dialect: Dialect, principal: Principal, parsed: ParsedRequest
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


def _spec(gw: Gateway, principal: Principal, plan: Plan, route: ModelRoute, parsed: ParsedRequest, q: Quote,
          now_ms: int | None) -> tuple[ReserveSpec, Quote, Rates]:
    """The limits that apply to this request, their worst-case amounts and the current cycle; and the
    provider's list price of the request (USD rates and quote) for USD limits and the ledger."""
    limits: list[Limit] = applicable(plan.limits, route.upstream) + list(principal.key_limits)
    usd_rates = request_rates(gw, route, parsed, gw.config.usd_rates(route))
    usd = quote(usd_rates, parsed.prompt_tokens_bound, q.max_output_tokens)
    now = now_ms if now_ms is not None else int(time.time() * 1000) + gw.meter.clock_offset_ms  # type: ignore[union-attr]
    cycle = gw.cycle_cache.get((principal.anchor_ms, principal.timezone or plan.timezone))
    if cycle is None or not cycle[0] <= now < cycle[1]:
        cycle = cycle_bounds(principal.anchor_ms, principal.timezone or plan.timezone, now)
        if len(gw.cycle_cache) > 100_000:
            gw.cycle_cache.clear()
        gw.cycle_cache[(principal.anchor_ms, principal.timezone or plan.timezone)] = cycle
    fallback = gw.config.plans[gw.config.default_plan]
    bound = parsed.prompt_tokens_bound
    spec = ReserveSpec(bound + q.max_output_tokens, bound + min(q.max_output_tokens, 1), usd.full_cost, usd.min_cost,
                       encode(limits), cycle, plan.monthly_credits, fallback.name, fallback.monthly_credits)
    return spec, usd, usd_rates


def limit_error(gw: Gateway, dialect: Dialect, plan: str, reached: LimitReached) -> RateLimited:
    """429 naming the plan, the limit, its current value and when it frees up, with the rate-limit
    headers of the caller's dialect."""
    limit = next((lim for p in gw.config.plans.values() for lim in p.limits if lim.id == reached.limit_id), None)
    metric = limit.metric if limit is not None else ("t" if "token" in reached.limit_id else "n")
    seconds = max(1, -(-reached.frees_in_ms // 1000))
    whose = "this API key" if reached.scope == "k" else f"your plan '{plan}'"
    message = (f"Limit reached: {describe(reached.limit_id, reached.used, reached.cap, metric)} "
               f"for {whose}. It frees up in {seconds} s.")
    headers = {"Retry-After": str(seconds), "retry-after-ms": str(max(reached.frees_in_ms, 0))}
    if seconds > 60:
        headers["x-should-retry"] = "false"  # SDKs would otherwise sleep on a long wait
    kind = "tokens" if metric == "t" else "requests"
    remaining = str(max(reached.cap - reached.used, 0))
    if dialect.name == "openai" and metric in ("n", "t"):
        headers.update({f"x-ratelimit-limit-{kind}": str(reached.cap), f"x-ratelimit-remaining-{kind}": remaining,
                        f"x-ratelimit-reset-{kind}": f"{seconds}s"})
    elif dialect.name == "anthropic" and metric in ("n", "t"):
        reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds))
        headers.update({f"anthropic-ratelimit-{kind}-limit": str(reached.cap),
                        f"anthropic-ratelimit-{kind}-remaining": remaining,
                        f"anthropic-ratelimit-{kind}-reset": reset})
    return RateLimited(message, headers=headers)


async def _reserve(gw: Gateway, dialect: Dialect, principal: Principal, parsed: ParsedRequest, request_id: str,
                   started: float) -> Call:
    """Price the request and hold its worst case (re-pricing when the plan or the cycle moved);
    the call in flight, or the refusal."""
    assert gw.meter is not None and gw.auth is not None
    keys = gw.schema.for_account(principal.account_id)
    now_ms: int | None = None
    for _ in range(4):
        route, plan, rates, q = _price(gw, dialect, principal, parsed)
        spec, usd, usd_rates = _spec(gw, principal, plan, route, parsed, q, now_ms)
        try:
            reservation = await gw.meter.reserve(keys, principal.key_id, request_id, plan.name, q, spec)
            return Call(gw, dialect, principal, parsed, route, rates, q, reservation, request_id, started,
                        spec.limits, usd, usd_rates)
        except StoreUnavailable:
            _cancel_later(gw, keys, request_id)
            raise
        except PlanChanged as changed:
            principal = gw.auth.with_plan(principal, changed.plan)
        except CycleStale as stale:
            now_ms = stale.now_ms
        except LimitReached as reached:
            gw.metrics.limited.labels(reached.limit_id).inc()
            alerts.notify(gw, principal.account_id, plan,
                          alerts.due_on_refusal(plan, spec.cycle[0], reached=reached), request_id)
            raise limit_error(gw, dialect, plan.name, reached) from None
        except InsufficientCredits as refused:
            alerts.notify(gw, principal.account_id, plan,
                          alerts.due_on_refusal(plan, spec.cycle[0], refused=refused, min_cost=q.min_cost), request_id)
            raise
        except GatewayError as error:
            if error.status == 401:
                gw.auth.forget(principal)
            raise
    raise GatewayError("The account's plan changed repeatedly; try again.")


def _cancel_later(gw: Gateway, keys: AccountKeys, request_id: str) -> None:
    """A reserve whose answer never came may still run when Redis is back: cancel it by request id
    (the release leaves a tombstone that a late reserve refuses), so it never becomes a phantom hold."""
    meter = gw.meter
    assert meter is not None

    async def attempt() -> None:
        await meter.release(keys, request_id, "cancelled")

    gw.retries.add(request_id, "cancel", attempt)


def make_handler(dialect: Dialect, endpoint: str) -> Handler:
    """A request handler for one metered endpoint of one dialect."""

    async def handler(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY]
        task = asyncio.current_task()
        if task is not None:
            gw.inflight.add(task)
            task.add_done_callback(gw.inflight.discard)
        started = time.perf_counter()
        request_id = new_request_id()
        request[REQUEST_ID] = request_id
        request[REQUEST_DIALECT] = dialect
        auth = gw.auth
        assert auth is not None
        principal = await auth.authenticate(dialect.client_key(request.headers, request.query), request.remote)
        raw = await read_body(request, dialect)
        # a large body from an account that cannot pay even its prompt is refused before it is parsed
        await auth.precheck(principal, dialect.name, len(raw), gw.config, gw.settings.clock_offset_ms)
        parsed = dialect.parse_request(endpoint, raw, gw.settings.max_choices, request.match_info.get("model"),
                                      headers=request.headers)
        call = await _reserve(gw, dialect, principal, parsed, request_id, started)
        call.overhead = time.perf_counter() - started
        gw.leases.add(call.keys, request_id)
        # the forwarding runs in a task of its own: a client that goes away (or a handler cancelled
        # with it) never cuts it short, so a served request is always settled (invariant 7)
        forwarding = gw.track(asyncio.ensure_future(_forward_and_end(request, call, raw)))
        return await asyncio.shield(forwarding)

    return handler


async def _forward_and_end(request: web.Request, call: Call, raw: bytes) -> web.StreamResponse:
    gw = call.gw
    gw.metrics.open_holds.inc()
    try:
        return await _forward(request, call, raw)
    finally:
        gw.metrics.open_holds.dec()
        if not call.ended:  # a bug or a cancellation: never strand the hold, never serve for free
            await end_call(call, None, outcome="internal_error", http_status=200 if call.served else 500)


def make_free_handler(dialect: Dialect, endpoint: str) -> Handler:
    """A handler for an endpoint that is forwarded for a valid key but never charged (token counting).
    It spends the operator's provider quota, so the account's standing still applies: before the body
    is parsed, the reserve script admits the call like a metered one (key and account live, at least
    one micro-credit available, the plan's and the key's request-rate and concurrency limits) with a
    hold of nothing, and the call is released afterwards, counted in the rolling request windows when
    the provider answered. The release leaves a `released` ledger event (reason `count_tokens`), no charge."""

    async def admit_call(gw: Gateway, principal: Principal, request_id: str) -> tuple[Principal, str, Reservation]:
        assert gw.meter is not None and gw.auth is not None
        keys = gw.schema.for_account(principal.account_id)
        now_ms: int | None = None
        for _ in range(4):
            plan = gw.config.plans.get(principal.plan)
            if plan is None:
                raise Forbidden(f"Your account's plan '{principal.plan}' is not configured on this gateway.")
            limits = encode([lim for lim in (*plan.limits, *principal.key_limits)
                             if lim.metric == "n" and lim.window_ms != 0 and lim.provider is None])
            now = now_ms if now_ms is not None else int(time.time() * 1000) + gw.meter.clock_offset_ms
            zone = principal.timezone or plan.timezone
            fallback = gw.config.plans[gw.config.default_plan]
            spec = ReserveSpec(0, 0, 0, 0, limits, cycle_bounds(principal.anchor_ms, zone, now), plan.monthly_credits,
                               fallback.name, fallback.monthly_credits)
            try:  # a hold of nothing that needs one micro-credit available
                reservation = await gw.meter.reserve(keys, principal.key_id, request_id, plan.name,
                                                     Quote(0, 0, 0, 0, 1), spec)
                return principal, limits, reservation
            except StoreUnavailable:
                _cancel_later(gw, keys, request_id)
                raise
            except PlanChanged as changed:
                principal = gw.auth.with_plan(principal, changed.plan)
            except CycleStale as stale:
                now_ms = stale.now_ms
            except LimitReached as reached:
                gw.metrics.limited.labels(reached.limit_id).inc()
                raise limit_error(gw, dialect, plan.name, reached) from None
            except InsufficientCredits:
                raise InsufficientCredits("Insufficient credits: this account has no credits left. "
                                          "Add credits to continue.") from None
            except GatewayError as error:
                if error.status == 401:
                    gw.auth.forget(principal)
                raise
        raise GatewayError("The account's plan changed repeatedly; try again.")

    async def forward(request: web.Request, gw: Gateway, principal: Principal, raw: bytes,
                      reservation: Reservation, answered: list[bool]) -> web.StreamResponse:
        assert gw.session is not None
        parsed = dialect.parse_request(endpoint, raw, gw.settings.max_choices, request.match_info.get("model"),
                                       headers=request.headers)
        route, _plan = route_for(gw, dialect, principal, parsed.model)
        upstream = gw.config.upstreams[route.upstream]
        timeout = aiohttp.ClientTimeout(total=upstream.timeout_seconds, sock_connect=upstream.connect_timeout_seconds)
        try:
            async with gw.session.post(upstream.base_url + dialect.upstream_path(request.path), data=raw,
                                       headers=dialect.upstream_headers(upstream, request.headers),
                                       params=_forward_query(request), timeout=timeout,
                                       allow_redirects=False) as up:
                answered.append(True)  # the provider counted it: so do the request windows
                data = await up.read()
                _refuse_operator_problems(up.status)
                available = reservation.available_after + reservation.hold
                if up.status >= 400:
                    return _relayed_error(dialect, up, data, parsed.model, reservation.request_id, available)
                return web.Response(body=data, status=up.status,
                                    headers=_response_headers(up.headers, reservation.request_id, available))
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
            gw.leases.discard(principal.account_id, rid)

            async def attempt() -> None:
                await meter.release(keys, rid, "count_tokens", limits, principal.key_id,
                                    provider_answered=bool(answered))

            try:
                await attempt()
            except (StoreUnavailable, *REDIS_DOWN, RedisError):
                gw.retries.add(rid, "release", attempt)

    async def handler(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY]
        assert gw.auth is not None
        task = asyncio.current_task()
        if task is not None:
            gw.inflight.add(task)
            task.add_done_callback(gw.inflight.discard)
        request_id = new_request_id()
        request[REQUEST_ID] = request_id
        request[REQUEST_DIALECT] = dialect
        principal = await gw.auth.authenticate(dialect.client_key(request.headers, request.query), request.remote)
        raw = await read_body(request, dialect)
        principal, limits, reservation = await admit_call(gw, principal, request_id)
        gw.leases.add(gw.schema.for_account(principal.account_id), request_id)
        # like a metered call, the rest runs in a task of its own: a client that goes away never
        # leaves the admission's hold behind
        forwarding = gw.track(asyncio.ensure_future(
            forward_and_release(request, gw, principal, raw, limits, reservation)))
        return await asyncio.shield(forwarding)

    return handler


def _lowered_cap(call: Call) -> int | None:
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


async def _forward(request: web.Request, call: Call, raw: bytes) -> web.StreamResponse:
    gw = call.gw
    assert gw.session is not None
    upstream = gw.config.upstreams[call.route.upstream]
    lowered = _lowered_cap(call)
    if lowered is not None and lowered < 1:
        await end_call(call, None, outcome="refused", http_status=402)
        raise InsufficientCredits("Insufficient credits for even one output token per choice.")
    if lowered is not None:
        gw.metrics.lowered.labels(call.route.pattern).inc()
    try:
        body, hide_usage = call.dialect.upstream_body(call.parsed, upstream, lowered)
        headers = call.dialect.upstream_headers(upstream, request.headers)
        url = upstream.base_url + call.dialect.upstream_path(request.path)
    except GatewayError as refused:
        await end_call(call, None, outcome="refused", http_status=refused.status)
        raise
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=upstream.connect_timeout_seconds,
                                    sock_read=upstream.timeout_seconds)
    sent = time.perf_counter()
    try:
        upstream_cm = gw.session.request(request.method, url, data=body if body is not None else raw,
                                         headers=headers, timeout=timeout, params=_forward_query(request),
                                         allow_redirects=False)
        async with upstream_cm as up:
            gw.metrics.upstream_seconds.labels(upstream.name).observe(time.perf_counter() - sent)
            if up.status >= 300:  # a refusal, or a redirect: never followed (it would carry the provider key)
                return await _upstream_error(call, up)
            call.served = True
            if call.parsed.stream and up.content_type == "text/event-stream":
                meter = call.dialect.stream_meter(call.parsed.endpoint, hide_usage)
                return await _stream(request, call, up, meter, lowered)
            try:
                data = await up.read()
            except (TimeoutError, aiohttp.ClientError):
                await end_call(call, None, outcome="upstream_cut", http_status=up.status, lowered=lowered)
                raise UpstreamError("The upstream connection was lost while reading its answer.") from None
            usage = call.dialect.usage_from_body(call.parsed.endpoint, data)
            unknown_output = usage is None or usage.output_tokens is None
            available = await end_call(call, usage, outcome="ok", http_status=up.status, lowered=lowered,
                                       estimate_out=len(data) // 4 if unknown_output else 0)
            return web.Response(body=data, status=up.status,
                                headers=_response_headers(up.headers, call.request_id, available))
    except (TimeoutError, aiohttp.ServerTimeoutError):
        if call.ended:
            raise
        await end_call(call, None, outcome="upstream_timeout", http_status=504)
        raise UpstreamTimeout("The upstream provider did not answer in time.") from None
    except aiohttp.ClientError as exc:
        if call.ended:
            raise
        await end_call(call, None, outcome="upstream_unreachable", http_status=502)
        raise UpstreamError(f"Could not reach the upstream provider ({type(exc).__name__}).") from None


#: Query parameters each dialect forwards (others could change what the answer reports, e.g. Gemini's
#: `alt=proto` or `fields`, so they are dropped); per-call tools forward everything but the key.
_QUERY_FORWARDED = {"openai": frozenset({"api-version"}), "anthropic": frozenset({"beta"}),
                    "gemini": frozenset({"alt"})}


def _forward_query(request: web.Request) -> dict[str, str]:
    allowed = _QUERY_FORWARDED.get(request[REQUEST_DIALECT].name)
    query = {k: v for k, v in request.query.items() if k != "key" and (allowed is None or k in allowed)}
    if "alt" in query and (query["alt"] != "sse" or not request.path.endswith(":streamGenerateContent")):
        del query["alt"]  # only a stream may ask for SSE; alt=proto would hide usageMetadata
    return query


async def _upstream_error(call: Call, up: aiohttp.ClientResponse) -> web.StreamResponse:
    """The provider refused, failed or redirected before any output: no charge. Its status, error
    type and code go back in the dialect's shape without identifying text (`relay_body`), except
    credential problems and redirects, which are the operator's and are reported as a 502."""
    try:
        data = await up.read()
    except (TimeoutError, aiohttp.ClientError):
        data = b""
    available = await end_call(call, None, outcome=f"upstream_{up.status}", http_status=up.status)
    _refuse_operator_problems(up.status)
    return _relayed_error(call.dialect, up, data, call.parsed.model, call.request_id, available)


def _refuse_operator_problems(status: int) -> None:
    """A 502 for upstream answers that are the operator's business: its credentials refused, or a
    redirect (never followed: the provider key would go along to wherever it points)."""
    if status in (401, 403):
        raise UpstreamError("The upstream provider rejected the gateway's credentials.")
    if 300 <= status < 400:
        raise UpstreamError(f"The upstream provider answered with a redirect ({status}), which this gateway "
                            "does not follow.")


def _relayed_error(dialect: Dialect, up: aiohttp.ClientResponse, data: bytes, model: str, request_id: str,
                   available: int) -> web.Response:
    headers = _response_headers(up.headers, request_id, available)
    if dialect.name != "http":
        headers = {name: value for name, value in headers.items() if name.lower() != "content-type"}
        headers["Content-Type"] = "application/json"
    return web.Response(body=relay_body(dialect, up.status, data, model, request_id), status=up.status,
                        headers=headers)


async def _stream(request: web.Request, call: Call, up: aiohttp.ClientResponse, meter: StreamMeter,
                  lowered: int | None) -> web.StreamResponse:
    """Relay the stream chunk by chunk. A client that goes away (or stalls longer than
    `client_stall_seconds` on one chunk) no longer gets bytes, but the upstream is read on, for up to
    `drain_seconds`, so the request is billed from the provider's own usage report; past that, its
    output is unknown and the whole hold is charged."""
    settings = call.gw.settings
    response = web.StreamResponse(
        status=up.status, headers=_response_headers(up.headers, call.request_id, call.reservation.available_after))
    outcome = "ok"
    loop = asyncio.get_running_loop()
    drain_until: float | None = None  # set when the client is gone
    drained_out = False
    try:
        try:
            await response.prepare(request)
        except (ConnectionResetError, RuntimeError):
            outcome, drain_until = "client_disconnected", loop.time() + settings.drain_seconds
        chunks = up.content.iter_any().__aiter__()
        while True:
            try:
                async with asyncio.timeout_at(drain_until):
                    chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            except (TimeoutError, aiohttp.ClientError) as exc:
                if drain_until is None:
                    outcome = "upstream_cut"
                elif isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ClientError):
                    drained_out = True  # gave up reading: the provider may have generated up to the cap
                break
            out = meter.feed(chunk)
            if out and drain_until is None:
                try:
                    async with asyncio.timeout(settings.client_stall_seconds):
                        await response.write(out)
                except (ConnectionResetError, TimeoutError):
                    outcome, drain_until = "client_disconnected", loop.time() + settings.drain_seconds
        tail = meter.finish()
        if drain_until is None:
            try:
                if tail:
                    await response.write(tail)
                if outcome == "upstream_cut":
                    lost = "The upstream connection was lost mid-stream."
                    await response.write(call.dialect.stream_error_event(lost))
                await response.write_eof()
            except ConnectionResetError:
                outcome = "client_disconnected"
    finally:
        await end_call(call, meter.usage, outcome=outcome, http_status=up.status, lowered=lowered,
                       estimate_out=meter.estimated_output_tokens(), streamed=True, output_unknown=drained_out)
    return response

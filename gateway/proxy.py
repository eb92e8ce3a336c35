"""The metered proxy: authenticate, reserve (gateway.pricing), forward (streaming untouched), settle
(gateway.billing).

Every request that got a hold ends it exactly once: settled from reported usage, settled from an
estimate (stream cut short), or released (the provider never produced output). The handler forwards
and settles in its own task, which nothing cancels while it runs (`Gateway.serving`), so a client that
disconnects is still billed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import web

from gateway.auth import Principal
from gateway.billing import Call, end_call
from gateway.dialects.base import Dialect, ParsedRequest, StreamMeter
from gateway.errors import (
    GatewayError,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.logs import ACCESS, Access, client_request_id, trace_id
from gateway.pricing import Attempt, Priced, hold, lowered_cap, price, reserve_spec
from gateway.signals import no_output_refusal, success_headers
from gateway.state import GATEWAY, REQUEST_DIALECT, REQUEST_ID, Gateway
from gateway.tracing import TRACER
from gateway.upstream import (
    forward_query,
    new_request_id,
    read_body,
    refuse_operator_problems,
    relayed_error,
    response_headers,
)
from gateway.upstream_client import ClientConnectorError, UpstreamResponse

Handler = Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]]


async def _reserve(gw: Gateway, dialect: Dialect, principal: Principal, parsed: ParsedRequest, request_id: str,
                   started: float, access: Access) -> Call:
    """Price the request and hold its worst case: the call in flight, or the refusal."""

    def prepare(who: Principal, now_ms: int | None) -> Attempt:
        route, plan, rates, q = price(gw, dialect, who, parsed)
        spec, usd, usd_rates = reserve_spec(gw, who, plan, route, parsed, q, now_ms)
        return Attempt(plan, q, spec, priced=Priced(route, rates, usd, usd_rates))

    principal, attempt, reservation = await hold(gw, dialect, principal, request_id, prepare)
    priced = attempt.priced
    assert priced is not None
    return Call(gw, dialect, principal, parsed, priced.route, priced.rates, attempt.quote, reservation, request_id,
                started, attempt.spec.limits, priced.usd_quote, priced.usd_rates, access=access)


def make_handler(dialect: Dialect, endpoint: str) -> Handler:
    """A request handler for one metered endpoint of one dialect."""

    async def handler(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY]
        with gw.serving(request):
            return await _handle(gw, dialect, endpoint, request)

    return handler


async def _handle(gw: Gateway, dialect: Dialect, endpoint: str, request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    request_id = new_request_id()
    request[REQUEST_ID] = request_id
    request[REQUEST_DIALECT] = dialect
    headers = request.headers
    access = request[ACCESS] = Access(request_id, client_request_id(headers.get("X-Request-ID")),
                                      trace_id(headers.get("traceparent")), dialect.name)
    auth = gw.auth
    assert auth is not None
    try:
        principal = await auth.authenticate(dialect.client_key(headers, request.query), request.remote)
        access.account_id, access.key_id = principal.account_id, principal.key_id
        raw = await read_body(request, dialect)
        # a large body from an account that cannot pay even its prompt is refused before it is parsed
        await auth.precheck(principal, dialect.name, len(raw), gw.config, gw.settings.clock_offset_ms)
        parsed = dialect.parse_request(endpoint, raw, gw.settings.max_choices, request.match_info.get("model"),
                                      headers=headers)
        access.model = parsed.model
        tracer = request.app.get(TRACER)
        if tracer is not None:
            access.span = tracer.start(dialect.name, endpoint, parsed.model, parsed.output_cap, headers)
        call = await _reserve(gw, dialect, principal, parsed, request_id, started, access)
    except BaseException as refused:  # nothing held: the call is over before it began
        access.call_ended(getattr(refused, "status", 500))
        raise
    access.route, access.upstream = call.route.pattern, call.route.upstream
    call.overhead = time.perf_counter() - started
    gw.leases.add(call.keys, request_id)
    # forwarded and settled in this handler's task: aiohttp never cancels it for a client that goes
    # away, and a stop cuts its client instead of cancelling it (`Gateway.serving`), so a served
    # request is always settled (invariant 7)
    return await _forward_and_end(request, call, raw)


async def _forward_and_end(request: web.Request, call: Call, raw: bytes) -> web.StreamResponse:
    gw = call.gw
    in_flight = gw.metrics.in_flight.labels(call.dialect.name)
    gw.metrics.open_holds.inc()
    in_flight.inc()
    try:
        return await _forward(request, call, raw)
    finally:
        gw.metrics.open_holds.dec()
        in_flight.dec()
        if not call.ended:  # a bug or a cancellation: never strand the hold, never serve for free
            await end_call(call, None, outcome="internal_error", http_status=200 if call.served else 500)


async def _forward(request: web.Request, call: Call, raw: bytes) -> web.StreamResponse:
    gw = call.gw
    client = gw.upstream
    assert client is not None
    upstream = gw.config.upstreams[call.route.upstream]
    lowered = lowered_cap(call)
    if lowered is not None and lowered < 1:
        await end_call(call, None, outcome="refused", http_status=402)
        raise no_output_refusal(call)
    if lowered is not None:
        gw.metrics.lowered.labels(call.route.pattern).inc()
    try:
        body, hide_usage = call.dialect.upstream_body(call.parsed, upstream, lowered)
        headers = call.dialect.upstream_headers(upstream, request.headers)
        if call.access.span is not None:
            call.access.span.inject(headers)
        url = upstream.base_url + call.dialect.upstream_path(request.path)
    except GatewayError as refused:
        await end_call(call, None, outcome="refused", http_status=refused.status)
        raise
    sent = time.perf_counter()
    try:
        upstream_cm = client.request(request.method, url, body=body if body is not None else raw, headers=headers,
                                     params=forward_query(request), connect_timeout=upstream.connect_timeout_seconds,
                                     read_timeout=upstream.timeout_seconds)
        async with upstream_cm as up:
            waited = time.perf_counter() - sent
            gw.metrics.upstream_seconds.labels(upstream.name).observe(waited)
            call.access.upstream_ms = waited * 1000
            if up.status >= 300:  # a refusal, or a redirect: never followed (it would carry the provider key)
                return await _upstream_error(call, up)
            call.served = True
            if call.parsed.stream and up.content_type == "text/event-stream":
                meter = call.dialect.stream_meter(call.parsed.endpoint, hide_usage)
                return await _stream(request, call, up, meter, lowered)
            try:
                data = await up.read()
            except (TimeoutError, aiohttp.ClientError) as exc:
                _upstream_failed(call, exc)
                await end_call(call, None, outcome="upstream_cut", http_status=up.status, lowered=lowered)
                raise UpstreamError("The upstream connection was lost while reading its answer.") from None
            usage = call.dialect.usage_from_body(call.parsed.endpoint, data)
            unknown_output = usage is None or usage.output_tokens is None
            # respond first: the settlement lands in a task of its own (tracked, retried if Redis
            # fails), and x-credits-remaining is what the reservation leaves after this charge
            available = await end_call(call, usage, outcome="ok", http_status=up.status, lowered=lowered,
                                       estimate_out=len(data) // 4 if unknown_output else 0, wait=False)
            headers = response_headers(up.headers, call.request_id, available, call.access.client_request_id)
            headers.update(success_headers(call.dialect.name, call.reservation, lowered))
            return web.Response(body=data, status=up.status, headers=headers)
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        if call.ended:
            raise
        _upstream_failed(call, exc)
        await end_call(call, None, outcome="upstream_timeout", http_status=504)
        raise UpstreamTimeout("The upstream provider did not answer in time.") from None
    except aiohttp.ClientError as exc:
        if call.ended:
            raise
        _upstream_failed(call, exc)
        await end_call(call, None, outcome="upstream_unreachable", http_status=502)
        raise UpstreamError(f"Could not reach the upstream provider ({type(exc).__name__}).") from None


def _first_bytes(call: Call) -> None:
    """A stream's first content bytes went out: its time to first token."""
    ttft = time.perf_counter() - call.started
    call.gw.metrics.ttft.labels(call.dialect.name, call.route.pattern).observe(ttft)
    call.access.ttft_ms = ttft * 1000


async def _upstream_error(call: Call, up: UpstreamResponse) -> web.StreamResponse:
    """The provider refused, failed or redirected before any output: no charge. Its status, error
    type and code go back in the dialect's shape without identifying text (`relay_body`), except
    credential problems and redirects, which are the operator's and are reported as a 502."""
    try:
        data = await up.read()
    except (TimeoutError, aiohttp.ClientError):
        data = b""
    _upstream_failed(call, None, up.status)
    available = await end_call(call, None, outcome=f"upstream_{up.status}", http_status=up.status)
    refuse_operator_problems(up.status)
    return relayed_error(call.dialect, up, data, call.parsed.model, call.request_id, available,
                         call.access.client_request_id)


def _upstream_failed(call: Call, error: BaseException | None, status: int | None = None) -> None:
    """Count an upstream failure by cause, and put the cause in the access record."""
    if status is not None:
        cause = "redirect" if status < 400 else "status_4xx" if status < 500 else "status_5xx"
    elif isinstance(error, TimeoutError):  # aiohttp's timeouts are TimeoutErrors too
        cause = "timeout"
    elif isinstance(error, (ClientConnectorError, aiohttp.ClientConnectorError)):
        cause = "connect"
    else:
        cause = "protocol"
    call.gw.metrics.upstream_errors.labels(call.route.upstream, cause).inc()
    access = call.access
    access.cause, access.upstream_status = cause, status
    if error is not None:
        access.error = type(error).__name__


async def _stream(request: web.Request, call: Call, up: UpstreamResponse, meter: StreamMeter,
                  lowered: int | None) -> web.StreamResponse:
    """Relay the stream chunk by chunk. A client that goes away (or stalls longer than
    `client_stall_seconds` on one chunk) no longer gets bytes, but the upstream is read on, for up to
    `drain_seconds`, so the request is billed from the provider's own usage report; past that, its
    output is unknown and the whole hold is charged."""
    settings = call.gw.settings
    response = web.StreamResponse(status=up.status, headers=response_headers(
        up.headers, call.request_id, call.reservation.available_after, call.access.client_request_id))
    outcome = "ok"
    loop = asyncio.get_running_loop()
    response.headers.update(success_headers(call.dialect.name, call.reservation, lowered))  # before prepare()
    drain_until: float | None = None  # set when the client is gone
    drained_out = False
    first_bytes = True
    try:
        try:
            await response.prepare(request)
        except (ConnectionResetError, RuntimeError):
            outcome, drain_until = "client_disconnected", loop.time() + settings.drain_seconds
        while True:
            try:
                if drain_until is None:
                    chunk = await up.next_chunk()
                else:
                    async with asyncio.timeout_at(drain_until):
                        chunk = await up.next_chunk()
                if not chunk:
                    break
            except (TimeoutError, aiohttp.ClientError) as exc:
                if drain_until is None:
                    outcome = "upstream_cut"
                    _upstream_failed(call, exc)
                elif isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ClientError):
                    drained_out = True  # gave up reading: the provider may have generated up to the cap
                break
            out = meter.feed(chunk)
            if out and drain_until is None:
                try:
                    async with asyncio.timeout(settings.client_stall_seconds):
                        await response.write(out)
                    if first_bytes:
                        first_bytes = False
                        _first_bytes(call)
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

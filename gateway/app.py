"""`create_app(settings)`: builds the whole gateway; nothing happens at import time."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from redis import exceptions as redis_errors

from gateway import admin, dashboard, logs, tracing, usage_routes
from gateway.admin_keys import ADMIN_KEYS, AdminKeys
from gateway.alerts import list_alerts, webhooks_ctx
from gateway.auth import Authenticator
from gateway.config import Config, load_config
from gateway.dialects import all_dialects
from gateway.dialects.base import Dialect
from gateway.dialects.http import tool_path
from gateway.embedded import EmbeddedRedis
from gateway.errors import (
    BadRequest,
    ClientDisconnected,
    GatewayError,
    NotFound,
    StoreUnavailable,
    Unauthorized,
    UnreadableBody,
)
from gateway.keys import KeySchema
from gateway.ledger import trim_pass
from gateway.listener import body_deadline, cap_connections_per_client, handler_args
from gateway.logs import ACCESS, AccessLogger
from gateway.metering import Meter
from gateway.metrics import Metrics
from gateway.migrate import migrate_once
from gateway.proxy import make_handler
from gateway.reaper import HolderIndex, reap_pass
from gateway.redis_client import connect_redis
from gateway.reload import reload_ctx
from gateway.scripts import REDIS_DOWN, ScriptRunner, load_scripts
from gateway.settings import Settings
from gateway.settlement import Retries
from gateway.shipper import shipper_ctx
from gateway.state import GATEWAY, REQUEST_DIALECT, REQUEST_ID, Gateway, in_background, stopping
from gateway.store import Store
from gateway.supervision import EmbeddedStatus, RestartBudget, keep_running
from gateway.token_count import make_token_count_handler
from gateway.upstream_client import UpstreamClient
from gateway.usage_routes import key_holder
from gateway.views import account_view

log = logging.getLogger("gateway")
__all__ = ["AccessLogger", "create_app"]  # AccessLogger (gateway.logs): the access log `gateway serve` runs with
EMBEDDED = web.AppKey("embedded_redis", EmbeddedRedis)


def _dialect_of(request: web.Request, gw: Gateway) -> Dialect:
    found = request.get(REQUEST_DIALECT)
    return found if found is not None else gw.dialects["openai"]


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    """Render every GatewayError (and aiohttp's own HTTP errors) in the caller's dialect."""
    gw = request.app[GATEWAY]
    try:
        return await handler(request)
    except GatewayError as error:
        return _render(request, gw, error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        http_error = GatewayError(exc.reason if exc.status != 404 else f"No route for {request.method} {request.path}.")
        http_error.status = exc.status
        http_error.kind = "not_found" if exc.status == 404 else "invalid_request"
        http_error.code = "unknown_url" if exc.status == 404 else None  # not a model that was not found
        return _render(request, gw, http_error)
    except (RecursionError, ValueError) as exc:
        if not await _bad_request_json(request, exc):
            log.exception("unhandled error on %s %s", request.method, request.path)
            return _render(request, gw, GatewayError("The gateway hit an internal error."))
        # a route that parses its JSON body without json_object (the admin API): still a 400
        message = ("The JSON body is nested too deeply." if isinstance(exc, RecursionError)
                   else "The request body is not valid JSON.")
        return _render(request, gw, BadRequest(message))
    except REDIS_DOWN as exc:
        if _client_gone(request, exc):  # reading the body of a client that hung up: not Redis
            return _render(request, gw, ClientDisconnected("The client closed the connection."))
        return _render(request, gw, StoreUnavailable("The credit store is unavailable; try again shortly."))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _render(request, gw, GatewayError("The gateway hit an internal error."))


async def _bad_request_json(request: web.Request, exc: RecursionError | ValueError) -> bool:
    """Whether the exception comes from decoding the request's own JSON body: raised inside the json
    package (the C scanner reports deep nesting as a RecursionError from there), and for a ValueError,
    about the body's text (stored data that fails to decode is the gateway's bug, not a 400)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or str(tb.tb_frame.f_globals.get("__name__", "")).partition(".")[0] != "json":
        return False
    if isinstance(exc, RecursionError):
        return True  # only a client's input nests that deep
    if not request.body_exists or not request.content.is_eof():
        return False  # the body was not read: the JSON was something else
    raw = await request.read()  # the bytes already read, kept by aiohttp
    doc = exc.doc if isinstance(exc, json.JSONDecodeError) else getattr(exc, "object", None)
    return doc in (raw, raw.decode("utf-8", "replace"))


def _client_gone(request: web.Request, exc: BaseException) -> bool:
    transport = request.transport
    return isinstance(exc, ConnectionResetError) and (transport is None or transport.is_closing())


def _render(request: web.Request, gw: Gateway, error: GatewayError) -> web.Response:
    if isinstance(error, StoreUnavailable):
        gw.metrics.redis_errors.inc()
    status, body = _dialect_of(request, gw).error_response(error)
    headers = dict(error.headers)
    request_id = request.get(REQUEST_ID) or "req_none"
    access = request.get(ACCESS)
    headers["x-request-id"] = (access.client_request_id or request_id) if access is not None else request_id
    headers["x-gateway-request-id"] = request_id
    if status == 402:
        headers["x-should-retry"] = "false"
    response = web.Response(status=status, body=body, content_type="application/json", headers=headers)
    if isinstance(error, UnreadableBody | ClientDisconnected):
        response.force_close()  # the rest of the connection's bytes cannot be trusted, or nobody reads them
    return response


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """Connect to Redis and register scripts. Without a Redis URL this app owns the embedded server
    (the one `gateway serve` started and handed over in EMBEDDED, or one it starts here): it restarts
    the server whenever it dies (gateway.supervision) and stops it once the last settlement landed."""
    gw = app[GATEWAY]
    settings = gw.settings
    embedded = app.get(EMBEDDED)
    if embedded is None and settings.redis_url is None:
        embedded = EmbeddedRedis(settings.data_dir)
        embedded.start()
    url = embedded.url if embedded is not None else settings.redis_url
    assert url is not None
    supervisor: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()
    if embedded is not None:
        gw.embedded = EmbeddedStatus()
        budget = RestartBudget(settings.restart_backoff_seconds, settings.max_restarts_per_minute)
        supervisor = in_background(keep_running(embedded, budget, gw.embedded, stopping))
    gw.redis = connect_redis(url, settings.redis_timeout_seconds)
    runner = ScriptRunner(gw.redis, load_scripts())
    with contextlib.suppress(StoreUnavailable):
        await runner.register_all()  # Redis may come later: EVALSHA re-registers on NOSCRIPT
    gw.meter = Meter(runner, int(settings.hold_lease_seconds * 1000), settings.clock_offset_ms,
                     int(settings.hold_tombstone_seconds * 1000))
    gw.store = Store(gw.redis, gw.schema, runner, settings.clock_offset_ms)
    gw.auth = Authenticator(gw.redis, gw.schema, settings.auth_cache_seconds)
    async with supervisor:  # kept up while the last settlements land
        yield
        await gw.pending_settlements()
        await gw.retries.drain(settings.settle_drain_seconds)
    await gw.redis.aclose()
    if embedded is not None:
        await asyncio.to_thread(embedded.stop)


async def drain_on_shutdown(app: web.Application) -> None:
    """Shutdown (SIGTERM) has begun: the listener is closed, and the requests in flight may finish for
    the grace period (`GATEWAY_SHUTDOWN_GRACE_SECONDS`); then their clients are cut, and a stream is read
    on for its usage (`Gateway.cut_clients`). `/ready` answers 503 meanwhile. The cleanup contexts then
    settle everything."""
    gw = app[GATEWAY]
    gw.draining = True
    log.info("shutting down: no new connections; %d metered request(s) in flight may finish within %.0f s",
             len(gw.inflight), gw.settings.shutdown_grace_seconds)
    asyncio.get_running_loop().call_later(gw.settings.shutdown_grace_seconds, _grace_over, gw)


def _grace_over(gw: Gateway) -> None:
    cut = gw.cut_clients()
    if cut:
        log.info("grace period over: %d client connection(s) cut; their requests are read on and settled", cut)


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    """The upstream clients for the app's life: the lean one of the metered hot path
    and token counting (`gateway.upstream_client`), and aiohttp's session for webhook deliveries."""
    gw = app[GATEWAY]
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
    gw.session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
    gw.upstream = UpstreamClient()
    yield
    await gw.pending_settlements()  # requests still forwarding finish (and settle) before the pool closes
    await gw.upstream.close()
    await gw.session.close()


async def reaper_ctx(app: web.Application) -> AsyncIterator[None]:
    """Index every account before a hold is taken for it (a guard on the reserve script), copy the
    legacy global indexes once, and run the reaper and the ledger trim. Every process runs the loop;
    a lease per bucket lets one of them at a time work on a bucket."""
    gw = app[GATEWAY]
    assert gw.meter is not None
    meter = gw.meter
    gw.meter.runner.guard("reserve", HolderIndex(gw.redis, gw.schema, lambda: meter.clock_offset_ms).before_reserve)
    with contextlib.suppress(StoreUnavailable, *REDIS_DOWN):  # Redis may come later: the loop tries again
        await migrate_once(gw.redis, gw.schema)
    async with in_background(_reap_forever(gw)):
        yield


async def settlement_ctx(app: web.Application) -> AsyncIterator[None]:
    """Renew the leases of this process's requests in flight, and retry queued settlements."""
    gw = app[GATEWAY]
    gw.retries.max_age = gw.settings.hold_tombstone_seconds / 2
    async with in_background(_renew_forever(gw)), in_background(gw.retries.run_forever(stopping)):
        yield


async def _renew_forever(gw: Gateway) -> None:
    assert gw.meter is not None
    while not stopping():
        await asyncio.sleep(gw.settings.hold_lease_seconds / 4)
        try:
            await gw.leases.renew_all(gw.meter, gw.metrics)
        except (StoreUnavailable, *REDIS_DOWN, redis_errors.RedisError) as exc:
            if stopping():
                raise
            log.warning("lease renewal failed (%s), will retry", type(exc).__name__)
        except Exception:  # never let the loop die: a request in flight would lose its hold
            log.exception("lease renewal failed, will retry")


async def reap_once(gw: Gateway) -> int:
    """One pass over the accounts the holders index says are due; returns the number of holds reaped."""
    assert gw.meter is not None
    reaped = await reap_pass(gw.redis, gw.schema, gw.meter)
    gw.metrics.reaped.inc(reaped)
    return reaped


async def _reap_forever(gw: Gateway) -> None:
    migrated = False
    while not stopping():
        await asyncio.sleep(gw.settings.reap_interval_seconds)
        try:
            migrated = migrated or await migrate_once(gw.redis, gw.schema)
            await reap_once(gw)
            # ledger retention: one bounded batch per bucket and pass, each bucket once an hour
            await trim_pass(gw.redis, gw.schema, int(gw.settings.ledger_retention_days * 86_400_000),
                            list(gw.settings.ledger_protect_exports), int(time.time() * 1000),
                            shipped=gw.settings.ledger_sink is not None)
        except (StoreUnavailable, *REDIS_DOWN, redis_errors.RedisError) as exc:
            if stopping():
                raise
            log.warning("reaper: Redis failed (%s), will retry", type(exc).__name__)
        except Exception:  # never let the loop die
            log.exception("reaper pass failed, will retry")


# ---------------------------------------------------------------- key holder and operations routes


def _models_dialect(request: web.Request, gw: Gateway) -> Dialect:
    """Every SDK calls GET /v1/models: the Anthropic SDK always sends `anthropic-version`, Gemini
    clients send `x-goog-api-key` or `?key=`."""
    if "anthropic-version" in request.headers:
        return gw.dialects["anthropic"]
    if "x-goog-api-key" in request.headers or "key" in request.query:
        return gw.dialects["gemini"]
    return gw.dialects["openai"]


async def _allowed_models(request: web.Request) -> list[dict[str, Any]]:
    """The concrete models (no globs) the caller's plan allows on its API, checked against the live key."""
    gw = request.app[GATEWAY]
    assert gw.auth is not None
    dialect = _models_dialect(request, gw)
    request[REQUEST_DIALECT] = dialect
    principal = await gw.auth.authenticate(dialect.client_key(request.headers, request.query), request.remote)
    account = await gw.auth.live_account(principal)
    plan = gw.config.plans.get(account.get("plan", ""))
    if plan is None:
        return []
    routes = [r for r in gw.config.routes if not any(c in r.pattern for c in "*?[") and plan.allows(r.pattern)
              and gw.config.upstreams[r.upstream].dialect == dialect.name]
    if dialect.name == "gemini":
        return [{"name": f"models/{r.pattern}", "baseModelId": r.pattern, "displayName": r.pattern,
                 "outputTokenLimit": r.max_output_tokens,
                 "supportedGenerationMethods": ["generateContent", "countTokens", "embedContent"]} for r in routes]
    if dialect.name == "anthropic":
        return [{"type": "model", "id": r.pattern, "display_name": r.pattern, "created_at": "2025-01-01T00:00:00Z",
                 "max_tokens": r.max_output_tokens} for r in routes]
    return [{"id": r.pattern, "object": "model", "created": 0, "owned_by": r.upstream} for r in routes]


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models in the caller's dialect (OpenAI list, or Anthropic's paginated list)."""
    models = await _allowed_models(request)
    if request[REQUEST_DIALECT].name == "gemini":
        return web.json_response({"models": models})
    if request[REQUEST_DIALECT].name == "anthropic":
        return web.json_response({"data": models, "has_more": False,
                                  "first_id": models[0]["id"] if models else None,
                                  "last_id": models[-1]["id"] if models else None})
    return web.json_response({"object": "list", "data": models})


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}: one model object, if the plan allows it."""
    wanted = request.match_info["model"]
    for model in await _allowed_models(request):
        if wanted in (model.get("id"), model.get("baseModelId")):
            return web.json_response(model)
    raise NotFound(f"The model '{wanted}' does not exist or is not in your plan.")


async def credits(request: web.Request) -> web.Response:
    """GET /gateway/credits: the key holder's balance and cycle, with this cycle's unread alerts."""
    gw, account_id, account = await key_holder(request)
    view = account_view(account_id, account, gw.config)
    cycle = f"{account_id}:{account.get('cycle_start_ms', '')}:"
    unread = [a for a in await list_alerts(gw, account_id) if not a["read"] and a["id"].startswith(cycle)]
    view["warnings"] += [a["message"] for a in unread if a["kind"] != "low_credit"]  # low credit: already there
    view["alerts"] = unread
    return web.json_response(view)


async def _redis_answers(gw: Gateway) -> bool:
    try:
        await gw.redis.ping()
    except REDIS_DOWN:
        return False
    return True


async def health(request: web.Request) -> web.Response:
    """Liveness: 200 while the process can serve once Redis answers (`redis` says whether it does now);
    503 only when the embedded redis-server this process owns could not be kept running, so that an
    orchestrator restarts the gateway."""
    gw = request.app[GATEWAY]
    body: dict[str, Any] = {"status": "ok", "pid": os.getpid(),
                            "redis": "up" if await _redis_answers(gw) else "down"}
    if gw.embedded is not None:
        body["embedded_redis"] = gw.embedded.state
        body["embedded_redis_restarts"] = gw.embedded.restarts
        if gw.embedded.state == "failed":
            body["status"] = "failed"
            return web.json_response(body, status=503)
    return web.json_response(body)


async def ready(request: web.Request) -> web.Response:
    """Readiness: Redis answers and the gateway is not shutting down."""
    gw = request.app[GATEWAY]
    if gw.draining:
        return web.json_response({"status": "draining", "redis": True, "config": True}, status=503)
    if not await _redis_answers(gw):
        return web.json_response({"status": "unavailable", "redis": False, "config": True}, status=503)
    return web.json_response({"status": "ok", "redis": True, "config": True})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics; with GATEWAY_METRICS_KEY set, only for `Authorization: Bearer <that key>`."""
    gw = request.app[GATEWAY]
    expected = gw.settings.metrics_key.reveal()
    if expected:
        auth = request.headers.get("Authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode()):
            raise Unauthorized("The metrics need the metrics key: Authorization: Bearer <GATEWAY_METRICS_KEY>.",
                               headers={"WWW-Authenticate": "Bearer"})
    body = gw.metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


# ---------------------------------------------------------------- listeners

OPERATOR_APP = web.AppKey("operator_app", web.Application)
_BOTH_LISTENERS = frozenset({"/health", "/ready", "/dashboard", "/dashboard/{name}"})


def _is_operator_route(canonical: str) -> bool:
    return canonical == "/metrics" or canonical == "/admin" or canonical.startswith("/admin/")


def _listener_policy(operator: bool) -> Any:
    """With a separate operator listener, the public one answers 404 for the admin API and the metrics,
    and the operator one serves nothing else (besides health, readiness and the dashboard page)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        resource = request.match_info.route.resource
        canonical = resource.canonical if resource is not None else None
        if canonical is not None and canonical not in _BOTH_LISTENERS and _is_operator_route(canonical) != operator:
            raise web.HTTPNotFound()
        return await handler(request)

    return middleware


def _listener_app(gw: Gateway, keys: AdminKeys, operator: bool | None) -> web.Application:
    """An application for one listener: every guard against hostile clients (header and body timeouts,
    connections per client, one quiet log line per malformed request), and, when the operator surface
    has a listener of its own (`operator` not None), which side of it this one is."""
    settings = gw.settings
    middlewares: list[Any] = [error_middleware]
    if operator is not None:
        middlewares.append(_listener_policy(operator))
    middlewares.append(body_deadline(settings.body_timeout_seconds))
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes,
                          handler_args=handler_args(settings.header_timeout_seconds, settings.body_timeout_seconds))
    cap_connections_per_client(app, settings.max_connections_per_client, gw.metrics.connections_refused.inc)
    app[GATEWAY] = gw
    app[ADMIN_KEYS] = keys
    tracer = tracing.from_env()
    if tracer is not None:
        app[tracing.TRACER] = tracer
    return app


async def operator_listener_ctx(app: web.Application) -> AsyncIterator[None]:
    """The admin API, the metrics and the dashboard on their own listener (GATEWAY_ADMIN_PORT)."""
    settings = app[GATEWAY].settings
    runner = web.AppRunner(app[OPERATOR_APP], access_log_class=AccessLogger)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.admin_host, settings.admin_port,
                           reuse_port=True if settings.admin_reuse_port else None)
        await site.start()
        log.info("operator listener (admin API, metrics, dashboard) on %s:%s", settings.admin_host,
                 settings.admin_port)
        yield
    finally:
        await runner.cleanup()


def _checked_tool_path(dialect: Dialect, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """`/tools/...` behind a check of the raw path (dot segments, encoded separators): refused with 400
    before the key is looked up or anything is held."""

    async def checked(request: web.Request) -> web.StreamResponse:
        request[REQUEST_DIALECT] = dialect
        tool_path(request.raw_path)
        return await handler(request)

    return checked


def _add_routes(app: web.Application, gw: Gateway) -> None:
    openai, anthropic = gw.dialects["openai"], gw.dialects["anthropic"]
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/chat/completions", make_handler(openai, "chat"))
        app.router.add_post(f"{prefix}/completions", make_handler(openai, "completions"))
        app.router.add_post(f"{prefix}/embeddings", make_handler(openai, "embeddings"))
        app.router.add_post(f"{prefix}/responses", make_handler(openai, "responses"))
        app.router.add_get(f"{prefix}/models", list_models)
        app.router.add_get(f"{prefix}/models/{{model}}", get_model)
    app.router.add_post("/v1/messages", make_handler(anthropic, "messages"))
    app.router.add_post("/v1/messages/count_tokens", make_token_count_handler(anthropic, "count_tokens"))
    gemini = gw.dialects["gemini"]
    for version in ("v1", "v1beta"):
        base = f"/{version}/models/{{model}}"
        for method in ("generateContent", "streamGenerateContent", "embedContent", "batchEmbedContents"):
            app.router.add_post(f"{base}:{method}", make_handler(gemini, method))
        app.router.add_post(f"{base}:countTokens", make_token_count_handler(gemini, "countTokens"))
    app.router.add_get("/v1beta/models", list_models)
    app.router.add_get("/v1beta/models/{model}", get_model)
    app.router.add_route("*", "/tools/{model}/{tail:.*}", _checked_tool_path(gw.dialects["http"],
                                                                            make_handler(gw.dialects["http"], "call")))
    app.router.add_get("/gateway/credits", credits)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    admin.add_routes(app)
    usage_routes.add_routes(app)
    dashboard.add_routes(app)


def create_app(settings: Settings, config: Config | None = None) -> web.Application:
    """Build the gateway application. Redis, the upstream session and the reaper start with it; with
    `settings.admin_port`, so does the operator listener (admin API, metrics, dashboard)."""
    logs.apply_env_format()  # GATEWAY_LOG_FORMAT=json in a worker that logging.basicConfig set up
    counters = Metrics(settings.metrics_dir)
    gw = Gateway(
        settings=settings,
        config=config or load_config(settings.config_dir),
        schema=KeySchema(settings.key_prefix),
        metrics=counters,
        dialects=all_dialects(),
        retries=Retries(counters),
    )
    keys = AdminKeys(settings)
    separate = settings.admin_port is not None
    app = _listener_app(gw, keys, operator=False if separate else None)
    app.cleanup_ctx.extend([redis_ctx, session_ctx, settlement_ctx, reaper_ctx, reload_ctx, webhooks_ctx])
    app.cleanup_ctx.append(shipper_ctx)  # the durable ledger: drains ledgers to GATEWAY_LEDGER_SINK, if set
    app.on_shutdown.append(drain_on_shutdown)
    _add_routes(app, gw)
    if separate:
        operator = _listener_app(gw, keys, operator=True)
        _add_routes(operator, gw)
        app[OPERATOR_APP] = operator
        app.cleanup_ctx.append(operator_listener_ctx)
    return app

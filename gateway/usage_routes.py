"""Usage and alerts over HTTP: `GET /gateway/usage[/summary]` and `/gateway/alerts` for a key holder,
`GET /admin/accounts/{id}/usage[/summary]` and `/alerts` for an operator. Usage filters: `from`/`to`
(ISO 8601 or unix ms), `model`, `provider`; pages of `limit` events (at most 1000) continued with
`cursor`. A page reads a bounded number of ledger entries however few match, so a filter that matches
nothing answers an empty page with a `next_cursor`; a summary reads a bounded number of entries and
says `truncated` past them (see gateway.ledger)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.admin import check_admin
from gateway.alerts import list_alerts, mark_read
from gateway.errors import BadRequest, NotFound
from gateway.ledger import PAGE_MAX, Query, cycle_summary, query_usage
from gateway.state import GATEWAY, Gateway
from gateway.statements import statement, statement_list
from gateway.store import redis_guard

_CURSOR = re.compile(r"^\d{1,15}-\d{1,9}$")


def _time(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    if value.isdigit():
        return int(value)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"'{name}' must be an ISO 8601 time or unix milliseconds.", param=name) from None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp() * 1000)


def parse_query(params: Any) -> Query:
    limit_text = params.get("limit", "100")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= PAGE_MAX:
        raise BadRequest(f"'limit' must be a whole number from 1 to {PAGE_MAX}.", param="limit")
    cursor = params.get("cursor") or None
    if cursor is not None and not _CURSOR.match(cursor):
        raise BadRequest("'cursor' is not one this API returned.", param="cursor")
    return Query(_time(params.get("from"), "from"), _time(params.get("to"), "to"), params.get("model") or None,
                 params.get("provider") or None, int(limit_text), cursor)


async def key_holder(request: web.Request) -> tuple[Gateway, str, dict[str, str]]:
    """The calling key's account id and account record (any dialect's key header)."""
    gw = request.app[GATEWAY]
    assert gw.auth is not None
    raw = (gw.dialects["openai"].client_key(request.headers, request.query)
           or request.headers.get("x-api-key") or request.headers.get("x-goog-api-key"))
    principal = await gw.auth.authenticate(raw, request.remote)
    return gw, principal.account_id, await gw.auth.live_account(principal, reading=True)


async def _usage(gw: Gateway, account_id: str, request: web.Request, account: dict[str, str]) -> web.Response:
    q = parse_query(request.query)
    async with redis_guard():
        events, cursor = await query_usage(gw.redis, account_id, gw.schema.for_account(account_id), q,
                                           external_id=account.get("external_id"))
    return web.json_response({"data": events, "next_cursor": cursor, "has_more": cursor is not None})


async def _summary(gw: Gateway, account_id: str, account: dict[str, str]) -> web.Response:
    async with redis_guard():
        summary = await cycle_summary(gw.redis, account_id, gw.schema.for_account(account_id), account)
    return web.json_response(summary)


async def my_usage(request: web.Request) -> web.Response:
    gw, account_id, account = await key_holder(request)
    return await _usage(gw, account_id, request, account)


async def my_summary(request: web.Request) -> web.Response:
    gw, account_id, account = await key_holder(request)
    return await _summary(gw, account_id, account)


async def account_usage(request: web.Request) -> web.Response:
    gw, store = check_admin(request)
    account_id = request.match_info["account_id"]
    return await _usage(gw, account_id, request, await store.account_raw(account_id))


async def account_summary(request: web.Request) -> web.Response:
    gw, store = check_admin(request)
    account_id = request.match_info["account_id"]
    return await _summary(gw, account_id, await store.account_raw(account_id))


async def my_alerts(request: web.Request) -> web.Response:
    gw, account_id, _account = await key_holder(request)
    async with redis_guard():
        return web.json_response({"data": await list_alerts(gw, account_id)})


async def read_alert(request: web.Request) -> web.Response:
    gw, account_id, _account = await key_holder(request)
    async with redis_guard():
        if not await mark_read(gw, account_id, request.match_info["alert_id"]):
            raise NotFound("No such alert.")
    return web.json_response({"id": request.match_info["alert_id"], "read": True})


async def account_alerts(request: web.Request) -> web.Response:
    gw, store = check_admin(request)
    account_id = request.match_info["account_id"]
    await store.account_raw(account_id)
    async with redis_guard():
        return web.json_response({"data": await list_alerts(gw, account_id)})


async def my_keys(request: web.Request) -> web.Response:
    """GET /gateway/keys: the calling account's keys (prefix, label, status, scopes, last use, budgets and
    what each spent; never a secret)."""
    gw, account_id, _account = await key_holder(request)
    assert gw.store is not None
    return web.json_response({"data": await gw.store.list_keys(account_id)})


async def _statement(gw: Gateway, account_id: str, account: dict[str, str], cycle: str) -> web.Response:
    store = gw.store
    offset = store.clock_offset_ms if store is not None else 0
    async with redis_guard():
        found = await statement(gw.redis, gw.schema.for_account(account_id), account_id, account, gw.config, cycle,
                                offset)
    return web.json_response(found)


async def my_statements(request: web.Request) -> web.Response:
    """GET /gateway/statements: every billing cycle's figures, newest first."""
    gw, account_id, account = await key_holder(request)
    return web.json_response({"data": statement_list(account_id, account, gw.config)})


async def my_statement(request: web.Request) -> web.Response:
    """GET /gateway/statements/{cycle} (YYYY-MM or current): one cycle, with usage by model and key."""
    gw, account_id, account = await key_holder(request)
    return await _statement(gw, account_id, account, request.match_info["cycle"])


async def account_statements(request: web.Request) -> web.Response:
    gw, store = check_admin(request)
    account_id = request.match_info["account_id"]
    return web.json_response({"data": statement_list(account_id, await store.account_raw(account_id), gw.config)})


async def account_statement(request: web.Request) -> web.Response:
    gw, store = check_admin(request)
    account_id = request.match_info["account_id"]
    return await _statement(gw, account_id, await store.account_raw(account_id), request.match_info["cycle"])


def add_routes(app: web.Application) -> None:
    app.router.add_get("/gateway/statements", my_statements)
    app.router.add_get("/gateway/statements/{cycle}", my_statement)
    app.router.add_get("/admin/accounts/{account_id}/statements", account_statements)
    app.router.add_get("/admin/accounts/{account_id}/statements/{cycle}", account_statement)
    app.router.add_get("/gateway/keys", my_keys)
    app.router.add_get("/gateway/alerts", my_alerts)
    app.router.add_post("/gateway/alerts/{alert_id}/read", read_alert)
    app.router.add_get("/admin/accounts/{account_id}/alerts", account_alerts)
    app.router.add_get("/gateway/usage", my_usage)
    app.router.add_get("/gateway/usage/summary", my_summary)
    app.router.add_get("/admin/accounts/{account_id}/usage", account_usage)
    app.router.add_get("/admin/accounts/{account_id}/usage/summary", account_summary)

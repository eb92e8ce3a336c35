"""The admin HTTP API: accounts, keys, credit grants and plan changes (JSON, admin key required)."""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from gateway.admin_keys import ADMIN_KEYS, AdminKeys
from gateway.alerts import webhook_label
from gateway.auth import check_scopes
from gateway.budgets import budget_changes
from gateway.config import key_limits
from gateway.errors import BadRequest, Unauthorized
from gateway.idempotency import check_idempotency_key
from gateway.limits import METRIC_WORDS
from gateway.money import amount, credits_to_micro
from gateway.state import GATEWAY, Gateway
from gateway.store import Credited, Store, parse_expiry, redis_guard
from gateway.store_billing import adjust, check_external_id, check_reason, set_status, update_account
from gateway.views import account_view, key_view

log = logging.getLogger("gateway.admin")


def check_admin(request: web.Request) -> tuple[Gateway, Store]:
    """The gateway and its store, for a request that carries an admin key (`Authorization: Bearer` or
    `X-Admin-Key`); the key's name is logged, never the key."""
    gw = request.app[GATEWAY]
    keys = request.app.get(ADMIN_KEYS) or AdminKeys(gw.settings)
    if not keys.configured:
        raise Unauthorized("The admin API is disabled: set GATEWAY_ADMIN_KEY (or GATEWAY_ADMIN_KEYS).")
    auth = request.headers.get("Authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("X-Admin-Key", "")
    name = keys.name_of(given)
    if name is None:
        log.warning("admin %s %s refused: no valid admin key", request.method, request.path)
        raise Unauthorized("Invalid admin key.")
    log.info("admin %s %s by key %r", request.method, request.path, name)
    assert gw.store is not None
    return gw, gw.store


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def _string(body: dict[str, Any], name: str, *, required: bool = True, default: str = "") -> str:
    value = body.get(name, None if required else default)
    if value is None and required:
        raise BadRequest(f"'{name}' is required.", param=name)
    if not isinstance(value, str) or (required and not value.strip()):
        raise BadRequest(f"'{name}' must be a non-empty string.", param=name)
    return value


async def create_account(request: web.Request) -> web.Response:
    gw, store = check_admin(request)
    body = await read_json(request)
    name = _string(body, "name")
    plan = _string(body, "plan", required=False, default=gw.config.default_plan)
    timezone = body.get("timezone")
    if timezone is not None and not isinstance(timezone, str):
        raise BadRequest("'timezone' must be an IANA time zone name.", param="timezone")
    external_id = check_external_id(body["external_id"]) if body.get("external_id") is not None else ""
    account_id = await store.create_account(gw.config, name, plan, timezone, external_id)
    return web.json_response(account_view(account_id, await store.account_raw(account_id), gw.config), status=201)


async def get_account(request: web.Request) -> web.Response:
    gw, store = check_admin(request)
    account_id = request.match_info["account_id"]
    return web.json_response(account_view(account_id, await store.account_raw(account_id), gw.config))


async def create_key(request: web.Request) -> web.Response:
    gw, store = check_admin(request)
    body = await read_json(request)
    label = _string(body, "label", required=False)
    try:
        scopes = check_scopes(body.get("scopes") or [])
    except ValueError as exc:
        raise BadRequest(f"Invalid scopes: {exc}.", param="scopes") from None
    limits = body.get("limits") or {}
    try:
        key_limits(limits)
    except ValueError as exc:
        raise BadRequest(f"Invalid key limits: {exc}.", param="limits") from None
    budgets = budget_changes(body)
    account_id = request.match_info["account_id"]
    new = await store.create_key(account_id, label, parse_expiry(body.get("expires_at")), scopes,
                                 limits, await max_keys(gw, store, account_id), budgets)
    return web.json_response({**await store.key_view_of(new.id), "key": new.key}, status=201)


async def max_keys(gw: Gateway, store: Store, account_id: str) -> int | None:
    """The most usable keys the account's plan allows (None: no limit)."""
    plan = gw.config.plans.get((await store.account_raw(account_id)).get("plan", ""))
    return plan.max_keys if plan else None


def _credited(body: dict[str, Any], credited: Credited) -> web.Response:
    """A grant's or pack's answer; a replay (same Idempotency-Key) is the first answer, marked as such."""
    headers = {"Idempotent-Replayed": "true"} if credited.replayed else None
    return web.json_response({**body, **amount("credits_remaining", credited.available)}, headers=headers)


async def list_keys(request: web.Request) -> web.Response:
    _gw, store = check_admin(request)
    return web.json_response({"data": await store.list_keys(request.match_info["account_id"])})


async def revoke_key(request: web.Request) -> web.Response:
    _gw, store = check_admin(request)
    return web.json_response(await store.revoke_key(request.match_info["key_id"]))


def _credits_field(body: dict[str, Any]) -> int:
    """The body's required `credits` (a number or decimal string) in micro-credits, or a 400."""
    if "credits" not in body:
        raise BadRequest("'credits' is required.", param="credits")
    try:
        return credits_to_micro(body["credits"])
    except ValueError as exc:
        raise BadRequest(f"Invalid 'credits': {exc}.", param="credits") from None


async def grant_credits(request: web.Request) -> web.Response:
    """POST /admin/accounts/{id}/credits {credits, note?}; an `Idempotency-Key` header makes a retry safe."""
    _gw, store = check_admin(request)
    idempotency_key = check_idempotency_key(request.headers.get("Idempotency-Key"))
    body = await read_json(request)
    micro = _credits_field(body)
    note = body.get("note", "")
    if not isinstance(note, str):
        raise BadRequest("'note' must be a string.", param="note")
    account_id = request.match_info["account_id"]
    credited = await store.grant(account_id, micro, note, idempotency_key)
    return _credited({"account_id": account_id, **amount("granted", micro)}, credited)


async def update(request: web.Request) -> web.Response:
    """PATCH /admin/accounts/{id} {name?, external_id?}: the account view after."""
    gw, store = check_admin(request)
    body = await read_json(request)
    account_id = request.match_info["account_id"]
    name = _string(body, "name") if "name" in body else None
    external_id = check_external_id(body["external_id"] or "") if "external_id" in body else None
    await update_account(store, account_id, name, external_id)
    return web.json_response(account_view(account_id, await store.account_raw(account_id), gw.config))


async def lifecycle(request: web.Request) -> web.Response:
    """POST /admin/accounts/{id}/suspend|reactivate|close {reason?}: the account view after. A
    suspended or closed account's requests are refused (403); closed is final (409 afterwards)."""
    gw, store = check_admin(request)
    body = await read_json(request)
    account_id = request.match_info["account_id"]
    await set_status(store, account_id, request.match_info["action"], check_reason(body.get("reason")))
    return web.json_response(account_view(account_id, await store.account_raw(account_id), gw.config))


async def adjustment(request: web.Request) -> web.Response:
    """POST /admin/accounts/{id}/adjustments {credits, reason} with a required `Idempotency-Key`:
    a refund (credits > 0) or a deduction (< 0), applied once however often it is sent."""
    _gw, store = check_admin(request)
    idempotency_key = check_idempotency_key(request.headers.get("Idempotency-Key"))
    body = await read_json(request)
    micro = _credits_field(body)
    account_id = request.match_info["account_id"]
    done = await adjust(store, account_id, micro, check_reason(body.get("reason"), required=True), idempotency_key)
    headers = {"Idempotent-Replayed": "true"} if done.replayed else None
    return web.json_response({"account_id": account_id, "adjustment_id": done.adjustment_id,
                              **amount("credits", done.micro), **amount("credits_remaining", done.available),
                              "replayed": done.replayed}, headers=headers)


async def set_plan(request: web.Request) -> web.Response:
    gw, store = check_admin(request)
    body = await read_json(request)
    account_id = request.match_info["account_id"]
    expires = body.get("expires_at")
    change = await store.change_plan(gw.config, account_id, _string(body, "plan"), body.get("effective"),
                                     -1 if expires is None else parse_expiry(expires))
    return web.json_response({**account_view(account_id, await store.account_raw(account_id), gw.config),
                              "change": change})


async def buy_pack(request: web.Request) -> web.Response:
    """POST /admin/accounts/{id}/packs {pack}; an `Idempotency-Key` header makes a retry safe."""
    gw, store = check_admin(request)
    idempotency_key = check_idempotency_key(request.headers.get("Idempotency-Key"))
    body = await read_json(request)
    account_id = request.match_info["account_id"]
    pack = _string(body, "pack")
    credited = await store.buy_pack(gw.config, account_id, pack, idempotency_key)
    return _credited({"account_id": account_id, "pack": pack}, credited)


async def renew(request: web.Request) -> web.Response:
    gw, store = check_admin(request)
    body = await read_json(request)
    account_id = request.match_info["account_id"]
    await store.renew(account_id, body.get("months", 1))
    return web.json_response(account_view(account_id, await store.account_raw(account_id), gw.config))


async def list_accounts(request: web.Request) -> web.Response:
    """GET /admin/accounts?plan=&status=&name=&limit=&after=: a page of accounts in id order."""
    gw, store = check_admin(request)
    q = request.query
    try:
        limit = int(q.get("limit", "50"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 500:
        raise BadRequest("'limit' must be a whole number from 1 to 500.", param="limit")
    found, more = await store.list_accounts(q.get("plan") or None, q.get("status") or None, q.get("name") or None,
                                            limit, q.get("after") or None)
    data = [account_view(account_id, rec, gw.config) for account_id, rec in found]
    return web.json_response({"data": data, "has_more": more, "next_after": data[-1]["id"] if more else None})


async def stats(request: web.Request) -> web.Response:
    _gw, store = check_admin(request)
    return web.json_response(await store.stats())


async def rotate_key(request: web.Request) -> web.Response:
    """POST /admin/keys/{id}/rotate {grace_seconds}: a new key (shown once); the old one expires after
    the grace period (an hour by default)."""
    gw, store = check_admin(request)
    body = await read_json(request)
    grace = body.get("grace_seconds", 3600)
    if not isinstance(grace, int | float) or isinstance(grace, bool) or not 0 <= grace <= 30 * 86_400:
        raise BadRequest("'grace_seconds' must be a number of seconds from 0 to 30 days.", param="grace_seconds")
    account_id, _ = await store.key_record(request.match_info["key_id"])
    new, old = await store.rotate_key(request.match_info["key_id"], int(grace * 1000),
                                      await max_keys(gw, store, account_id))
    _, record = await store.key_record(new.id)
    return web.json_response({**key_view(new.id, new.account_id, record), "key": new.key, "previous": old},
                             status=201)


async def update_key(request: web.Request) -> web.Response:
    """PATCH /admin/keys/{id} {label, expires_at, budget_credits_per_cycle, budget_credits_lifetime}:
    expires_at null means never, a budget null means none; an absent field stays as it is."""
    gw, store = check_admin(request)
    body = await read_json(request)
    label = body.get("label")
    if label is not None and not isinstance(label, str):
        raise BadRequest("'label' must be a string.", param="label")
    expires = parse_expiry(body["expires_at"]) if "expires_at" in body else None
    account_id, _ = await store.key_record(request.match_info["key_id"])
    return web.json_response(await store.update_key(request.match_info["key_id"], label=label, expires_ms=expires,
                                                    max_keys=await max_keys(gw, store, account_id),
                                                    budgets=budget_changes(body)))


async def list_plans(request: web.Request) -> web.Response:
    """GET /admin/plans: the plans configured now (as plans.yaml says, after the last reload)."""
    gw, _store = check_admin(request)
    # caps in plans.yaml's units: credits and USD as exact decimal strings (never micro), tokens and requests as counts
    data = [{"name": p.name, **amount("monthly_credits", p.monthly_credits), "credit_usd": str(p.credit_usd),
             "markup": str(p.markup), "models": list(p.models), "max_keys": p.max_keys, "timezone": p.timezone,
             "default": p.name == gw.config.default_plan,
             "limits": [{"id": lim.id, **(amount("cap", lim.cap) if lim.metric in ("c", "u") else {"cap": lim.cap}),
                         "metric": lim.metric, "unit": METRIC_WORDS[lim.metric], "window_ms": lim.window_ms,
                         "provider": lim.provider} for lim in p.limits]}
            for p in gw.config.plans.values()]
    packs = [{"name": k.name, **amount("credits", k.credits), "price_usd": str(k.price_usd)}
             for k in gw.config.packs.values()]
    return web.json_response({"data": data, "packs": packs})


async def set_webhook(request: web.Request) -> web.Response:
    """PUT /admin/accounts/{id}/webhook {url, secret}: the account's own alert webhook (over the plan's).
    The ledger and the answer name it by host and fingerprint only: its path (Slack-style URLs are
    secrets) and the secret stay in the account record."""
    gw, store = check_admin(request)
    account_id = request.match_info["account_id"]
    await store.account_raw(account_id)
    body = await read_json(request)
    url, secret = body.get("url"), body.get("secret", "")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or not isinstance(secret, str):
        raise BadRequest("'url' must be an http(s) URL and 'secret' a string.", param="url")
    label = webhook_label(url)
    await store.admin_event(account_id, {"type": "webhook_set", "webhook": label},
                            gw.schema.for_account(account_id).account, {"webhook_url": url, "webhook_secret": secret})
    return web.json_response({"account_id": account_id, "webhook": label})


async def get_webhook(request: web.Request) -> web.Response:
    """GET /admin/accounts/{id}/webhook: the one answer that shows the account's webhook URL (the
    operator asked for it); the secret is write-only."""
    gw, store = check_admin(request)
    account_id = request.match_info["account_id"]
    await store.account_raw(account_id)
    async with redis_guard():
        url, secret = await gw.redis.hmget(gw.schema.for_account(account_id).account,
                                           ["webhook_url", "webhook_secret"])
    return web.json_response({"account_id": account_id, "url": url or None,
                              "webhook": webhook_label(url) if url else None, "secret_set": bool(secret)})


def add_routes(app: web.Application) -> None:
    app.router.add_put("/admin/accounts/{account_id}/webhook", set_webhook)
    app.router.add_get("/admin/accounts/{account_id}/webhook", get_webhook)
    app.router.add_get("/admin/plans", list_plans)
    app.router.add_get("/admin/accounts", list_accounts)
    app.router.add_get("/admin/stats", stats)
    app.router.add_post("/admin/keys/{key_id}/rotate", rotate_key)
    app.router.add_patch("/admin/keys/{key_id}", update_key)
    app.router.add_post("/admin/accounts", create_account)
    app.router.add_get("/admin/accounts/{account_id}", get_account)
    app.router.add_post("/admin/accounts/{account_id}/keys", create_key)
    app.router.add_get("/admin/accounts/{account_id}/keys", list_keys)
    app.router.add_delete("/admin/keys/{key_id}", revoke_key)
    app.router.add_post("/admin/accounts/{account_id}/credits", grant_credits)
    app.router.add_put("/admin/accounts/{account_id}/plan", set_plan)
    app.router.add_post("/admin/accounts/{account_id}/packs", buy_pack)
    app.router.add_post("/admin/accounts/{account_id}/renew", renew)
    app.router.add_patch("/admin/accounts/{account_id}", update)
    app.router.add_post("/admin/accounts/{account_id}/adjustments", adjustment)
    app.router.add_post(r"/admin/accounts/{account_id}/{action:suspend|reactivate|close}", lifecycle)

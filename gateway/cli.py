"""The `gateway` command: serve, the provider emulator, and operator commands on accounts and keys.

Operator commands talk to Redis directly: REDIS_URL (or --redis-url) when given, else the embedded
server a running `gateway serve` started (its URL is in the data directory), else the embedded server
on the data directory, started for the command, but only if that directory holds data (see
gateway.cli_common.open_redis). Each says on stderr which Redis it uses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.auth import check_scopes
from gateway.budgets import cli_budgets
from gateway.cli_billing import register as register_billing
from gateway.cli_common import EXIT_USAGE, iso, port_number, positive_int, table
from gateway.cli_common import config as _config
from gateway.cli_common import output as _output
from gateway.cli_common import run as _run
from gateway.cli_common import store as _store
from gateway.cli_serve import cmd_check_config, cmd_emulator, cmd_serve
from gateway.config import key_limits
from gateway.errors import GatewayError
from gateway.exports import PROVIDER_FORMATS
from gateway.idempotency import check_idempotency_key
from gateway.index import account_ids
from gateway.ledger import account_events, export_cursor, render
from gateway.money import amount, credits_to_micro, format_credits
from gateway.settings import SettingsError
from gateway.store import Store, parse_expiry
from gateway.views import account_view

ACCOUNT_STATUSES = ("active", "suspended", "closed")


def _described(view: dict[str, Any]) -> str:
    """An account, key or change as `name: value` lines a person reads (no Python reprs)."""
    def text(value: Any) -> str:
        if value is None or value == [] or value == {}:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, list | tuple):
            return ", ".join(text(v) for v in value)
        if isinstance(value, dict):
            return ", ".join(f"{k} {text(v)}" for k, v in value.items())
        return str(value)

    width = max((len(k) for k in view), default=0)
    return "\n".join(f"{k.replace('_', ' '):<{width}}  {text(v)}" for k, v in view.items())


# ---------------------------------------------------------------- operator commands


async def _accounts_create(args: argparse.Namespace) -> None:
    config = _config(args)
    async with _store(args) as store:
        account_id = await store.create_account(config, args.name, args.plan or config.default_plan)
        view = account_view(account_id, await store.account_raw(account_id), config)
    _output(args, view, f"created account {account_id} ({view['plan']}, {view['credits_remaining']} credits)")


async def _accounts_show(args: argparse.Namespace) -> None:
    config = _config(args)
    async with _store(args) as store:
        view = account_view(args.account_id, await store.account_raw(args.account_id), config)
    _output(args, view, _described(view))


async def _keys_create(args: argparse.Namespace) -> None:
    config = _config(args)
    try:
        limits = json.loads(args.limits) if args.limits else {}
        key_limits(limits)
        scopes = check_scopes(args.scope)
    except ValueError as exc:
        raise GatewayError(f"invalid --limits or --scope: {exc}") from None
    async with _store(args) as store:
        plan = config.plans.get((await store.account_raw(args.account)).get("plan", ""))
        new = await store.create_key(args.account, args.label or "", parse_expiry(args.expires_at), scopes, limits,
                                     plan.max_keys if plan else None, cli_budgets(args.budget, args.lifetime_budget))
        view = await store.key_view_of(new.id)
    _output(args, {**view, "key": new.key},
            f"created key {new.id} for {new.account_id}\n{new.key}\n(shown once: store it now)")


async def _keys_update(args: argparse.Namespace) -> None:
    async with _store(args) as store:
        view = await store.update_key(args.key_id, label=args.label,
                                      budgets=cli_budgets(args.budget, args.lifetime_budget))
    _output(args, view, _described(view))


async def _keys_rotate(args: argparse.Namespace) -> None:
    config = _config(args)
    async with _store(args) as store:
        account_id, _ = await store.key_record(args.key_id)
        plan = config.plans.get((await store.account_raw(account_id)).get("plan", ""))
        new, old = await store.rotate_key(args.key_id, args.grace_seconds * 1000, plan.max_keys if plan else None)
    _output(args, {"id": new.id, "key": new.key, "previous": old},
            f"created key {new.id} for {new.account_id}\n{new.key}\n(shown once: store it now)\n"
            f"{old['id']} stays valid until {old['expires_at']}")


async def _accounts_list(args: argparse.Namespace) -> None:
    config = _config(args)
    async with _store(args) as store:
        found, more = await store.list_accounts(args.plan, args.status, args.name, args.limit, args.after)
    views = [account_view(account_id, rec, config) for account_id, rec in found]
    text = table(("id", "plan", "status", "credits left", "name"),
                 [(v["id"], v["plan"], v["status"], v["credits_remaining"], v["name"]) for v in views])
    if more:
        text += f"\n(more: --after {views[-1]['id']})"
    _output(args, {"data": views, "has_more": more}, text if views else "no accounts")


async def _stats(args: argparse.Namespace) -> None:
    async with _store(args) as store:
        totals = await store.stats()
    _output(args, totals, _stats_text(totals))


def _stats_text(t: dict[str, Any]) -> str:
    def counts(by: dict[str, int]) -> str:
        return ", ".join(f"{n} {name or 'unknown'}" for name, n in sorted(by.items())) or "none"

    return (f"{t['accounts']} account(s). By plan: {counts(t['accounts_by_plan'])}. "
            f"By status: {counts(t['accounts_by_status'])}.\n"
            f"Credits: {t['credits_used_this_cycle']} used this cycle, {t['credits_used_lifetime']} used in all, "
            f"{t['credits_remaining']} remaining, {t['credits_held']} held by requests in flight.\n"
            f"Requests: {t['requests_this_cycle']} this cycle, {t['requests_lifetime']} in all.\n"
            f"Tokens: {t['tokens_this_cycle']} this cycle, {t['tokens_lifetime']} in all.")


async def _keys_list(args: argparse.Namespace) -> None:
    async with _store(args) as store:
        keys = await store.list_keys(args.account)
    rows = [(k["id"], f"{k['prefix']}…", k["status"], k.get("last_used_at") or "never", k.get("expires_at") or "never",
             k["label"]) for k in keys]
    _output(args, keys, table(("id", "key", "status", "last used", "expires", "label"), rows) if keys else "no keys")


async def _keys_revoke(args: argparse.Namespace) -> None:
    async with _store(args) as store:
        view = await store.revoke_key(args.key_id)
    _output(args, view, f"revoked {view['id']}")


async def _credits_grant(args: argparse.Namespace) -> None:
    try:
        micro = credits_to_micro(args.credits)
    except ValueError as exc:
        raise GatewayError(f"invalid --credits: {exc}") from None
    idempotency_key = check_idempotency_key(args.idempotency_key)
    async with _store(args) as store:
        credited = await store.grant(args.account, micro, args.note or "cli grant", idempotency_key)
    available = format_credits(credited.available)
    _output(args, {"account_id": args.account, **amount("granted", micro),
                   **amount("credits_remaining", credited.available), "replayed": credited.replayed},
            f"already granted with this idempotency key: nothing added; {available} available then"
            if credited.replayed else f"granted {args.credits} credits to {args.account}; {available} available")


async def _plans_change(args: argparse.Namespace) -> None:
    config = _config(args)
    async with _store(args) as store:
        change = await store.change_plan(config, args.account, args.plan, args.effective,
                                         -1 if args.expires_at is None else parse_expiry(args.expires_at))
    _output(args, change, f"{args.account}: plan {change['plan']}"
            + (f", {change['next_plan']} from the next cycle" if change["next_plan"] else "")
            + f" ({change['credited']} credits added)")


async def _plans_renew(args: argparse.Namespace) -> None:
    async with _store(args) as store:
        end = await store.renew(args.account, args.months)
    _output(args, {"account_id": args.account, "plan_expires_at": iso(end), "plan_expires_ms": end},
            f"{args.account}: subscription renewed until {iso(end)}")


async def _packs_buy(args: argparse.Namespace) -> None:
    config = _config(args)
    idempotency_key = check_idempotency_key(args.idempotency_key)
    async with _store(args) as store:
        credited = await store.buy_pack(config, args.account, args.pack, idempotency_key)
    available = format_credits(credited.available)
    _output(args, {"account_id": args.account, "pack": args.pack, **amount("credits_remaining", credited.available),
                   "replayed": credited.replayed},
            f"already added with this idempotency key: nothing added; {available} credits available then"
            if credited.replayed else f"added pack {args.pack} to {args.account}; {available} credits available")


def export_bound(value: str | None, option: str) -> int | None:
    """An export's --from / --until (an ISO 8601 date or date-time, UTC unless it says otherwise) as
    unix ms; `--until` is exclusive (an event at that moment is left for the next export)."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise GatewayError(f"invalid {option} {value!r}: give an ISO 8601 date or time, "
                           "e.g. 2026-10-01 or 2026-10-01T12:00:00Z") from None
    ms = int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp() * 1000)
    return ms - 1 if option == "--until" else ms


def _write_text(path: Path, text: str, append: bool) -> None:
    with path.open("a" if append else "w", encoding="utf-8") as out:
        out.write(text)


async def _usage_export(args: argparse.Namespace) -> None:
    async with _store(args) as store:
        redis, schema = store.redis, store.schema
        views, last, resumed = [], {}, False
        since, until = export_bound(args.since, "--from"), export_bound(args.until, "--until")
        if since is not None and until is not None and since >= until:
            raise GatewayError("--from must be before --until")
        async for account_id in _exported_accounts(args, store):
            after = await export_cursor(redis, schema, account_id, args.resume) if args.resume else None
            resumed = resumed or after is not None
            async for stream_id, view in account_events(redis, schema, account_id, after, until, since):
                views.append(view)
                last[account_id] = stream_id
        text = render(views, args.format, header=not resumed)
        if args.output:
            await asyncio.to_thread(_write_text, Path(args.output), text, args.append)
        else:
            sys.stdout.write(text)
        if args.resume and last:  # only once the events are written: an export is at least once, never lossy
            pipe = redis.pipeline(transaction=False)
            for account_id, stream_id in last.items():
                pipe.hset(schema.for_account(account_id).exports, args.resume, stream_id)
            await pipe.execute()
    print(f"exported {len(views)} usage event(s)", file=sys.stderr)


async def _exported_accounts(args: argparse.Namespace, store: Store) -> AsyncIterator[str]:
    """The account `--account` names, else every account in id order (the sharded index, merged)."""
    if args.account:
        yield args.account
        return
    async for account_id in account_ids(store.redis, store.schema):
        yield account_id


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Metering gateway for AI APIs.")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, redis: bool = True, create: bool = True) -> argparse.ArgumentParser:
        p.add_argument("--config-dir", type=Path, default=None,
                       help="the directory of plans.yaml and providers.yaml (GATEWAY_CONFIG_DIR, default config/)")
        if redis:
            p.add_argument("--redis-url", default=None, help="Redis URL (REDIS_URL); default: the embedded Redis")
            p.add_argument("--data-dir", type=Path, default=None,
                           help="the embedded Redis's data directory (GATEWAY_DATA_DIR, default var/)")
            if create:  # (serve always may: it makes a new store on its first run)
                p.add_argument("--create-data-dir", action="store_true",
                               help="start a new, empty embedded Redis when the data directory holds no data")
        p.add_argument("--json", action="store_true", help="print JSON on stdout")
        return p

    serve = common(sub.add_parser("serve", help="run the gateway"), create=False)
    serve.add_argument("--host", default=None, help="address to listen on (GATEWAY_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=port_number, default=None, help="port to listen on (GATEWAY_PORT, default 8080)")
    serve.add_argument("--workers", type=positive_int, default=None,
                       help="worker processes sharing the port (GATEWAY_WORKERS, default 1)")
    serve.add_argument("--admin-port", type=port_number, default=None,
                       help="serve /admin, /metrics and the dashboard on this port only (GATEWAY_ADMIN_PORT)")
    serve.add_argument("--admin-host", default=None,
                       help="the admin listener's address (GATEWAY_ADMIN_HOST, default 127.0.0.1)")
    serve.add_argument("--log-format", choices=("text", "json"), default=None,
                       help="log lines as text or one JSON object each (GATEWAY_LOG_FORMAT, default text)")
    serve.add_argument("--with-emulator", action="store_true",
                       help="also run the provider emulator, with the demo configuration (config/demo/) unless "
                            "--config-dir or GATEWAY_CONFIG_DIR names another")
    serve.add_argument("--emulator-port", type=port_number, default=None,
                       help="the emulator's port (EMULATOR_PORT, default 8090); the demo upstreams follow it")
    serve.set_defaults(func=cmd_serve)

    emulator = sub.add_parser("emulator", help="run the provider emulator alone")
    emulator.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    emulator.add_argument("--port", type=port_number, default=None, help="port (EMULATOR_PORT, default 8090)")
    emulator.set_defaults(func=cmd_emulator)
    for p in (serve, emulator):
        p.add_argument("--latency-ms", type=float, default=0.0, help="emulator: delay before each answer")
        p.add_argument("--chunk-delay-ms", type=float, default=0.0, help="emulator: delay between stream chunks")

    common(sub.add_parser("check-config", help="validate plans.yaml and providers.yaml (every problem at once)"),
           redis=False).set_defaults(func=cmd_check_config)

    accounts = sub.add_parser("accounts", help="manage accounts").add_subparsers(dest="action", required=True)
    create = common(accounts.add_parser("create", help="create an account"))
    create.add_argument("--name", required=True, help="the account's display name")
    create.add_argument("--plan", default=None, help="a plan of plans.yaml (default: its default_plan)")
    create.set_defaults(func=_run(_accounts_create))
    show = common(accounts.add_parser("show", help="show an account's balance"))
    show.add_argument("account_id", help="the account's id (acct_...)")
    show.set_defaults(func=_run(_accounts_show))
    alist = common(accounts.add_parser("list", help="list accounts (filters, pages)"))
    alist.add_argument("--plan", default=None, help="only accounts on this plan")
    alist.add_argument("--status", choices=ACCOUNT_STATUSES, default=None, help="only accounts with this status")
    alist.add_argument("--name", default=None, help="a substring of the name")
    alist.add_argument("--limit", type=positive_int, default=50, help="accounts per page (default 50)")
    alist.add_argument("--after", default=None, help="the last account id of the previous page")
    alist.set_defaults(func=_run(_accounts_list))
    common(sub.add_parser("stats", help="platform totals: accounts by plan, spend, requests, tokens")
           ).set_defaults(func=_run(_stats))

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    kcreate = common(keys.add_parser("create", help="create a key (shown once)"))
    kcreate.add_argument("--account", required=True, help="the account the key spends from")
    kcreate.add_argument("--label", default="", help="a name for the key (e.g. the machine it is for)")
    kcreate.add_argument("--expires-at", default=None, help="when the key stops working, ISO 8601 time")
    kcreate.add_argument("--limits", default=None,
                         help='the key\'s own rate limits as JSON, e.g. \'{"requests_per_minute": 20}\'')
    kcreate.add_argument("--scope", action="append", default=[],
                         help="narrow the key: api:<openai|anthropic|gemini|http> or model:<glob> (repeatable)")
    kupdate = common(keys.add_parser("update", help="change a key's label or budgets"))
    kupdate.add_argument("key_id", help="the key's id (key_...), never the key itself")
    kupdate.add_argument("--label", default=None, help="a new label for the key")
    for kparser, removable in ((kcreate, ""), (kupdate, "; 'none' removes it")):
        kparser.add_argument("--budget", default=None, help=f"credits the key may spend per billing cycle{removable}")
        kparser.add_argument("--lifetime-budget", default=None, help=f"credits the key may ever spend{removable}")
    kcreate.set_defaults(func=_run(_keys_create))
    kupdate.set_defaults(func=_run(_keys_update))
    krotate = common(keys.add_parser("rotate", help="a new key; the old one stays valid for a grace period"))
    krotate.add_argument("key_id", help="the key's id (key_...)")
    krotate.add_argument("--grace-seconds", type=int, default=3600,
                         help="how long the old key keeps working (default 3600)")
    krotate.set_defaults(func=_run(_keys_rotate))
    klist = common(keys.add_parser("list", help="list an account's keys"))
    klist.add_argument("--account", required=True, help="the account's id")
    klist.set_defaults(func=_run(_keys_list))
    krevoke = common(keys.add_parser("revoke", help="revoke a key at once"))
    krevoke.add_argument("key_id", help="the key's id (key_...)")
    krevoke.set_defaults(func=_run(_keys_revoke))

    credits = sub.add_parser("credits", help="manage credits").add_subparsers(dest="action", required=True)
    grant = common(credits.add_parser("grant", help="grant credits that never expire"))
    grant.add_argument("--account", required=True, help="the account's id")
    grant.add_argument("--credits", required=True, help="credits to add (a decimal, at most 6 places)")
    grant.add_argument("--note", default="", help="why (kept in the ledger)")
    grant.add_argument("--idempotency-key", default=None,
                       help="a retry with the same key (within 24 h) credits nothing and prints the first answer")
    grant.set_defaults(func=_run(_credits_grant))

    plans = sub.add_parser("plans", help="change subscriptions").add_subparsers(dest="action", required=True)
    change = common(plans.add_parser("change", help="upgrade (at once) or downgrade (next cycle) an account"))
    change.add_argument("--account", required=True, help="the account's id")
    change.add_argument("--plan", required=True, help="the new plan (a plan of plans.yaml)")
    change.add_argument("--effective", choices=("now", "next_cycle"), default=None,
                        help="when the change applies (default: upgrades now, downgrades at the next cycle)")
    change.add_argument("--expires-at", default=None, help="subscription end, ISO 8601 (then: the default plan)")
    change.set_defaults(func=_run(_plans_change))
    renew = common(plans.add_parser("renew", help="move a subscription's end on by whole months (it must have one)"))
    renew.add_argument("--account", required=True, help="the account's id")
    renew.add_argument("--months", type=positive_int, default=1, help="whole months to add (default 1)")
    renew.set_defaults(func=_run(_plans_renew))

    usage = sub.add_parser("usage", help="the usage ledger").add_subparsers(dest="action", required=True)
    export = common(usage.add_parser("export", help="usage events as JSONL, CSV, CloudEvents 1.0, or Stripe meter "
                                                    "events, Lago events, OpenMeter CloudEvents"))
    export.add_argument("--format", choices=("jsonl", "csv", "cloudevents", *PROVIDER_FORMATS), default="jsonl",
                        help="jsonl (default), csv, cloudevents, or a billing provider's shape (README)")
    export.add_argument("--output", default=None, help="file to write (default: standard output)")
    export.add_argument("--append", action="store_true", help="append to --output instead of replacing it")
    export.add_argument("--resume", default=None, metavar="NAME",
                        help="continue the export NAME where it stopped, and remember where this one stops")
    export.add_argument("--account", default=None, help="one account only")
    export.add_argument("--from", dest="since", default=None, help="events from this ISO 8601 date or time (UTC)")
    export.add_argument("--until", default=None, help="events before this ISO 8601 date or time (UTC)")
    export.set_defaults(func=_run(_usage_export))

    packs = sub.add_parser("packs", help="credit packs").add_subparsers(dest="action", required=True)
    buy = common(packs.add_parser("buy", help="add a pack from plans.yaml (its credits never expire)"))
    buy.add_argument("--account", required=True, help="the account's id")
    buy.add_argument("--pack", required=True, help="a pack of plans.yaml")
    buy.add_argument("--idempotency-key", default=None,
                     help="a retry with the same key (within 24 h) adds nothing and prints the first answer")
    buy.set_defaults(func=_run(_packs_buy))
    register_billing(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SettingsError as exc:  # a bad GATEWAY_* value: named, never a traceback
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `gateway usage export | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 141  # 128 + SIGPIPE

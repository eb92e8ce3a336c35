"""The `gateway` command: serve, the provider emulator, and operator commands on accounts and keys.

Operator commands talk to Redis directly: REDIS_URL (or --redis-url) when given, else the embedded
server a running `gateway serve` started (its URL is in the data directory), else they start the
embedded server themselves for the duration of the command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.app import AccessLogger
from gateway.auth import check_scopes
from gateway.cli_billing import register as register_billing
from gateway.config import Config, ConfigError, key_limits, load_config
from gateway.embedded import EmbeddedRedis, discover_url
from gateway.errors import GatewayError
from gateway.exports import PROVIDER_FORMATS
from gateway.index import account_ids
from gateway.keys import KeySchema
from gateway.ledger import account_events, export_cursor, render
from gateway.master import Master, cleanup_metrics_dir, make_metrics_dir
from gateway.money import amount, credits_to_micro, format_credits
from gateway.scripts import ScriptRunner, load_scripts
from gateway.settings import Settings, SettingsError
from gateway.store import Store, account_view, check_idempotency_key, key_view, parse_expiry

log = logging.getLogger("gateway")
_LOG_FORMAT = "%(asctime)s %(process)d %(levelname)s %(message)s"


# ---------------------------------------------------------------- serve


def _serve_worker(settings: Settings, host: str, port: int, reuse_port: bool,
                  embedded: EmbeddedRedis | None = None) -> None:
    """Run one gateway process until SIGTERM or SIGINT, then drain it. `embedded`: a started server
    this process takes over (restarts it if it dies, stops it once everything is settled)."""
    from gateway.app import EMBEDDED, create_app

    logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT)
    app = create_app(settings)
    if embedded is not None:
        app[EMBEDDED] = embedded
    asyncio.run(_serve(app, settings, host, port, reuse_port))


async def _serve(app: web.Application, settings: Settings, host: str, port: int, reuse_port: bool) -> None:
    """Serve `app` until SIGTERM or SIGINT; then the listener closes, requests in flight may finish for
    up to the grace period (aiohttp's shutdown timeout), and the cleanup contexts settle everything.

    The signals only set an event (not aiohttp's run_app, which raises into the main task): a signal
    during startup is acted on once startup is done, where a cancellation raised into it could be
    swallowed by a Redis call and leave the process serving on, deaf to the signal."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, access_log_class=AccessLogger, shutdown_timeout=settings.shutdown_grace_seconds)
    await runner.setup()
    try:
        if not stop.is_set():
            await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
            await stop.wait()
    finally:
        await runner.cleanup()


def _emulator_worker(host: str, port: int, latency_ms: float = 0.0, chunk_delay_ms: float = 0.0) -> None:
    from gateway.emulator import EmulatorState, create_emulator_app

    logging.basicConfig(level=logging.WARNING)
    state = EmulatorState(latency_ms=latency_ms, chunk_delay_ms=chunk_delay_ms)
    web.run_app(create_emulator_app(state), host=host, port=port, print=None, access_log=None)


def cmd_serve(args: argparse.Namespace) -> int:
    listener = {"admin_port": args.admin_port, "admin_host": args.admin_host, "admin_reuse_port": args.workers > 1}
    try:
        settings = Settings.from_env(config_dir=args.config_dir, redis_url=args.redis_url, **listener)
        load_config(settings.config_dir)
    except (ConfigError, SettingsError) as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT)
    # until the serving loop (or the master) takes the signals over, SIGTERM unwinds like Ctrl-C: the
    # embedded redis-server (in a session of its own) is stopped on the way out, never orphaned
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    embedded = emulator = metrics_dir = None
    try:
        if settings.redis_url is None:
            embedded = EmbeddedRedis(settings.data_dir)
            embedded.start()
            settings = dataclasses.replace(settings, redis_url=embedded.url)
            print(f"embedded redis-server at {embedded.location} (password and data in {settings.data_dir}/)",
                  file=sys.stderr)
        ctx = multiprocessing.get_context("spawn")
        if args.with_emulator:
            emulator = ctx.Process(target=_emulator_worker, daemon=True,
                                   args=(args.host, args.emulator_port, args.latency_ms, args.chunk_delay_ms))
            emulator.start()
            print(f"provider emulator on http://{args.host}:{args.emulator_port}/v1", file=sys.stderr)
        print(f"gateway listening on http://{args.host}:{args.port} ({args.workers} worker(s))", file=sys.stderr)
        if settings.admin_port is not None:
            print(f"admin API, metrics and dashboard on http://{settings.admin_host}:{settings.admin_port} only",
                  file=sys.stderr)
        if args.workers <= 1:  # this process serves, and owns (supervises, stops) the embedded server
            _serve_worker(settings, args.host, args.port, False, embedded)
            return 0
        metrics_dir = make_metrics_dir()
        settings = dataclasses.replace(settings, metrics_dir=metrics_dir)
        worker_args = (settings, args.host, args.port, True)
        return Master(settings, args.workers, lambda: ctx.Process(target=_serve_worker, args=worker_args),
                      embedded).run()
    except KeyboardInterrupt:  # a signal before anything was serving
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # already on the way out
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if emulator is not None and emulator.is_alive():
            emulator.terminate()
            emulator.join(10)
        if embedded is not None:
            embedded.stop()
        cleanup_metrics_dir(metrics_dir)


def cmd_emulator(args: argparse.Namespace) -> int:
    print(f"provider emulator on http://{args.host}:{args.port}/v1", file=sys.stderr)
    _emulator_worker(args.host, args.port, args.latency_ms, args.chunk_delay_ms)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = Settings.from_env(config_dir=args.config_dir)
    try:
        config = load_config(settings.config_dir)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    summary = {"config_dir": str(settings.config_dir), "upstreams": sorted(config.upstreams),
               "models": [r.pattern for r in config.routes], "plans": sorted(config.plans),
               "default_plan": config.default_plan}
    _output(args, summary, f"ok: {len(config.upstreams)} upstream(s), {len(config.routes)} model route(s), "
                           f"{len(config.plans)} plan(s) in {settings.config_dir}")
    return 0


# ---------------------------------------------------------------- operator commands


@contextlib.asynccontextmanager
async def _store(args: argparse.Namespace) -> AsyncIterator[Store]:
    """A store on the configured Redis (standalone, cluster or sentinel URL); the legacy global
    indexes are copied into the sharded ones first if no process has done it yet."""
    from gateway.migrate import migrate_once
    from gateway.redis_client import connect_redis

    settings = Settings.from_env(config_dir=args.config_dir, redis_url=args.redis_url)
    url = settings.redis_url or discover_url(settings.data_dir)
    embedded = None
    if url is None:
        embedded = EmbeddedRedis(settings.data_dir)
        embedded.start()
        url = embedded.url
    client = connect_redis(url, 5.0)
    try:
        runner = ScriptRunner(client, load_scripts())
        schema = KeySchema(settings.key_prefix)
        await migrate_once(client, schema)
        yield Store(client, schema, runner)
    finally:
        await client.aclose()
        if embedded is not None:
            embedded.stop()


def _output(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


async def _accounts_create(args: argparse.Namespace) -> None:
    config = load_config(Settings.from_env(config_dir=args.config_dir).config_dir)
    async with _store(args) as store:
        account_id = await store.create_account(config, args.name, args.plan or config.default_plan)
        view = account_view(account_id, await store.account_raw(account_id), config)
    _output(args, view, f"created account {account_id} ({view['plan']}, {view['credits_remaining']} credits)")


async def _accounts_show(args: argparse.Namespace) -> None:
    config = load_config(Settings.from_env(config_dir=args.config_dir).config_dir)
    async with _store(args) as store:
        view = account_view(args.account_id, await store.account_raw(args.account_id), config)
    _output(args, view, "\n".join(f"{k}: {v}" for k, v in view.items()))


def _config(args: argparse.Namespace) -> Config:
    return load_config(Settings.from_env(config_dir=args.config_dir).config_dir)


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
                                     plan.max_keys if plan else None)
        _, record = await store.key_record(new.id)
    view = key_view(new.id, new.account_id, record)
    _output(args, {**view, "key": new.key},
            f"created key {new.id} for {new.account_id}\n{new.key}\n(shown once: store it now)")


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
    lines = [f"{v['id']}  {v['plan']:<12} {v['status']:<9} {v['credits_remaining']:>14}  {v['name']}" for v in views]
    if more:
        lines.append(f"(more: --after {views[-1]['id']})")
    _output(args, {"data": views, "has_more": more}, "\n".join(lines) or "no accounts")


async def _stats(args: argparse.Namespace) -> None:
    async with _store(args) as store:
        totals = await store.stats()
    _output(args, totals, "\n".join(f"{k}: {v}" for k, v in totals.items()))


async def _keys_list(args: argparse.Namespace) -> None:
    async with _store(args) as store:
        keys = await store.list_keys(args.account)
    _output(args, keys, "\n".join(f"{k['id']}  {k['prefix']}…  {k['status']}  {k['label']}" for k in keys)
            or "no keys")


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
    _output(args, {"account_id": args.account, "plan_expires_ms": end}, f"{args.account}: renewed until {end} ms")


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


def _run(coro: Callable[[argparse.Namespace], Coroutine[Any, Any, None]]) -> Callable[[argparse.Namespace], int]:
    def runner(args: argparse.Namespace) -> int:
        try:
            asyncio.run(coro(args))
        except (GatewayError, ConfigError, SettingsError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0

    return runner


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Metering gateway for AI APIs.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, redis: bool = True) -> argparse.ArgumentParser:
        p.add_argument("--config-dir", type=Path, default=None, help="config directory (GATEWAY_CONFIG_DIR)")
        if redis:
            p.add_argument("--redis-url", default=None, help="Redis URL (REDIS_URL); default: embedded")
        p.add_argument("--json", action="store_true", help="print JSON on stdout")
        return p

    serve = common(sub.add_parser("serve", help="run the gateway"))
    serve.add_argument("--host", default=os.environ.get("GATEWAY_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("GATEWAY_PORT", 8080)))
    serve.add_argument("--workers", type=int, default=int(os.environ.get("GATEWAY_WORKERS", 1)))
    serve.add_argument("--admin-port", type=int, default=None,
                       help="serve /admin, /metrics and the dashboard on this port only (GATEWAY_ADMIN_PORT)")
    serve.add_argument("--admin-host", default=None,
                       help="the admin listener's address (GATEWAY_ADMIN_HOST, default 127.0.0.1)")
    serve.add_argument("--with-emulator", action="store_true", help="also run the demo provider emulator")
    serve.add_argument("--emulator-port", type=int, default=8090)
    serve.set_defaults(func=cmd_serve)

    emulator = sub.add_parser("emulator", help="run the provider emulator alone")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=8090)
    emulator.set_defaults(func=cmd_emulator)
    for p in (serve, emulator):
        p.add_argument("--latency-ms", type=float, default=0.0, help="emulator: delay before each answer")
        p.add_argument("--chunk-delay-ms", type=float, default=0.0, help="emulator: delay between stream chunks")

    common(sub.add_parser("check-config", help="validate plans.yaml and providers.yaml"), redis=False
           ).set_defaults(func=cmd_check_config)

    accounts = sub.add_parser("accounts", help="manage accounts").add_subparsers(dest="action", required=True)
    create = common(accounts.add_parser("create", help="create an account"))
    create.add_argument("--name", required=True)
    create.add_argument("--plan", default=None)
    create.set_defaults(func=_run(_accounts_create))
    show = common(accounts.add_parser("show", help="show an account's balance"))
    show.add_argument("account_id")
    show.set_defaults(func=_run(_accounts_show))
    alist = common(accounts.add_parser("list", help="list accounts (filters, pages)"))
    alist.add_argument("--plan", default=None)
    alist.add_argument("--status", default=None)
    alist.add_argument("--name", default=None, help="a substring of the name")
    alist.add_argument("--limit", type=int, default=50)
    alist.add_argument("--after", default=None, help="the last account id of the previous page")
    alist.set_defaults(func=_run(_accounts_list))
    common(sub.add_parser("stats", help="platform totals: accounts by plan, spend, requests, tokens")
           ).set_defaults(func=_run(_stats))

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    kcreate = common(keys.add_parser("create", help="create a key (shown once)"))
    kcreate.add_argument("--account", required=True)
    kcreate.add_argument("--label", default="")
    kcreate.add_argument("--expires-at", default=None, help="ISO 8601 time")
    kcreate.add_argument("--limits", default=None,
                         help='the key\'s own rate limits as JSON, e.g. \'{"requests_per_minute": 20}\'')
    kcreate.add_argument("--scope", action="append", default=[],
                         help="narrow the key: api:<openai|anthropic|gemini|http> or model:<glob> (repeatable)")
    kcreate.set_defaults(func=_run(_keys_create))
    krotate = common(keys.add_parser("rotate", help="a new key; the old one stays valid for a grace period"))
    krotate.add_argument("key_id")
    krotate.add_argument("--grace-seconds", type=int, default=3600)
    krotate.set_defaults(func=_run(_keys_rotate))
    klist = common(keys.add_parser("list", help="list an account's keys"))
    klist.add_argument("--account", required=True)
    klist.set_defaults(func=_run(_keys_list))
    krevoke = common(keys.add_parser("revoke", help="revoke a key at once"))
    krevoke.add_argument("key_id")
    krevoke.set_defaults(func=_run(_keys_revoke))

    credits = sub.add_parser("credits", help="manage credits").add_subparsers(dest="action", required=True)
    grant = common(credits.add_parser("grant", help="grant credits that never expire"))
    grant.add_argument("--account", required=True)
    grant.add_argument("--credits", required=True)
    grant.add_argument("--note", default="")
    grant.add_argument("--idempotency-key", default=None,
                       help="a retry with the same key (within 24 h) credits nothing and prints the first answer")
    grant.set_defaults(func=_run(_credits_grant))

    plans = sub.add_parser("plans", help="change subscriptions").add_subparsers(dest="action", required=True)
    change = common(plans.add_parser("change", help="upgrade (at once) or downgrade (next cycle) an account"))
    change.add_argument("--account", required=True)
    change.add_argument("--plan", required=True)
    change.add_argument("--effective", choices=("now", "next_cycle"), default=None)
    change.add_argument("--expires-at", default=None, help="subscription end, ISO 8601 (then: the default plan)")
    change.set_defaults(func=_run(_plans_change))
    renew = common(plans.add_parser("renew", help="move a subscription's end on by whole months"))
    renew.add_argument("--account", required=True)
    renew.add_argument("--months", type=int, default=1)
    renew.set_defaults(func=_run(_plans_renew))

    usage = sub.add_parser("usage", help="the usage ledger").add_subparsers(dest="action", required=True)
    export = common(usage.add_parser("export", help="usage events as JSONL, CSV, CloudEvents 1.0, or Stripe meter "
                                                    "events, Lago events, OpenMeter CloudEvents"))
    export.add_argument("--format", choices=("jsonl", "csv", "cloudevents", *PROVIDER_FORMATS), default="jsonl")
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
    buy.add_argument("--account", required=True)
    buy.add_argument("--pack", required=True)
    buy.add_argument("--idempotency-key", default=None,
                     help="a retry with the same key (within 24 h) adds nothing and prints the first answer")
    buy.set_defaults(func=_run(_packs_buy))
    register_billing(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))

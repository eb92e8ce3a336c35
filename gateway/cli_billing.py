"""The billing commands of the `gateway` CLI: `statement`, `accounts suspend|reactivate|close`,
`accounts adjust` and `accounts update`. `register(sub, common)` is called by gateway.cli's parser
once the `accounts` command exists; the helpers (store, runner, output) are gateway.cli's own."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.errors import GatewayError
from gateway.idempotency import check_idempotency_key
from gateway.money import credits_to_micro, format_credits
from gateway.statements import statement
from gateway.store_billing import adjust, check_external_id, check_reason, set_status, update_account
from gateway.views import account_view


def _cli() -> Any:
    from gateway import cli  # gateway.cli imports this module: its helpers are looked up at run time

    return cli


async def _statement(args: argparse.Namespace) -> None:
    cli = _cli()
    config = cli._config(args)
    async with cli._store(args) as store:
        account = await store.account_raw(args.account)
        found = await statement(store.redis, store.schema.for_account(args.account), args.account, account, config,
                                args.cycle, store.clock_offset_ms)
    cli._output(args, found, statement_text(found))


def statement_text(s: dict[str, Any]) -> str:
    """A statement as a table for a terminal: the figures, then usage by model and by key."""
    lines = [f"Statement {s['cycle']} ({s['status']}) for {s['account_id']}"
             + (f" [{s['external_id']}]" if s.get("external_id") else ""),
             f"plan {s['plan']}, {s['start']} to {s['end']}", ""]
    rows = [("opening balance", "opening"), ("+ allowance", "allowance"), ("+ grants", "grants"),
            ("+ packs", "packs"), ("+ adjustments", "adjustments"), ("- expired", "expired"),
            ("= credited", "credited"), ("- used", "used"), ("closing balance", "closing")]
    lines += [f"{label:<18}{s[field]:>20}" for label, field in rows]
    if s.get("by_model"):
        lines += ["", f"{'model':<28}{'requests':>10}{'input':>12}{'output':>12}{'credits':>16}{'USD':>14}"]
        lines += [f"{m['model']:<28}{m['requests']:>10}{m['input_tokens']:>12}{m['output_tokens']:>12}"
                  f"{m['used']:>16}{m['usd']:>14}" for m in s["by_model"]]
    if s.get("by_key"):
        lines += ["", f"{'key':<24}{'name':<20}{'requests':>10}{'credits':>16}"]
        lines += [f"{k['key_id']:<24}{k['name']:<20}{k['requests']:>10}{k['used']:>16}" for k in s["by_key"]]
    if s.get("truncated"):
        lines.append("(usage by model and key summed over the first entries only: the totals above are exact)")
    return "\n".join(lines)


async def _lifecycle(args: argparse.Namespace) -> None:
    cli = _cli()
    config = cli._config(args)
    async with cli._store(args) as store:
        status = await set_status(store, args.account, args.action, check_reason(args.reason))
        view = account_view(args.account, await store.account_raw(args.account), config)
    cli._output(args, view, f"{args.account}: {status}")


async def _adjust(args: argparse.Namespace) -> None:
    cli = _cli()
    try:
        micro = credits_to_micro(args.credits)
    except ValueError as exc:
        raise GatewayError(f"invalid --credits: {exc}") from None
    key = check_idempotency_key(args.idempotency_key)
    async with cli._store(args) as store:
        done = await adjust(store, args.account, micro, check_reason(args.reason, required=True), key)
    data = {"account_id": args.account, "adjustment_id": done.adjustment_id, "credits": format_credits(micro),
            "credits_micro": micro, "credits_remaining": format_credits(done.available),
            "credits_remaining_micro": done.available, "replayed": done.replayed}
    cli._output(args, data, f"already applied with this idempotency key: nothing changed ({done.adjustment_id})"
                if done.replayed else f"{done.adjustment_id}: {format_credits(micro)} credits; "
                f"{format_credits(done.available)} available")


async def _update(args: argparse.Namespace) -> None:
    cli = _cli()
    config = cli._config(args)
    external_id = None if args.external_id is None else check_external_id(args.external_id)
    async with cli._store(args) as store:
        await update_account(store, args.account, args.name, external_id)
        view = account_view(args.account, await store.account_raw(args.account), config)
    cli._output(args, view, f"{args.account}: updated")


def _subcommands(parser: argparse.ArgumentParser) -> Any:
    for action in parser._actions:  # argparse keeps a command's sub-commands in its one _SubParsersAction
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise LookupError(parser.prog)


def register(sub: Any, common: Any) -> None:
    """Add the billing commands to the CLI's parser (`sub`: its sub-commands; `common` adds the shared
    --config-dir, --redis-url and --json options)."""
    run = _cli()._run
    state = common(sub.add_parser("statement", help="a billing cycle's statement: balances, usage by model and key"))
    state.add_argument("--account", required=True, help="the account's id (acct_...)")
    state.add_argument("--cycle", default="current", help="YYYY-MM (the month the cycle starts in) or current")
    state.set_defaults(func=run(_statement))
    accounts = _subcommands(sub.choices["accounts"])
    for action, text in (("suspend", "refuse the account's requests (403) until it is reactivated"),
                         ("reactivate", "let a suspended account's requests through again"),
                         ("close", "close the account for good: its keys can no longer be used")):
        p = common(accounts.add_parser(action, help=text))
        p.add_argument("--account", required=True, help="the account's id (acct_...)")
        p.add_argument("--reason", default=None, help="why, kept with the account and in the ledger")
        p.set_defaults(func=run(_lifecycle), action=action)
    adj = common(accounts.add_parser("adjust", help="refund (positive) or deduct (negative) credits, with a reason"))
    adj.add_argument("--account", required=True, help="the account's id (acct_...)")
    adj.add_argument("--credits", required=True, help="e.g. 10 or -2.5")
    adj.add_argument("--reason", required=True, help="why (shown in the ledger and the statement)")
    adj.add_argument("--idempotency-key", required=True, help="a retry with the same key applies nothing again")
    adj.set_defaults(func=run(_adjust))
    upd = common(accounts.add_parser("update", help="change an account's name or external (billing) id"))
    upd.add_argument("--account", required=True, help="the account's id (acct_...)")
    upd.add_argument("--name", default=None, help="a new display name")
    upd.add_argument("--external-id", default=None, help="the customer's id at Stripe / Lago ('' clears it)")
    upd.set_defaults(func=run(_update))

"""Billing operations on accounts: adjustments (refunds and deductions), the account lifecycle
(suspend, reactivate, close) and the external customer id. Balances and status change only in Lua
(lua/adjust-3.lua, lua/lifecycle-2.lua); this module checks input and maps the scripts' answers.

Closing an account is final and makes its keys unusable without revoking them one by one: every
request is refused by the reserve script (and by `/gateway/*` reads) because the account is closed,
and nothing can reopen it. The keys stay listed, as evidence, with the account's status beside them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from gateway.errors import BadRequest, Conflict, NotFound, ScriptStatus
from gateway.idempotency import IDEMPOTENCY_TTL_MS, request_fingerprint
from gateway.money import format_credits
from gateway.store import Store, check_credit_status, redis_guard

EXTERNAL_ID_MAX = 128
REASON_MAX = 500
#: The lifecycle actions and the status each leads to.
ACTIONS = {"suspend": "suspended", "reactivate": "active", "close": "closed"}


@dataclass(frozen=True, slots=True)
class Adjusted:
    """An adjustment's answer: its id, what is available after it, and whether it is a replay."""

    adjustment_id: str
    micro: int
    available: int
    replayed: bool = False


def check_external_id(value: object) -> str:
    """An `external_id` as given: a string of at most 128 characters ('' clears it)."""
    if not isinstance(value, str) or len(value) > EXTERNAL_ID_MAX or any(ord(ch) < 32 for ch in value):
        raise BadRequest(f"'external_id' must be a string of at most {EXTERNAL_ID_MAX} printable characters.",
                         param="external_id")
    return value


def check_reason(value: object, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()) or len(value) > REASON_MAX:
        raise BadRequest(f"'reason' must be a {'non-empty ' if required else ''}string of at most {REASON_MAX} "
                         "characters.", param="reason")
    return value


async def adjust(store: Store, account_id: str, micro: int, reason: str, idempotency_key: str) -> Adjusted:
    """Apply a refund (micro > 0, to purchased credits) or a deduction (micro < 0) at most once per
    `idempotency_key` (required): a retry of the same request gets the first answer; the same key with
    another request is refused (422); a deduction beyond the unheld balance is refused (409)."""
    if not idempotency_key:
        raise BadRequest("An adjustment needs an 'Idempotency-Key' header, so a retry cannot apply it twice.",
                         param="idempotency_key")
    if micro == 0:
        raise BadRequest("'credits' must not be zero: positive refunds, negative deducts.", param="credits")
    keys = store.schema.for_account(account_id)
    fingerprint = request_fingerprint({"op": "adjustment", "credits": micro, "reason": reason})
    status, available, adjustment_id = await store.runner.run(
        "adjust", [keys.account, keys.ledger, keys.idempotency(idempotency_key)],
        [micro, store.clock_offset_ms, reason, idempotency_key, fingerprint, IDEMPOTENCY_TTL_MS,
         "adj_" + secrets.token_hex(8)])
    check_credit_status(status, account_id, idempotency_key, micro, int(available))
    if status == ScriptStatus.DEDUCTION_TOO_LARGE:
        raise Conflict(f"Cannot deduct {format_credits(-micro)} credits: {format_credits(int(available))} are "
                       "available to deduct (credits held by requests in flight are not).", param="credits")
    return Adjusted(str(adjustment_id), micro, int(available), replayed=status == ScriptStatus.IDEMPOTENT_REPLAY)


async def set_status(store: Store, account_id: str, action: str, reason: str = "") -> str:
    """Suspend, reactivate or close an account (idempotent); returns its status after. A closed
    account cannot be changed again (409)."""
    if action not in ACTIONS:
        raise BadRequest(f"Unknown action {action!r} (suspend, reactivate or close).")
    keys = store.schema.for_account(account_id)
    status, after = await store.runner.run("lifecycle", [keys.account, keys.ledger],
                                           [ACTIONS[action], reason, store.clock_offset_ms])
    if status == ScriptStatus.NO_ACCOUNT:
        raise NotFound(f"No account {account_id!r}.")
    if status == ScriptStatus.ACCOUNT_IS_CLOSED:
        verb = {"suspend": "suspended", "reactivate": "reactivated", "close": "closed"}[action]
        raise Conflict(f"The account {account_id!r} is closed, which is final: it cannot be {verb}.")
    return str(after)


async def update_account(store: Store, account_id: str, name: str | None = None,
                         external_id: str | None = None) -> None:
    """Change an account's name or external id; the change and its ledger event are written together."""
    changes = {k: v for k, v in (("name", name), ("external_id", external_id)) if v is not None}
    if not changes:
        raise BadRequest("Nothing to change: give 'name' or 'external_id'.")
    await store.account_raw(account_id)
    async with redis_guard():
        await store.admin_event(account_id, {"type": "account_updated", **changes},
                                store.schema.for_account(account_id).account, changes)

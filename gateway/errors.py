"""Gateway errors and the one mapping from Lua status codes to them.

Every error carries the HTTP status and a dialect-neutral `kind`; each dialect renders it in its
own wire shape (see `gateway.dialects`).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from gateway.money import MAX_SAFE, format_credits


class GatewayError(Exception):
    """An error the gateway answers itself, in the caller's dialect."""

    status = 500
    kind = "server_error"
    code: str | None = None  # a more precise machine-readable code than the kind's, where a dialect has one

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.param = param

    def details(self) -> dict[str, Any]:
        """Machine-readable fields each dialect adds inside its error object (none by default)."""
        return {}


class BadRequest(GatewayError):
    status = 400
    kind = "invalid_request"


class Unauthorized(GatewayError):
    status = 401
    kind = "authentication"


class InsufficientCredits(GatewayError):
    status = 402
    kind = "insufficient_credits"
    available_micro: int | None = None  # the balance that was too small, when known
    held_micro: int = 0  # ... and what requests in flight held of it
    needed_micro: int | None = None  # the least the request could be held for (its prompt and one token)
    limited_by = "account_balance"

    def details(self) -> dict[str, Any]:
        """`available`, `needed` and `shortfall` in credits (decimal strings) and micro-credits, and what
        ran short (`limited_by`), when known."""
        if self.available_micro is None or self.needed_micro is None:
            return {}
        available = max(self.available_micro, 0)
        out: dict[str, Any] = {"limited_by": self.limited_by}
        for name, micro in (("available", available), ("needed", self.needed_micro),
                            ("shortfall", max(self.needed_micro - available, 0))):
            out[name], out[f"{name}_micro"] = format_credits(micro), micro
        return out


class KeyBudgetExhausted(InsufficientCredits):
    """The calling key's own budget (per cycle or lifetime) cannot pay the request's prompt, however
    much its account has."""

    def __init__(self, which: str, available: int, cap: int, needed: int) -> None:
        span = "per billing cycle" if which == "cycle" else "for its lifetime"
        super().__init__(
            f"This API key's budget is used up: {format_credits(max(available, 0))} credits left of its "
            f"{format_credits(cap)}-credit budget {span}, not enough to cover this request's prompt (at least "
            f"{format_credits(needed)} credits). "
            + ("It renews with the next billing cycle; " if which == "cycle" else "")
            + "the account's administrator can raise it.")
        self.available_micro, self.needed_micro = available, needed
        self.limited_by = f"key_budget_{which}"


class UnreadableBody(BadRequest):
    """The request body could not be read as sent (bad Content-Encoding data, broken framing): the
    connection is closed after the answer, since the rest of its bytes cannot be trusted."""


class Forbidden(GatewayError):
    status = 403
    kind = "permission"


class AccountInactive(Forbidden):
    """The account is suspended or closed (its `status`): nothing new may be spent on it."""

    def __init__(self, status: str) -> None:
        if status == "closed":
            super().__init__("This account is closed: its keys can no longer be used.")
        else:
            super().__init__("This account is suspended: its requests are refused until the operator "
                             "reactivates it.")
        self.code = "account_closed" if status == "closed" else "account_suspended"


class NotFound(GatewayError):
    status = 404
    kind = "not_found"


class PayloadTooLarge(GatewayError):
    status = 413
    kind = "too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    kind = "invalid_request"


class Unprocessable(GatewayError):
    """A well-formed request that contradicts an earlier one (an idempotency key reused with another body)."""

    status = 422
    kind = "invalid_request"


class Conflict(GatewayError):
    """The request contradicts the resource's state (a closed account reactivated, a deduction larger
    than the unheld balance)."""

    status = 409
    kind = "conflict"


class RateLimited(GatewayError):
    status = 429
    kind = "rate_limit"


class UpstreamError(GatewayError):
    status = 502
    kind = "upstream"


class UpstreamTimeout(GatewayError):
    status = 504
    kind = "upstream_timeout"


class ClientDisconnected(GatewayError):
    """The client went away before its request was read: nobody to answer, nothing held.
    499 is the status proxies log for it ("client closed request")."""

    status = 499
    kind = "client_closed"


class StoreUnavailable(GatewayError):
    """Redis is unreachable: fail closed."""

    status = 503
    kind = "unavailable"


class ScriptStatus(IntEnum):
    """Status codes returned as the first element of every Lua script's reply."""

    OK = 0
    LOWERED = 1  # reserve: held what the balance affords; the output cap must be lowered
    ALREADY_DONE = 2  # settle/release of a hold that has already ended
    NO_ACCOUNT = 10
    ACCOUNT_DISABLED = 11
    KEY_REVOKED = 12
    KEY_EXPIRED = 13
    PLAN_CHANGED = 14
    DUPLICATE_REQUEST = 15  # reserve: the request id already ended (cancelled after a timeout)
    CYCLE_STALE = 16  # reserve: the cycle boundaries sent were computed for another moment
    ACCOUNT_CLOSED = 17  # reserve: the account is closed (11: suspended)
    INSUFFICIENT = 20
    LIMIT_REACHED = 21
    KEY_BUDGET = 22  # reserve: the key's own budget cannot pay the prompt
    TOO_MANY_KEYS = 30
    NO_SUBSCRIPTION_END = 31  # renew: the subscription has no end to extend
    SUBSCRIPTION_ENDED = 32  # renew: its end has passed
    KEY_NOT_ACTIVE = 33  # rotate: the key is revoked or expired
    KEY_ALREADY_ROTATED = 34
    IDEMPOTENCY_MISMATCH = 35  # grant: the idempotency key was first used with another request
    IDEMPOTENT_REPLAY = 36  # grant: the idempotency key was seen: the first answer, nothing credited
    ACCOUNT_IS_CLOSED = 37  # lifecycle, grant, addkey: a closed account changes no more
    DEDUCTION_TOO_LARGE = 38  # adjust: more than the unheld balance
    BALANCE_TOO_LARGE = 39  # grant/adjust: the balance would pass 2^53 - 1 micro-credits (inexact in Lua)


def balance_too_large(micro: int, room: int) -> str:
    """The refusal of a credit that would take a balance past 2^53 - 1 micro-credits (status 39): the
    scripts' numbers are doubles, which would round it (money.MAX_SAFE)."""
    return (f"Cannot credit {format_credits(micro)} credits: the balance would exceed the largest amount kept "
            f"exactly ({format_credits(MAX_SAFE)} credits); at most {format_credits(room)} can be credited now.")


def error_for_status(status: int, *, available_micro: int = 0) -> GatewayError | None:
    """Map a script status to the exception the caller sees; None for the non-error codes."""
    code = ScriptStatus(status)
    if code in (ScriptStatus.OK, ScriptStatus.LOWERED, ScriptStatus.ALREADY_DONE, ScriptStatus.PLAN_CHANGED,
                ScriptStatus.CYCLE_STALE, ScriptStatus.LIMIT_REACHED, ScriptStatus.KEY_BUDGET,
                ScriptStatus.TOO_MANY_KEYS):
        return None
    if code is ScriptStatus.INSUFFICIENT:
        refusal = InsufficientCredits(
            f"Insufficient credits: {format_credits(available_micro)} credits available, "
            "not enough to cover this request's prompt. Add credits to continue."
        )
        refusal.available_micro = available_micro
        return refusal
    messages = {
        ScriptStatus.NO_ACCOUNT: (Unauthorized, "The account for this API key no longer exists."),
        ScriptStatus.KEY_REVOKED: (Unauthorized, "This API key has been revoked."),
        ScriptStatus.KEY_EXPIRED: (Unauthorized, "This API key has expired."),
        ScriptStatus.DUPLICATE_REQUEST: (StoreUnavailable, "This request was cancelled while the credit store was "
                                                           "unavailable; try again."),
    }
    if code in (ScriptStatus.ACCOUNT_DISABLED, ScriptStatus.ACCOUNT_CLOSED):
        return AccountInactive("closed" if code == ScriptStatus.ACCOUNT_CLOSED else "suspended")
    cls, message = messages[code]
    return cls(message)

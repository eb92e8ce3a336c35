"""What a response tells the client beyond the answer: rate-limit headers in each dialect's names, and
that its output cap was lowered to what the credits afford, or what a 402 lacked.

OpenAI's names (`x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, reset as a Go duration such
as `1m0s`) serve every dialect but Anthropic's, which has its own names with an RFC 3339 reset
time (`anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`). Gemini has no rate-limit
headers of its own: its routes get OpenAI's names.
"""

from __future__ import annotations

import time

from gateway.billing import Call
from gateway.errors import InsufficientCredits
from gateway.metering import Reservation, Window, quote

LOWERED_HEADER = "x-gateway-output-cap-lowered"


def go_duration(ms: int) -> str:
    """Milliseconds as Go prints a time.Duration, the format of OpenAI's reset headers: 12ms, 1.5s, 6m0s, 1h0m0s."""
    ms = max(ms, 0)
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest // 1000}.{rest % 1000:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{seconds}"
    return f"{minutes}m{seconds}" if minutes else seconds


def rate_headers(dialect: str, kind: str, cap: int, remaining: int, reset_ms: int) -> dict[str, str]:
    """One window's headers (`kind`: requests or tokens) in the names of `dialect`."""
    remaining = max(remaining, 0)
    if dialect == "anthropic":
        reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + -(-max(reset_ms, 0) // 1000)))
        return {f"anthropic-ratelimit-{kind}-limit": str(cap), f"anthropic-ratelimit-{kind}-remaining": str(remaining),
                f"anthropic-ratelimit-{kind}-reset": reset}
    return {f"x-ratelimit-limit-{kind}": str(cap), f"x-ratelimit-remaining-{kind}": str(remaining),
            f"x-ratelimit-reset-{kind}": go_duration(reset_ms)}


def success_headers(dialect: str, reservation: Reservation, lowered_cap: int | None) -> dict[str, str]:
    """The headers a served request adds: its tightest request and token windows as they stand after
    its hold (none when it has no window), and the output cap per choice when it was lowered."""
    headers: dict[str, str] = {}
    windows: tuple[tuple[str, Window | None], ...] = (("requests", reservation.requests_window),
                                                      ("tokens", reservation.tokens_window))
    for kind, window in windows:
        if window is not None:
            headers.update(rate_headers(dialect, kind, window.cap, window.remaining, window.reset_ms))
    if lowered_cap is not None:
        headers[LOWERED_HEADER] = str(lowered_cap)
    return headers


def no_output_refusal(call: Call) -> InsufficientCredits:
    """The 402 of a hold that affords no output token per choice: what it held (all the balance and the
    key's budget allowed) against its prompt and one output token per choice."""
    refusal = InsufficientCredits("Insufficient credits for even one output token per choice.")
    refusal.available_micro = call.reservation.hold
    refusal.needed_micro = quote(call.rates, call.parsed.prompt_tokens_bound, call.parsed.choices).full_cost
    return refusal

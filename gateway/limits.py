"""Plan and key limits: what plans.yaml and key records say, compiled into the reserve script's terms.

Every limit is one row `[id, metric, cap, scope, window_ms, bucket_ms]`:

- metric: `c` credits (micro), `t` tokens (prompt + output), `u` provider cost (micro-USD), `n` requests
- scope: `a` the account, `k` the calling key
- window: 0 = the billing cycle, -1 = requests in flight (concurrency), > 0 = a rolling window counted
  in `bucket_ms` buckets (a request is counted in the bucket of its settlement)

The reserve script holds each request's worst case in every limit that applies and refuses the
request that would cross one; settle counts the actual amounts; release counts nothing, except that a
request the provider answered with a refusal counts in the rolling request windows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

MINUTE_MS = 60_000
DAY_MS = 86_400_000
_DURATION = re.compile(r"^(?P<n>\d+)(?P<unit>[smhdw])$")
_UNIT_MS = {"s": 1000, "m": MINUTE_MS, "h": 3_600_000, "d": DAY_MS, "w": 7 * DAY_MS}
WINDOW_BUCKETS = 60  # a rolling window is summed over this many buckets

#: Rate limits a plan or a key may set: name -> (metric, window ms, bucket ms; -1: in flight).
RATE_LIMITS: dict[str, tuple[str, int, int]] = {
    "requests_per_minute": ("n", MINUTE_MS, 1000),
    "requests_per_day": ("n", DAY_MS, DAY_MS // WINDOW_BUCKETS),
    "tokens_per_minute": ("t", MINUTE_MS, 1000),
    "tokens_per_day": ("t", DAY_MS, DAY_MS // WINDOW_BUCKETS),
    "concurrent_requests": ("n", -1, 0),
}

#: What each metric is called in refusal messages.
METRIC_WORDS = {"c": "credits", "t": "tokens", "u": "USD", "n": "requests"}


def parse_duration(text: str) -> int:
    """'5h', '1d', '30m', '1w' -> milliseconds (ValueError otherwise)."""
    match = _DURATION.match(text)
    if not match or int(match["n"]) == 0:
        raise ValueError(f"expected a duration like 30m, 5h, 1d or 1w, got {text!r}")
    return int(match["n"]) * _UNIT_MS[match["unit"]]


@dataclass(frozen=True, slots=True)
class Limit:
    id: str
    metric: str
    cap: int
    scope: str
    window_ms: int
    bucket_ms: int
    provider: str | None = None  # applies only to requests routed to this upstream

    def row(self) -> list[Any]:
        return [self.id, self.metric, self.cap, self.scope, self.window_ms, self.bucket_ms]


def rate_limits(values: Mapping[str, int], scope: str) -> tuple[Limit, ...]:
    """Rate limits (requests/tokens per minute/day, concurrency) for a plan (`a`) or a key (`k`)."""
    out = []
    for name, cap in values.items():
        metric, window, bucket = RATE_LIMITS[name]
        out.append(Limit(name, metric, cap, scope, window, bucket))
    return tuple(out)


def spend_window(name: str, duration_ms: int, micro: int) -> Limit:
    bucket = max(duration_ms // WINDOW_BUCKETS, 1000)
    return Limit(f"spend_{name}", "c", micro, "a", duration_ms, bucket)


def applicable(limits: tuple[Limit, ...], upstream: str) -> list[Limit]:
    return [limit for limit in limits if limit.provider is None or limit.provider == upstream]


def encode(limits: list[Limit]) -> str:
    return json.dumps([limit.row() for limit in limits], separators=(",", ":")) if limits else ""


def describe(limit_id: str, used: int, cap: int, metric: str) -> str:
    """A limit and its current value in words, e.g. 'requests_per_minute (20 of 20 requests)'."""
    if metric in ("c", "u"):
        return f"{limit_id} ({used / 1_000_000:.6f} of {cap / 1_000_000:.6f} {METRIC_WORDS[metric]})"
    return f"{limit_id} ({used} of {cap} {METRIC_WORDS[metric]})"


# ---------------------------------------------------------------- billing cycles


def _add_months(year: int, month: int, months: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + months
    return index // 12, index % 12 + 1


def _days_in(year: int, month: int) -> int:
    ny, nm = _add_months(year, month, 1)
    return (datetime(ny, nm, 1) - timedelta(days=1)).day


def cycle_bounds(anchor_ms: int, timezone: str, now_ms: int) -> tuple[int, int]:
    """The monthly cycle containing `now_ms`, anchored to the subscription start in `timezone`:
    it starts on the anchor's day of the month at the anchor's wall-clock time (a day past the end
    of a short month rolls to its last day), so DST never shifts the local boundary."""
    zone = ZoneInfo(timezone)
    anchor = datetime.fromtimestamp(anchor_ms / 1000, UTC).astimezone(zone)
    now = datetime.fromtimestamp(now_ms / 1000, UTC).astimezone(zone)

    def start_of(year: int, month: int) -> datetime:
        day = min(anchor.day, _days_in(year, month))
        return datetime(year, month, day, anchor.hour, anchor.minute, anchor.second, tzinfo=zone)

    months = (now.year - anchor.year) * 12 + (now.month - anchor.month)
    year, month = _add_months(anchor.year, anchor.month, months)
    start = start_of(year, month)
    if start > now:
        year, month = _add_months(year, month, -1)
        start = start_of(year, month)
    end_year, end_month = _add_months(year, month, 1)
    end = start_of(end_year, end_month)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)

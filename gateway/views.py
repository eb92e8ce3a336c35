"""Accounts and keys as external interfaces show them (admin API, key holders, CLI): decimal credits
in the contract's two forms, ISO-8601 times; and the clock those views are read at."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gateway.config import Config
from gateway.money import amount, format_credits


def now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


def iso(ms: int, timespec: str = "auto") -> str:
    """Unix milliseconds as ISO-8601 UTC with a `Z` (`timespec="milliseconds"` for event times)."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def key_view(key_id: str, account_id: str, rec: dict[str, str], now: int | None = None) -> dict[str, Any]:
    """A key record as the admin API shows it (never the hash, never the raw key), at `now` (ms)."""
    expires_ms = int(rec.get("expires_ms") or 0)
    now = now_ms() if now is None else now
    return {
        "id": key_id,
        "account_id": account_id,
        "prefix": rec.get("prefix", ""),
        "label": rec.get("label", ""),
        "status": "expired" if rec.get("status") == "active" and 0 < expires_ms <= now else
        rec.get("status", "unknown"),
        "scopes": [s for s in rec.get("scopes", "").split(",") if s],
        "created_at": iso(int(rec.get("created_ms") or 0)),
        "expires_at": iso(expires_ms) if expires_ms else None,
        "last_used_at": iso(int(rec["last_used_ms"])) if rec.get("last_used_ms") else None,
        "rotated_to": rec.get("rotated_to"),
    }


def account_view(account_id: str, rec: dict[str, str], config: Config) -> dict[str, Any]:
    """An account's balances and cycle as external interfaces show them (decimal credits)."""
    allow, extra, held = (int(rec.get(f) or 0) for f in ("allow", "extra", "held"))
    available = allow + extra - held
    plan = config.plans.get(rec.get("plan", ""))
    limit = plan.monthly_credits if plan else 0
    end_ms = int(rec.get("cycle_end_ms") or 0)
    days = max(0, -(-(end_ms - now_ms()) // 86_400_000))
    percent = 100.0 if limit == 0 else round(min(100.0, 100.0 * max(available, 0) / limit), 2)
    warnings = []
    if limit and plan and available < limit * plan.alerts.low_credit_share:
        warnings.append(f"Low credits: {format_credits(max(available, 0))} of {format_credits(limit)} remaining.")
    return {
        "id": account_id,
        "name": rec.get("name", ""),
        "plan": rec.get("plan", ""),
        "status": rec.get("status", ""),
        "status_reason": rec.get("status_reason") or None,
        "external_id": rec.get("external_id") or None,
        **amount("credits_remaining", available),
        **amount("credits_limit", limit),
        "percent_remaining": percent,
        **amount("allowance_remaining", allow),
        **amount("purchased_remaining", extra),
        **amount("credits_held", held),
        **amount("credits_used_this_cycle", int(rec.get("cycle_used") or 0)),
        **amount("lifetime_credits_used", int(rec.get("charged") or 0)),
        **amount("lifetime_credits_granted", int(rec.get("granted") or 0)),
        "requests": int(rec.get("requests") or 0),
        "requests_this_cycle": int(rec.get("cycle_requests") or 0),
        "cycle_start": iso(int(rec.get("cycle_start_ms") or 0)) if rec.get("cycle_start_ms") else None,
        "reset_date": iso(end_ms) if end_ms else None,
        "timezone": rec.get("timezone") or (plan.timezone if plan else "UTC"),
        "next_plan": rec.get("next_plan") or None,
        "plan_expires_at": iso(int(rec["plan_expires_ms"])) if int(rec.get("plan_expires_ms") or 0) else None,
        "days_until_reset": days,
        "warnings": warnings,
        "created_at": iso(int(rec.get("created_ms") or 0)),
    }


"""Money units: integer micro-credits everywhere inside; decimal credits at every edge."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal, InvalidOperation

MICRO = 1_000_000  # micro-credits per credit
MAX_SAFE = 2**53 - 1  # every value a Lua script sees must stay below this


def credits_to_micro(value: object) -> int:
    """Parse a decimal number of credits (str, int or float) into exact micro-credits.

    Raises ValueError for anything that is not a finite number with at most six decimals.
    """
    if isinstance(value, bool):
        raise ValueError("credits must be a number")
    try:
        dec = Decimal(str(value))
    except (InvalidOperation, ValueError) as exc:
        raise ValueError(f"credits must be a number, got {value!r}") from exc
    if not dec.is_finite():
        raise ValueError("credits must be finite")
    micro = dec * MICRO
    if micro != micro.to_integral_value():
        raise ValueError("credits have at most 6 decimal places")
    result = int(micro)
    if abs(result) > MAX_SAFE:
        raise ValueError("credits amount is too large")
    return result


def format_credits(micro: int) -> str:
    """Render micro-credits as a plain decimal string of credits (no float rounding)."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    text = f"{whole}.{frac:06d}".rstrip("0").rstrip(".")
    return sign + text


def amount(name: str, micro: int) -> dict[str, str | int]:
    """A money amount as every API, export and CLI `--json` gives it: `name` an exact decimal string
    (never a float or an exponent: a JSON number would round in many consumers) and `name_micro` the
    same amount as an integer of micro-units. Used for credits and for USD (`usd`, `usd_micro`)."""
    return {name: format_credits(micro), f"{name}_micro": int(micro)}


def ceil_div(a: int, b: int) -> int:
    """Integer ceiling division for non-negative a and positive b."""
    return -(-a // b)


def usd_rate_to_micro_per_mtok(usd_per_mtok: Decimal, credit_usd: Decimal, markup: Decimal) -> int:
    """Convert a USD price per 1M tokens into micro-credits per 1M tokens, rounded up once."""
    value = (usd_per_mtok * markup / credit_usd * MICRO).to_integral_value(rounding=ROUND_CEILING)
    return int(value)

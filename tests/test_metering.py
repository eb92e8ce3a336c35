"""Pure pricing: quotes, exact costs in integer micro-credits, and lowered caps."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.config import Rates
from gateway.metering import affordable_output, cost_of, quote, token_cost
from gateway.money import (
    MAX_SAFE,
    credits_to_micro,
    format_credits,
    usd_rate_to_micro_per_mtok,
)
from gateway.usage import Usage

RATES = Rates(input=150_000, cached_input=75_000, cache_write=187_500, output=600_000, per_request=0)


def test_credit_parsing_is_exact_and_strict() -> None:
    assert credits_to_micro("2.5") == 2_500_000
    assert credits_to_micro(3) == 3_000_000
    assert credits_to_micro("0.000001") == 1
    for bad in ("0.0000001", "abc", "nan", "inf", True, 10**12):
        with pytest.raises(ValueError):
            credits_to_micro(bad)


def test_credit_formatting_never_goes_through_float_rounding() -> None:
    assert format_credits(1_999_991) == "1.999991"
    assert format_credits(5_000_000) == "5"
    assert format_credits(-1) == "-0.000001"


def test_usd_prices_convert_once_to_integer_rates_rounded_up() -> None:
    assert usd_rate_to_micro_per_mtok(Decimal("0.15"), Decimal("1"), Decimal("1")) == 150_000
    assert usd_rate_to_micro_per_mtok(Decimal("0.15"), Decimal("0.01"), Decimal("1.5")) == 22_500_000
    assert usd_rate_to_micro_per_mtok(Decimal("0.1"), Decimal("3"), Decimal("1")) == 33_334  # ceil(33333.3)


def test_cost_is_one_rounding_of_the_exact_sum() -> None:
    usage = Usage(input_tokens=6, cached_input_tokens=3, output_tokens=4)
    # 6*0.15 + 3*0.075 + 4*0.6 = 0.9 + 0.225 + 2.4 = 3.525 micro -> 4
    assert cost_of(RATES, usage) == 4
    assert cost_of(RATES, Usage()) == 0
    assert cost_of(Rates(0, 0, 0, 0, per_request=1_000_000), Usage()) == 1_000_000
    assert token_cost(1, 1) == 1 and token_cost(0, 10**9) == 0


def test_quote_holds_the_worst_case_at_the_highest_input_rate() -> None:
    q = quote(RATES, prompt_tokens_bound=1000, max_output_tokens=100)
    assert q.prompt_cost == 188  # 1000 * 0.1875, the cache-write rate is the highest
    assert q.full_cost == 188 + 60
    assert q.min_cost == 188 + 1
    with pytest.raises(ValueError):
        quote(Rates(MAX_SAFE, 0, 0, 0, 0), 10**9, 1)


def test_affordable_output_never_exceeds_the_hold() -> None:
    q = quote(RATES, prompt_tokens_bound=1000, max_output_tokens=4096)
    for hold in range(q.min_cost, q.full_cost, 7):
        tokens = affordable_output(RATES, q, hold)
        assert 1 <= tokens <= 4096
        assert q.prompt_cost + token_cost(tokens, RATES.output) <= hold
        assert q.prompt_cost + token_cost(tokens + 1, RATES.output) > hold or tokens == 4096
    assert affordable_output(RATES, q, q.prompt_cost) == 0

"""Pure pricing: globs, service tiers, prompt-size tiers, built-in tool fees and provider-held
prompts, from providers.yaml to the integer quote and charge (no Redis)."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.config import ConfigError, Rates, ToolFee, Upstream, glob_regex, load_config, load_providers
from gateway.dialects.drivers import CostDrivers, ToolUse, admit
from gateway.errors import BadRequest
from gateway.metering import affordable_output, cost_of, quote
from gateway.secret import Secret
from gateway.usage import Usage

ROOT = Path(__file__).resolve().parents[2]
BASE = Rates(input=1_000_000, cached_input=100_000, cache_write=1_000_000, output=4_000_000, per_request=0)
LONG = Rates(input=2_000_000, cached_input=200_000, cache_write=2_000_000, output=6_000_000, per_request=0)
TIERED = replace(BASE, above=((1000, LONG),))


def _tiers(rates: Rates, **multipliers: int) -> Rates:
    """Service tiers built as config does: every price of every sheet times the multiplier."""
    def times(r: Rates, m: int) -> Rates:
        return replace(r, input=r.input * m, cached_input=r.cached_input * m, cache_write=r.cache_write * m,
                       output=r.output * m, above=tuple((t, times(s, m)) for t, s in r.above))
    return replace(rates, service_tiers=tuple((name, m * 1_000_000, times(rates, m))
                                              for name, m in multipliers.items()))


def _upstream(**fields: object) -> Upstream:
    return replace(Upstream("u", "openai", "http://x", Secret("k"), "bearer", 60, 5, "inject", "max_tokens"),
                   **fields)


def test_a_glob_never_crosses_a_slash() -> None:
    assert glob_regex("cheap-*").fullmatch("cheap-x")
    assert not glob_regex("cheap-*").fullmatch("cheap-x/../pricey-pro")
    assert not glob_regex("cheap-?").fullmatch("cheap-/")
    assert not glob_regex("a[!b]c").fullmatch("a/c")


def test_the_hold_and_the_charge_follow_the_service_tier() -> None:
    rates = _tiers(BASE, default=1, priority=2)
    usage = Usage(input_tokens=1000, output_tokens=1000)
    priority = replace(rates, service_tier="priority")
    assert quote(priority, 1000, 1000).full_cost == 2 * quote(rates, 1000, 1000).full_cost == 10_000
    assert cost_of(priority, usage) == 10_000  # the response named no tier: the one held for
    assert cost_of(priority, replace(usage, service_tier="default")) == 5_000  # the tier echoed
    assert cost_of(rates, replace(usage, service_tier="mystery")) == 10_000  # unknown: the dearest
    auto = replace(rates, service_tier="auto")  # not listed: held at the dearest the upstream may pick
    assert quote(auto, 1000, 1000).full_cost == 10_000
    assert affordable_output(priority, quote(priority, 1000, 1000), 6_000) == 500


def test_prompt_size_tiers_hold_at_the_bound_and_charge_at_the_reported_prompt() -> None:
    assert quote(TIERED, 1000, 10).full_cost == 1000 + 40  # at the threshold: base prices
    assert quote(TIERED, 1001, 10).full_cost == 2002 + 60  # above it: every token at the long rates
    assert cost_of(TIERED, Usage(input_tokens=500, cached_input_tokens=400, output_tokens=10)) == 500 + 40 + 40
    assert cost_of(TIERED, Usage(input_tokens=600, cached_input_tokens=500, output_tokens=10)) == 1200 + 100 + 60


def test_built_in_tool_calls_are_held_at_their_bound_and_charged_as_reported() -> None:
    rates = replace(BASE, tool_fees=(("web_search", 10_000),), tool_calls=(("web_search", 5),))
    assert quote(rates, 0, 0).full_cost == 50_000
    assert cost_of(rates, Usage(input_tokens=0, output_tokens=0, tool_calls=(("web_search", 2),))) == 20_000
    assert cost_of(rates, Usage(input_tokens=0, output_tokens=0)) == 50_000  # not reported: the bound
    assert cost_of(rates, Usage(input_tokens=0, output_tokens=0, tool_calls=())) == 50_000  # kind not reported


def test_admit_refuses_what_the_upstream_does_not_price_naming_the_parameter() -> None:
    plain = _upstream()
    cases = [
        (CostDrivers(service_tier="priority"), "service_tier"),
        (CostDrivers(service_tier="auto"), "service_tier"),  # no tiers configured at all
        (CostDrivers(tools=(ToolUse("web_search", "tools", 3),)), "tools"),
        (CostDrivers(tools=(ToolUse("web_search", "web_search_options"),)), "web_search_options"),
        (CostDrivers(stored_prompt="previous_response_id"), "previous_response_id"),
        (CostDrivers(stored_prompt="cachedContent"), "cachedContent"),
        (CostDrivers(betas=("context-1m-2025-08-07",)), "anthropic-beta"),
    ]
    for drivers, param in cases:
        with pytest.raises(BadRequest) as info:
            admit(plain, BASE, drivers)
        assert info.value.param == param and info.value.status == 400
    fee_without_bound = _upstream(tool_fees={"web_search": ToolFee(Decimal("0.01"))})
    with pytest.raises(BadRequest) as info:
        admit(fee_without_bound, BASE, CostDrivers(tools=(ToolUse("web_search", "tools"),)))
    assert "bound" in info.value.message


def test_admit_prices_what_the_upstream_configures() -> None:
    upstream = _upstream(service_tiers={"default": Decimal(1), "priority": Decimal(2)},
                         tool_fees={"web_search": ToolFee(Decimal("0.01"), 2, 1000)}, stored_prompt_tokens=5000,
                         allowed_betas=frozenset({"b1"}))
    drivers = CostDrivers("priority", (ToolUse("web_search", "tools", 3), ToolUse("web_search", "tools")), None,
                          "previous_response_id", ("b1",))
    rates = admit(upstream, BASE, drivers)
    # the request's own bound (3) wins over the configured one (2); two declarations add up
    assert rates.service_tier == "priority" and rates.tool_calls == (("web_search", 5),)
    assert rates.extra_prompt_tokens == 5000 + 5 * 1000
    assert quote(rates, 100, 0).prompt_tokens_bound == 10_100
    max_calls = admit(upstream, BASE, CostDrivers(tools=(ToolUse("web_search", "tools", 9),), max_tool_calls=1))
    assert max_calls.tool_calls == (("web_search", 1),)


def test_the_shipped_providers_yaml_compiles_tiers_and_multipliers_to_integers() -> None:
    config = load_config(ROOT / "config")
    pro = config.rates("pro", config.route("gemini-2.5-pro"))  # type: ignore[arg-type]
    (threshold, long), = pro.above
    assert threshold == 200_000 and long.input == 2 * pro.input and long.output == pro.output * 3 // 2
    gpt = config.rates("pro", config.route("gpt-4o"))  # type: ignore[arg-type]
    tiers = {name: (ppm, sheet) for name, ppm, sheet in gpt.service_tiers}
    assert tiers["priority"][0] == 2_000_000 and tiers["priority"][1].output == 2 * gpt.output
    assert tiers["flex"][1].input == gpt.input // 2
    assert all(isinstance(v, int) for v in (tiers["flex"][1].input, long.cached_input))


@pytest.mark.parametrize(("snippet", "where"), [
    ("service_tiers: {priority: -2}", "upstreams.u.service_tiers.priority"),
    ("tool_fees: {web_search: {per_call: 0.01, max_calls: 3}}", "upstreams.u.tool_fees.web_search.max_calls"),
    ("stored_prompt_tokens: -1", "upstreams.u.stored_prompt_tokens"),
])
def test_bad_cost_driver_config_names_the_path(tmp_path: Path, snippet: str, where: str) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(f"upstreams:\n  u:\n    dialect: openai\n    base_url: http://x\n    {snippet}\n"
                    "models:\n  m: {upstream: u, input: 1, output: 1, max_output_tokens: 10}\n")
    with pytest.raises(ConfigError) as info:
        load_providers(path)
    assert info.value.path == where


def test_prompt_tiers_must_increase(tmp_path: Path) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text("upstreams:\n  u: {dialect: openai, base_url: http://x}\nmodels:\n"
                    "  m: {upstream: u, input: 1, output: 1, max_output_tokens: 10, tiers: "
                    "[{above_input_tokens: 9, input: 2}, {above_input_tokens: 5, input: 3}]}\n")
    with pytest.raises(ConfigError) as info:
        load_providers(path)
    assert info.value.path == "models.m.tiers[1].above_input_tokens"

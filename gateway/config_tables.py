"""The runtime configuration tables: frozen, typed, compiled once per load (gateway.config builds
them from the YAML files) and read on every request: upstreams, model routes and their prices, plans,
packs, and the integer rates the money code charges with."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

from gateway.limits import Limit
from gateway.secret import Secret

T = TypeVar("T")
MEMO_SIZE = 10_000  # entries a configuration remembers of its compiled lookups (see Config.memo)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A model glob compiled once: `*` and `?` never match `/`, and `[...]` (`[!...]` negated) never
    matches `/` either, so `cheap-*` cannot reach `cheap-x/../pricey`. Everything else is literal."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            j = pattern.find("]", j)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:j].replace("\\", "\\\\")
                negate = body.startswith("!")
                body = body[1:] if negate else body
                out.append("(?!/)[" + ("^" if negate else "") + body.replace("[", "\\[") + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def glob_match(name: str, pattern: str) -> bool:
    """One-off glob test (config checks); hot paths keep the compiled `glob_regex`."""
    return name == pattern or glob_regex(pattern).fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class ToolFee:
    """A built-in (provider-run) tool's fee: USD per call, the calls a request may make when the
    request itself names no bound, and prompt tokens held per call for the results it feeds back."""

    per_call: Decimal
    max_calls_per_request: int | None = None
    prompt_tokens_per_call: int = 0


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where requests for a set of models go and how the provider key is injected, and which
    price-changing request features it accepts (everything not listed here is refused)."""

    name: str
    dialect: str
    base_url: str
    api_key: Secret
    auth: str
    timeout_seconds: float
    connect_timeout_seconds: float
    stream_usage: str
    output_cap_field: str
    service_tiers: Mapping[str, Decimal] = field(default_factory=dict)  # tier -> price multiplier
    tool_fees: Mapping[str, ToolFee] = field(default_factory=dict)  # built-in tool kind -> fee
    allowed_betas: frozenset[str] = frozenset()  # anthropic-beta values forwarded
    stored_prompt_tokens: int | None = None  # None: refuse prompts held provider-side; else held extra


@dataclass(frozen=True, slots=True)
class Prices:
    """USD per 1M tokens (and per request) as written in providers.yaml."""

    input: Decimal
    cached_input: Decimal
    cache_write: Decimal
    output: Decimal
    per_request: Decimal
    cache_write_1h: Decimal


@dataclass(frozen=True, slots=True)
class PromptTier:
    """Prices for prompts of more than `above_input_tokens` tokens (every token of such a request)."""

    above_input_tokens: int
    prices: Prices


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """A model name or glob, its upstream, its prices and its output ceiling."""

    pattern: str
    upstream: str
    prices: Prices
    max_output_tokens: int
    tiers: tuple[PromptTier, ...] = ()  # ascending thresholds
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", glob_regex(self.pattern))

    def matches(self, model: str) -> bool:
        return self.pattern == model or self._regex.fullmatch(model) is not None


@dataclass(frozen=True, slots=True)
class Rates:
    """Integer prices in micro-credits: per 1M tokens for tokens, per call for requests.

    Compiled per (plan, route): the base prices, prompt-size tiers (`above`), the same sheet under
    each service tier (multiplier applied at load, in parts per million) and built-in tool fees.
    The pricer of one request sets the last three fields (see gateway.dialects.drivers).
    """

    input: int
    cached_input: int
    cache_write: int
    output: int
    per_request: int
    cache_write_1h: int | None = None  # None: the same as cache_write
    above: tuple[tuple[int, Rates], ...] = ()  # (prompt tokens threshold, rates above it), ascending
    service_tiers: tuple[tuple[str, int, Rates], ...] = ()  # (tier, multiplier ppm, rates at that tier)
    tool_fees: tuple[tuple[str, int], ...] = ()  # (tool kind, micro-credits per call)
    # one request's terms:
    service_tier: str | None = None  # the tier held for, billed when the response names none
    tool_calls: tuple[tuple[str, int], ...] = ()  # (tool kind, most calls the request may make)
    extra_prompt_tokens: int = 0  # held on top of the body's bound (tool results, stored prompts)

    @property
    def cache_write_long(self) -> int:
        return self.cache_write if self.cache_write_1h is None else self.cache_write_1h


@dataclass(frozen=True, slots=True)
class PlanPrice:
    """A plan's own price for the models matching `pattern`, instead of USD prices converted."""

    pattern: str
    tokens_per_credit: Decimal | None  # every token (input, cached, cache write, output)
    output_tokens_per_credit: Decimal | None  # output tokens, when they differ
    credits_per_call: Decimal  # a fixed price per request, on top of any token price

    def matches(self, route: str) -> bool:
        return glob_match(route, self.pattern)


@dataclass(frozen=True, slots=True)
class AlertPolicy:
    """When a plan's accounts are warned, and where the warnings are POSTed."""

    low_credit_share: float = 0.25
    thresholds: tuple[int, ...] = (80, 90, 100)  # % of the allowance and of each per-cycle cap
    webhook_url: str = ""
    webhook_secret: Secret = field(default_factory=lambda: Secret(""))


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    monthly_credits: int  # micro-credits
    credit_usd: Decimal
    markup: Decimal
    models: tuple[str, ...]
    pricing: tuple[PlanPrice, ...] = ()
    limits: tuple[Limit, ...] = ()  # checked in the reserve script (see gateway.limits)
    max_keys: int | None = None
    timezone: str = "UTC"  # the billing cycle's calendar
    alerts: AlertPolicy = field(default_factory=AlertPolicy)
    _globs: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_globs", tuple(glob_regex(p) for p in self.models))

    def price_for(self, route: str) -> PlanPrice | None:
        return next((p for p in self.pricing if p.matches(route)), None)

    def allows(self, model: str) -> bool:
        return any(glob.fullmatch(model) is not None for glob in self._globs)


@dataclass(frozen=True, slots=True)
class Pack:
    """Credits sold once; they never expire."""

    name: str
    credits: int  # micro-credits
    price_usd: Decimal


@dataclass(frozen=True, slots=True)
class Config:
    upstreams: Mapping[str, Upstream]
    routes: tuple[ModelRoute, ...]
    plans: Mapping[str, Plan]
    default_plan: str
    _rates: Mapping[tuple[str, str], Rates] = field(repr=False)
    _usd: Mapping[str, Rates] = field(repr=False, default_factory=dict)
    packs: Mapping[str, Pack] = field(default_factory=dict)
    # lookups compiled from this configuration on first use (a reload brings a new Config, and an
    # empty memo): a request's route, whether a plan allows a model, its encoded limit rows
    _memo: dict[tuple[Any, ...], Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    def memo(self, key: tuple[Any, ...], compute: Callable[[], T]) -> T:
        """`compute()`, remembered under `key` for this configuration (at most MEMO_SIZE entries: the
        keys may hold names clients send)."""
        try:
            return self._memo[key]  # type: ignore[no-any-return]
        except KeyError:
            pass
        value = compute()
        if len(self._memo) >= MEMO_SIZE:
            self._memo.clear()
        self._memo[key] = value
        return value

    def usd_rates(self, route: ModelRoute) -> Rates:
        """The provider's list price in micro-USD (no plan, no markup), for USD caps."""
        return self._usd[route.pattern]

    def route(self, model: str) -> ModelRoute | None:
        """The first route naming the model exactly, else the first glob that matches."""
        return self.memo(("route", model), lambda: self._route(model))

    def allows(self, plan: Plan, model: str) -> bool:
        """`plan.allows(model)`, remembered."""
        return self.memo(("allows", plan.name, model), lambda: plan.allows(model))

    def _route(self, model: str) -> ModelRoute | None:
        for route in self.routes:
            if route.pattern == model:
                return route
        for route in self.routes:
            if route.matches(model):
                return route
        return None

    def rates(self, plan: str, route: ModelRoute) -> Rates:
        return self._rates[(plan, route.pattern)]

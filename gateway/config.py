"""providers.yaml and plans.yaml: read, interpolated, validated into frozen runtime tables.

Every problem is reported as `file: path.inside.file: problem`. Prices are converted once, at
load, into integer micro-credits per 1M tokens for every (plan, model) pair.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gateway.limits import RATE_LIMITS, Limit, parse_duration, rate_limits, spend_window
from gateway.money import MAX_SAFE, MICRO, usd_rate_to_micro_per_mtok
from gateway.secret import Secret

T = TypeVar("T")
DIALECTS = ("openai", "anthropic", "gemini", "http")  # http: pass-through priced per call
AUTH_STYLES = ("bearer", "x-api-key", "x-goog-api-key", "none")
STREAM_USAGE = ("inject", "always", "none")
MEMO_SIZE = 10_000  # entries a configuration remembers of its compiled lookups (see Config.memo)
_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


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


class ConfigError(Exception):
    """A configuration problem, located by file and path."""

    def __init__(self, file: str, path: str, problem: str, more: tuple[tuple[str, str, str], ...] = ()) -> None:
        self.problems = ((file, path, problem), *more)  # every problem found, the first one first
        super().__init__("\n".join(f"{f}: {p or '<root>'}: {m}" for f, p, m in self.problems))
        self.file, self.path, self.problem = file, path, problem


# ---------------------------------------------------------------- runtime tables


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


# ---------------------------------------------------------------- validation helpers


class _Reader:
    """Typed accessors that raise ConfigError naming the file and path."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, path: str, problem: str) -> ConfigError:
        return ConfigError(self.file, path, problem)

    def mapping(self, value: Any, path: str, allowed: set[str], required: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(path, f"keys must be strings, got {key!r}")
            if allowed and key not in allowed:
                raise self.fail(_join(path, key), f"unknown key (allowed: {', '.join(sorted(allowed))})")
        for key in sorted(required - set(value)):
            raise self.fail(_join(path, key), "is required")
        return value

    def string(self, value: Any, path: str, choices: tuple[str, ...] = ()) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(path, "expected a non-empty string")
        if choices and value not in choices:
            raise self.fail(path, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def decimal(self, value: Any, path: str, *, positive: bool = False) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
            raise self.fail(path, "expected a number")
        try:
            dec = Decimal(str(value))
        except InvalidOperation:
            raise self.fail(path, f"expected a number, got {value!r}") from None
        if not dec.is_finite() or dec < 0 or (positive and dec == 0):
            raise self.fail(path, "must be a positive number" if positive else "must be zero or more")
        return dec

    def integer(self, value: Any, path: str, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(path, f"expected a whole number of at least {minimum}")
        if value > MAX_SAFE:
            raise self.fail(path, "is too large")
        return value

    def string_list(self, value: Any, path: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(path, "expected a non-empty list of strings")
        return tuple(self.string(item, f"{path}[{i}]") for i, item in enumerate(value))


def _join(path: str, key: str | int) -> str:
    return f"{path}.{key}" if path else str(key)


def interpolate(value: Any, reader: _Reader, path: str = "", env: Mapping[str, str] | None = None) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of a parsed YAML tree."""
    env = os.environ if env is None else env
    if isinstance(value, dict):
        return {k: interpolate(v, reader, _join(path, k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, reader, f"{path}[{i}]", env) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match["name"], match["default"]
        if name in env and (env[name] != "" or default is None):
            return env[name]
        if default is not None:
            return default
        raise reader.fail(path, f"environment variable {name} is not set (write ${{{name}:-default}})")

    return _VAR.sub(substitute, value)


def _read_yaml(path: Path) -> tuple[_Reader, Any]:
    reader = _Reader(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise reader.fail("", f"cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise reader.fail(where, f"invalid YAML: {getattr(exc, 'problem', exc)}") from None
    return reader, interpolate(data, reader)


# ---------------------------------------------------------------- providers.yaml


def _upstream(r: _Reader, name: str, raw: Any, path: str) -> Upstream:
    keys = {"dialect", "base_url", "api_key", "auth", "timeout_seconds", "connect_timeout_seconds",
            "stream_usage", "output_cap_field", "service_tiers", "tool_fees", "allowed_betas", "stored_prompt_tokens"}
    m = r.mapping(raw, path, keys, {"dialect", "base_url"})
    base_url = r.string(m["base_url"], _join(path, "base_url"))
    if not base_url.startswith(("http://", "https://")):
        raise r.fail(_join(path, "base_url"), f"must start with http:// or https://, got {base_url!r}")
    api_key = m.get("api_key", "")
    if not isinstance(api_key, str):
        raise r.fail(_join(path, "api_key"), "expected a string (use ${ENV_VAR})")
    return Upstream(
        name=name,
        dialect=r.string(m["dialect"], _join(path, "dialect"), DIALECTS),
        base_url=base_url.rstrip("/"),
        api_key=Secret(api_key),
        auth=r.string(m.get("auth", "bearer"), _join(path, "auth"), AUTH_STYLES),
        timeout_seconds=float(r.decimal(m.get("timeout_seconds", 600), _join(path, "timeout_seconds"),
                                        positive=True)),
        connect_timeout_seconds=float(r.decimal(m.get("connect_timeout_seconds", 10),
                                                _join(path, "connect_timeout_seconds"), positive=True)),
        stream_usage=r.string(m.get("stream_usage", "inject"), _join(path, "stream_usage"), STREAM_USAGE),
        output_cap_field=r.string(m.get("output_cap_field", "max_completion_tokens"),
                                  _join(path, "output_cap_field"), ("max_completion_tokens", "max_tokens")),
        service_tiers=_service_tiers(r, m.get("service_tiers", {}), _join(path, "service_tiers")),
        tool_fees=_tool_fees(r, m.get("tool_fees", {}), _join(path, "tool_fees")),
        allowed_betas=frozenset(r.string_list(m["allowed_betas"], _join(path, "allowed_betas"))
                                if m.get("allowed_betas") else ()),
        stored_prompt_tokens=(r.integer(m["stored_prompt_tokens"], _join(path, "stored_prompt_tokens"))
                              if m.get("stored_prompt_tokens") is not None else None),
    )


def _service_tiers(r: _Reader, raw: Any, path: str) -> dict[str, Decimal]:
    m = r.mapping(raw, path, set())
    tiers = {name: r.decimal(value, _join(path, name), positive=True) for name, value in m.items()}
    for name, value in tiers.items():
        if value * MICRO != (value * MICRO).to_integral_value():
            raise r.fail(_join(path, name), "at most 6 decimal places")
    return tiers


def _tool_fees(r: _Reader, raw: Any, path: str) -> dict[str, ToolFee]:
    fees = {}
    for kind, value in r.mapping(raw, path, set()).items():
        where = _join(path, kind)
        if isinstance(value, dict):
            m = r.mapping(value, where, {"per_call", "max_calls_per_request", "prompt_tokens_per_call"}, {"per_call"})
            fees[kind] = ToolFee(
                r.decimal(m["per_call"], _join(where, "per_call")),
                r.integer(m["max_calls_per_request"], _join(where, "max_calls_per_request"), minimum=1)
                if "max_calls_per_request" in m else None,
                r.integer(m.get("prompt_tokens_per_call", 0), _join(where, "prompt_tokens_per_call")))
        else:
            fees[kind] = ToolFee(r.decimal(value, where))
    return fees


def _prices(r: _Reader, m: Mapping[str, Any], path: str, base: Prices | None = None) -> Prices:
    """Prices of a route, or of a prompt-size tier (whose missing input and output prices are the
    route's; cached input and cache writes default to its own input, as on a route)."""
    def get(name: str, default: Decimal) -> Decimal:
        return r.decimal(m[name], _join(path, name)) if name in m else default

    price_in = get("input", base.input if base else Decimal(0))
    cache_write = get("cache_write", price_in)
    return Prices(
        input=price_in,
        cached_input=get("cached_input", price_in),
        cache_write=cache_write,
        output=get("output", base.output if base else Decimal(0)),
        per_request=get("per_request", base.per_request if base else Decimal(0)),
        cache_write_1h=get("cache_write_1h", cache_write),
    )


def _tiers(r: _Reader, raw: Any, path: str, base: Prices) -> tuple[PromptTier, ...]:
    if not isinstance(raw, list) or not raw:
        raise r.fail(path, "expected a non-empty list of {above_input_tokens: N, input: ..., output: ...}")
    tiers: list[PromptTier] = []
    for i, item in enumerate(raw):
        where = f"{path}[{i}]"
        m = r.mapping(item, where, {"above_input_tokens", "input", "cached_input", "cache_write", "cache_write_1h",
                                    "output"}, {"above_input_tokens"})
        above = r.integer(m["above_input_tokens"], _join(where, "above_input_tokens"), minimum=1)
        if tiers and above <= tiers[-1].above_input_tokens:
            raise r.fail(_join(where, "above_input_tokens"), "tiers must be in increasing order")
        tiers.append(PromptTier(above, _prices(r, m, where, base)))
    return tuple(tiers)


def _route(r: _Reader, pattern: str, raw: Any, path: str, upstreams: Mapping[str, Upstream]) -> ModelRoute:
    keys = {"upstream", "input", "cached_input", "cache_write", "cache_write_1h", "output", "per_request",
            "max_output_tokens", "tiers"}
    m = r.mapping(raw, path, keys, {"upstream"})
    upstream = r.string(m["upstream"], _join(path, "upstream"))
    if upstream not in upstreams:
        raise r.fail(_join(path, "upstream"), f"unknown upstream {upstream!r} (defined: {', '.join(upstreams)})")
    per_call_only = upstreams[upstream].dialect == "http"
    if per_call_only:
        extra = sorted(set(m) - {"upstream", "per_request"})
        if extra:
            raise r.fail(_join(path, extra[0]), "an http pass-through entry is priced per request only")
    elif "max_output_tokens" not in m:
        raise r.fail(_join(path, "max_output_tokens"), "is required")
    prices = _prices(r, m, path)
    tiers = _tiers(r, m["tiers"], _join(path, "tiers"), prices) if "tiers" in m else ()
    ceiling = 0 if per_call_only else r.integer(m["max_output_tokens"], _join(path, "max_output_tokens"), minimum=1)
    return ModelRoute(pattern, upstream, prices, ceiling, tiers)


def load_providers(path: Path) -> tuple[dict[str, Upstream], tuple[ModelRoute, ...]]:
    r, data = _read_yaml(path)
    top = r.mapping(data, "", {"upstreams", "models"}, {"upstreams", "models"})
    raw_up = r.mapping(top["upstreams"], "upstreams", set())
    if not raw_up:
        raise r.fail("upstreams", "define at least one upstream")
    upstreams = {name: _upstream(r, name, raw, _join("upstreams", name)) for name, raw in raw_up.items()}
    raw_models = r.mapping(top["models"], "models", set())
    routes = tuple(_route(r, name, raw, _join("models", name), upstreams) for name, raw in raw_models.items())
    return upstreams, routes


# ---------------------------------------------------------------- plans.yaml


def _plan_price(r: _Reader, pattern: str, raw: Any, path: str) -> PlanPrice:
    m = r.mapping(raw, path, {"tokens_per_credit", "output_tokens_per_credit", "credits_per_call"})
    if not m:
        raise r.fail(path, "give tokens_per_credit, output_tokens_per_credit or credits_per_call")
    tokens = m.get("tokens_per_credit")
    output = m.get("output_tokens_per_credit")
    if output is not None and tokens is None:
        raise r.fail(_join(path, "tokens_per_credit"), "is required with output_tokens_per_credit")
    per_call = r.decimal(m.get("credits_per_call", 0), _join(path, "credits_per_call"))
    if (per_call * MICRO) != (per_call * MICRO).to_integral_value():
        raise r.fail(_join(path, "credits_per_call"), "at most 6 decimal places")
    return PlanPrice(
        pattern=pattern,
        tokens_per_credit=None if tokens is None else r.decimal(tokens, _join(path, "tokens_per_credit"),
                                                                 positive=True),
        output_tokens_per_credit=None if output is None else r.decimal(
            output, _join(path, "output_tokens_per_credit"), positive=True),
        credits_per_call=per_call,
    )


def _micro(r: _Reader, value: Any, path: str) -> int:
    micro = r.decimal(value, path) * MICRO
    if micro != micro.to_integral_value():
        raise r.fail(path, "at most 6 decimal places")
    if micro > MAX_SAFE:
        raise r.fail(path, "is too large")
    return int(micro)


def _limits(r: _Reader, raw: Any, path: str, upstream_names: set[str] | None) -> tuple[tuple[Limit, ...], int | None]:
    allowed = set(RATE_LIMITS) | {"max_keys", "max_cost_usd_per_cycle", "spend_windows", "providers",
                                  "requests_per_cycle", "tokens_per_cycle"}
    m = r.mapping(raw, path, allowed)
    rates = {k: r.integer(v, _join(path, k), minimum=1) for k, v in m.items() if k in RATE_LIMITS}
    limits = list(rate_limits(rates, "a"))
    for cap_name, metric in (("requests_per_cycle", "n"), ("tokens_per_cycle", "t")):
        if cap_name in m:
            limits.append(Limit(cap_name, metric, r.integer(m[cap_name], _join(path, cap_name), minimum=1), "a", 0, 0))
    if "max_cost_usd_per_cycle" in m:
        limits.append(Limit("max_cost_usd_per_cycle", "u", _micro(r, m["max_cost_usd_per_cycle"],
                                                                    _join(path, "max_cost_usd_per_cycle")), "a", 0, 0))
    windows = r.mapping(m.get("spend_windows", {}), _join(path, "spend_windows"), set())
    for window, credits in windows.items():
        try:
            duration = parse_duration(window)
        except ValueError as exc:
            raise r.fail(_join(_join(path, "spend_windows"), window), str(exc)) from None
        limits.append(spend_window(window, duration, _micro(r, credits, _join(_join(path, "spend_windows"), window))))
    providers = r.mapping(m.get("providers", {}), _join(path, "providers"), set())
    for provider, caps in providers.items():
        ppath = _join(_join(path, "providers"), provider)
        if upstream_names is not None and provider not in upstream_names:
            raise r.fail(ppath, f"unknown upstream {provider!r} (defined: {', '.join(sorted(upstream_names))})")
        cm = r.mapping(caps, ppath, {"calls_per_cycle", "tokens_per_cycle"})
        for cap_name, metric in (("calls_per_cycle", "n"), ("tokens_per_cycle", "t")):
            if cap_name in cm:
                limits.append(Limit(f"{provider}.{cap_name}", metric, r.integer(cm[cap_name], _join(ppath, cap_name),
                                                                                minimum=1), "a", 0, 0, provider))
    max_keys = r.integer(m["max_keys"], _join(path, "max_keys"), minimum=1) if "max_keys" in m else None
    return tuple(limits), max_keys


def key_limits(values: Any) -> tuple[Limit, ...]:
    """Rate limits of one API key (tighter than its account's), validated; ValueError names the problem."""
    reader = _Reader("request")
    try:
        m = reader.mapping(values, "limits", set(RATE_LIMITS))
        return rate_limits({k: reader.integer(v, _join("limits", k), minimum=1) for k, v in m.items()}, "k")
    except ConfigError as exc:
        raise ValueError(f"{exc.path}: {exc.problem}") from None


def _timezone(r: _Reader, value: Any, path: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    name = r.string(value, path)
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise r.fail(path, f"unknown timezone {name!r} (use an IANA name such as Europe/Paris)") from None
    return name


def _alerts(r: _Reader, raw: Any, path: str) -> AlertPolicy:
    m = r.mapping(raw, path, {"low_credit_share", "thresholds", "webhook_url", "webhook_secret"})
    share = r.decimal(m.get("low_credit_share", "0.25"), _join(path, "low_credit_share"))
    if share > 1:
        raise r.fail(_join(path, "low_credit_share"), "must be between 0 and 1")
    thresholds = m.get("thresholds", [80, 90, 100])
    if not isinstance(thresholds, list) or not thresholds:
        raise r.fail(_join(path, "thresholds"), "expected a non-empty list of percentages")
    values = tuple(r.integer(t, f"{_join(path, 'thresholds')}[{i}]", minimum=1) for i, t in enumerate(thresholds))
    url = m.get("webhook_url", "")
    if url and (not isinstance(url, str) or not url.startswith(("http://", "https://"))):
        raise r.fail(_join(path, "webhook_url"), "must be an http:// or https:// URL")
    secret = m.get("webhook_secret", "")
    if not isinstance(secret, str):
        raise r.fail(_join(path, "webhook_secret"), "expected a string (use ${ENV_VAR})")
    return AlertPolicy(float(share), values, url, Secret(secret))


def _plan(r: _Reader, name: str, raw: Any, path: str, upstream_names: set[str] | None = None) -> Plan:
    m = r.mapping(raw, path, {"monthly_credits", "credit_usd", "markup", "models", "pricing", "limits", "timezone",
                              "alerts"}, {"monthly_credits", "models"})
    pricing = r.mapping(m.get("pricing", {}), _join(path, "pricing"), set())
    limits, max_keys = _limits(r, m.get("limits", {}), _join(path, "limits"), upstream_names)
    monthly = r.decimal(m["monthly_credits"], _join(path, "monthly_credits")) * MICRO
    if monthly != monthly.to_integral_value():
        raise r.fail(_join(path, "monthly_credits"), "at most 6 decimal places")
    if monthly > MAX_SAFE:
        raise r.fail(_join(path, "monthly_credits"), "is too large")
    return Plan(
        name=name,
        monthly_credits=int(monthly),
        credit_usd=r.decimal(m.get("credit_usd", 1), _join(path, "credit_usd"), positive=True),
        markup=r.decimal(m.get("markup", 1), _join(path, "markup"), positive=True),
        models=r.string_list(m["models"], _join(path, "models")),
        pricing=tuple(_plan_price(r, pattern, value, _join(_join(path, "pricing"), pattern))
                      for pattern, value in pricing.items()),
        limits=limits,
        max_keys=max_keys,
        timezone=_timezone(r, m.get("timezone", "UTC"), _join(path, "timezone")),
        alerts=_alerts(r, m.get("alerts", {}), _join(path, "alerts")),
    )


def _pack(r: _Reader, name: str, raw: Any, path: str) -> Pack:
    m = r.mapping(raw, path, {"credits", "price_usd"}, {"credits"})
    credits = _micro(r, m["credits"], _join(path, "credits"))
    if credits <= 0:
        raise r.fail(_join(path, "credits"), "must be a positive number")
    return Pack(name, credits, r.decimal(m.get("price_usd", 0), _join(path, "price_usd")))


def load_plans(path: Path, upstream_names: set[str] | None = None
               ) -> tuple[dict[str, Plan], str, dict[str, Pack]]:
    r, data = _read_yaml(path)
    top = r.mapping(data, "", {"plans", "default_plan", "packs"}, {"plans", "default_plan"})
    raw = r.mapping(top["plans"], "plans", set())
    if not raw:
        raise r.fail("plans", "define at least one plan")
    plans = {name: _plan(r, name, value, _join("plans", name), upstream_names) for name, value in raw.items()}
    default = r.string(top["default_plan"], "default_plan")
    if default not in plans:
        raise r.fail("default_plan", f"unknown plan {default!r}")
    packs_raw = r.mapping(top.get("packs", {}), "packs", set())
    packs = {name: _pack(r, name, value, _join("packs", name)) for name, value in packs_raw.items()}
    return plans, default, packs


# ---------------------------------------------------------------- both files


def _sheet(p: Prices, conv: Callable[[Decimal], int], multiplier: Decimal = Decimal(1)) -> Rates:
    # per_request is USD per call: the same conversion gives micro-credits per call
    return Rates(conv(p.input * multiplier), conv(p.cached_input * multiplier), conv(p.cache_write * multiplier),
                 conv(p.output * multiplier), conv(p.per_request), conv(p.cache_write_1h * multiplier))


def _route_rates(route: ModelRoute, upstream: Upstream | None, own: PlanPrice | None,
                 conv: Callable[[Decimal], int]) -> Rates:
    """One (plan, route) price sheet: multipliers and USD fees become integer rates here, once."""
    def at(multiplier: Decimal) -> Rates:
        if own is not None:  # a plan's own flat price per token: no prompt-size tiers
            base = _plan_rates(own)

            def scaled(v: int) -> int:
                return int((Decimal(v) * multiplier).to_integral_value(rounding="ROUND_CEILING"))

            return Rates(scaled(base.input), scaled(base.cached_input), scaled(base.cache_write), scaled(base.output),
                         base.per_request, scaled(base.cache_write_long))
        base = _sheet(route.prices, conv, multiplier)
        above = tuple((t.above_input_tokens, _sheet(t.prices, conv, multiplier)) for t in route.tiers)
        return Rates(base.input, base.cached_input, base.cache_write, base.output, base.per_request,
                     base.cache_write_1h, above)

    compiled = at(Decimal(1))
    if upstream is None:
        return compiled
    tiers = tuple((name, int(mult * MICRO), at(mult)) for name, mult in upstream.service_tiers.items())
    fees = tuple((kind, conv(fee.per_call)) for kind, fee in upstream.tool_fees.items())
    return Rates(compiled.input, compiled.cached_input, compiled.cache_write, compiled.output, compiled.per_request,
                 compiled.cache_write_1h, compiled.above, tiers, fees)


def _compile_rates(
    plans: Mapping[str, Plan], routes: tuple[ModelRoute, ...], fail: Callable[[str, str], ConfigError],
    upstreams: Mapping[str, Upstream] | None = None,
) -> dict[tuple[str, str], Rates]:
    rates: dict[tuple[str, str], Rates] = {}
    for plan in plans.values():
        for route in routes:
            def conv(usd: Decimal, plan: Plan = plan) -> int:
                return usd_rate_to_micro_per_mtok(usd, plan.credit_usd, plan.markup)

            own = plan.price_for(route.pattern)
            compiled = _route_rates(route, (upstreams or {}).get(route.upstream), own, conv)
            sheets = [compiled, *(r for _, r in compiled.above), *(r for _, _, r in compiled.service_tiers),
                      *(r for _, _, t in compiled.service_tiers for _, r in t.above)]
            worst = max(s.output for s in sheets) * route.max_output_tokens // MICRO
            if worst > MAX_SAFE // 4:
                raise fail(f"models.{route.pattern}", f"worst-case cost under plan {plan.name!r} is too large")
            rates[(plan.name, route.pattern)] = compiled
    return rates


def _per_token(tokens_per_credit: Decimal | None) -> int:
    """Micro-credits per 1M tokens when N tokens cost one credit, rounded up."""
    if tokens_per_credit is None:
        return 0
    exact = Decimal(MICRO) * MICRO / tokens_per_credit
    return int(exact.to_integral_value(rounding="ROUND_CEILING"))


def _plan_rates(own: PlanPrice) -> Rates:
    token = _per_token(own.tokens_per_credit)
    output = _per_token(own.output_tokens_per_credit) if own.output_tokens_per_credit else token
    return Rates(token, token, token, output, int(own.credits_per_call * MICRO), token)


def load_config(config_dir: Path | str) -> Config:
    """Load and validate both files of a config directory."""
    folder = Path(config_dir)
    providers_file = folder / "providers.yaml"
    upstreams, routes = load_providers(providers_file)
    plans, default, packs = load_plans(folder / "plans.yaml", set(upstreams))
    plans_reader = _Reader(str(folder / "plans.yaml"))
    for plan in plans.values():
        for i, pattern in enumerate(plan.models):
            if not any(glob_match(route.pattern, pattern) or route.matches(pattern) for route in routes):
                raise plans_reader.fail(f"plans.{plan.name}.models[{i}]",
                                        f"{pattern!r} matches no model in {providers_file}")
        for price in plan.pricing:
            if not any(price.matches(route.pattern) or route.matches(price.pattern) for route in routes):
                raise plans_reader.fail(f"plans.{plan.name}.pricing.{price.pattern}",
                                        f"{price.pattern!r} matches no model in {providers_file}")
    rates = _compile_rates(plans, routes, lambda path, problem: ConfigError(str(providers_file), path, problem),
                           upstreams)
    usd_plan = Plan("<usd>", 0, Decimal(1), Decimal(1), ("*",))
    usd = _compile_rates({"<usd>": usd_plan}, routes,
                         lambda path, problem: ConfigError(str(providers_file), path, problem), upstreams)
    return Config(upstreams, routes, plans, default, rates, {p: r for (_, p), r in usd.items()}, packs)

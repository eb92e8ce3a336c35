"""providers.yaml and plans.yaml: read, interpolated, validated into frozen runtime tables.

The files' shape is checked by the pydantic models of gateway.config_schema (which also give the
published JSON Schemas); the checks that need both files, and the compilation, are here. Every
problem is reported, all at once, as `file: path.inside.file: problem`. Prices are converted once,
at load, into integer micro-credits per 1M tokens for every (plan, model) pair.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from gateway.config_schema import (
    LimitsSpec,
    PlanPriceSpec,
    PlansFile,
    PlanSpec,
    PriceSpec,
    ProvidersFile,
    RouteSpec,
    UpstreamSpec,
)
from gateway.config_schema import problems as schema_problems
from gateway.config_tables import (
    AlertPolicy,
    Config,
    ModelRoute,
    Pack,
    Plan,
    PlanPrice,
    Prices,
    PromptTier,
    Rates,
    ToolFee,
    Upstream,
    glob_match,
    glob_regex,
)
from gateway.limits import RATE_LIMITS, Limit, parse_duration, rate_limits, spend_window
from gateway.money import MAX_SAFE, MICRO, usd_rate_to_micro_per_mtok
from gateway.secret import Secret

M = TypeVar("M", bound=BaseModel)
__all__ = ["AlertPolicy", "Config", "ConfigError", "ModelRoute", "Pack", "Plan", "PlanPrice", "Prices", "PromptTier",
           "Rates", "ToolFee", "Upstream", "glob_match", "glob_regex", "interpolate", "key_limits", "load_config",
           "load_plans", "load_providers"]
_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


class ConfigError(Exception):
    """A configuration problem, located by file and path."""

    def __init__(self, file: str, path: str, problem: str, more: tuple[tuple[str, str, str], ...] = ()) -> None:
        self.problems = ((file, path, problem), *more)  # every problem found, the first one first
        super().__init__("\n".join(f"{f}: {p or '<root>'}: {m}" for f, p, m in self.problems))
        self.file, self.path, self.problem = file, path, problem


# ---------------------------------------------------------------- reading, interpolation


class _Problems:
    """Every problem found in one load, to report them all at once."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str, str]] = []

    def add(self, file: Path | str, path: str, problem: str) -> None:
        self.found.append((str(file), path, problem))

    def raise_any(self) -> None:
        if self.found:
            raise ConfigError(*self.found[0], more=tuple(self.found[1:]))


def interpolate(value: Any, fail: Callable[[str, str], None], path: str = "",
                env: Mapping[str, str] | None = None) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of a parsed YAML tree; `fail(path,
    problem)` hears of each variable that is not set and has no default."""
    env = os.environ if env is None else env
    if isinstance(value, dict):
        return {k: interpolate(v, fail, f"{path}.{k}" if path else str(k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, fail, f"{path}[{i}]", env) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match["name"], match["default"]
        if name in env and (env[name] != "" or default is None):
            return env[name]
        if default is not None:
            return default
        fail(path, f"environment variable {name} is not set (write ${{{name}:-default}})")
        return ""

    return _VAR.sub(substitute, value)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one
    silently: a second `upstreams:` block would drop the first, a plan named twice would lose one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read(path: Path, model: type[M], problems: _Problems) -> M | None:
    """One file parsed, interpolated and validated against its model; None when it has problems."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problems.add(path, "", f"cannot read: {exc.strerror} (config directory {path.parent.resolve()})")
        return None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problems.add(path, where, f"invalid YAML: {getattr(exc, 'problem', exc)}")
        return None
    before = len(problems.found)
    data = interpolate(data, lambda where, problem: problems.add(path, where, problem))
    try:
        spec = model.model_validate(data)
    except ValidationError as exc:
        for where, problem in schema_problems(model, exc):
            problems.add(path, where, problem)
        return None
    return spec if len(problems.found) == before else None


# ---------------------------------------------------------------- providers.yaml


def _prices(spec: PriceSpec, per_request: Decimal | None, base: Prices | None = None) -> Prices:
    """A route's prices, or a prompt-size tier's (whose missing input and output prices are the
    route's; cached input and cache writes default to its own input, as on a route)."""
    zero = Decimal(0)
    price_in = spec.input if spec.input is not None else (base.input if base else zero)
    cache_write = spec.cache_write if spec.cache_write is not None else price_in
    return Prices(
        input=price_in,
        cached_input=spec.cached_input if spec.cached_input is not None else price_in,
        cache_write=cache_write,
        output=spec.output if spec.output is not None else (base.output if base else zero),
        per_request=per_request if per_request is not None else (base.per_request if base else zero),
        cache_write_1h=spec.cache_write_1h if spec.cache_write_1h is not None else cache_write,
    )


def _upstream(name: str, spec: UpstreamSpec) -> Upstream:
    return Upstream(
        name=name, dialect=spec.dialect, base_url=spec.base_url.rstrip("/"), api_key=Secret(spec.api_key),
        auth=spec.auth, timeout_seconds=float(spec.timeout_seconds),
        connect_timeout_seconds=float(spec.connect_timeout_seconds), stream_usage=spec.stream_usage,
        output_cap_field=spec.output_cap_field, service_tiers=dict(spec.service_tiers),
        tool_fees={kind: ToolFee(fee.per_call, fee.max_calls_per_request, fee.prompt_tokens_per_call)
                   for kind, fee in spec.tool_fees.items()},
        allowed_betas=frozenset(spec.allowed_betas or ()), stored_prompt_tokens=spec.stored_prompt_tokens)


def _route(pattern: str, spec: RouteSpec, upstreams: Mapping[str, Upstream],
           fail: Callable[[str, str], None]) -> ModelRoute | None:
    path = f"models.{pattern}"
    upstream = upstreams.get(spec.upstream)
    if upstream is None:
        fail(f"{path}.upstream", f"unknown upstream {spec.upstream!r} (defined: {', '.join(upstreams)})")
        return None
    per_call_only = upstream.dialect == "http"
    extra = sorted(spec.model_fields_set - {"upstream", "per_request"})
    if per_call_only and extra:
        fail(f"{path}.{extra[0]}", "an http pass-through entry is priced per request only")
        return None
    if not per_call_only and spec.max_output_tokens is None:
        fail(f"{path}.max_output_tokens", "is required")
        return None
    prices = _prices(spec, spec.per_request)
    tiers: list[PromptTier] = []
    for i, tier in enumerate(spec.tiers or ()):
        if tiers and tier.above_input_tokens <= tiers[-1].above_input_tokens:
            fail(f"{path}.tiers[{i}].above_input_tokens", "tiers must be in increasing order")
            return None
        tiers.append(PromptTier(tier.above_input_tokens, _prices(tier, None, prices)))
    return ModelRoute(pattern, spec.upstream, prices, spec.max_output_tokens or 0, tuple(tiers))


def _providers(path: Path, problems: _Problems) -> tuple[dict[str, Upstream], tuple[ModelRoute, ...]] | None:
    spec = _read(path, ProvidersFile, problems)
    if spec is None:
        return None
    upstreams = {name: _upstream(name, up) for name, up in spec.upstreams.items()}
    routes = [_route(pattern, route, upstreams, lambda where, problem: problems.add(path, where, problem))
              for pattern, route in spec.models.items()]
    return upstreams, tuple(r for r in routes if r is not None)


def load_providers(path: Path) -> tuple[dict[str, Upstream], tuple[ModelRoute, ...]]:
    problems = _Problems()
    loaded = _providers(path, problems)
    problems.raise_any()
    assert loaded is not None
    return loaded


# ---------------------------------------------------------------- plans.yaml


def _plan_price(pattern: str, spec: PlanPriceSpec, path: str, fail: Callable[[str, str], None]) -> PlanPrice:
    if not spec.model_fields_set:
        fail(path, "give tokens_per_credit, output_tokens_per_credit or credits_per_call")
    if spec.output_tokens_per_credit is not None and spec.tokens_per_credit is None:
        fail(f"{path}.tokens_per_credit", "is required with output_tokens_per_credit")
    return PlanPrice(pattern, spec.tokens_per_credit, spec.output_tokens_per_credit,
                     spec.credits_per_call or Decimal(0))


def _limits(spec: LimitsSpec, path: str, upstream_names: set[str] | None,
            fail: Callable[[str, str], None]) -> tuple[Limit, ...]:
    """The plan's limits in the order the reserve script checks them (see gateway.limits)."""
    values = spec.model_dump()
    limits = list(rate_limits({k: values[k] for k in RATE_LIMITS if values[k] is not None}, "a"))
    for cap_name, metric in (("requests_per_cycle", "n"), ("tokens_per_cycle", "t")):
        if values[cap_name] is not None:
            limits.append(Limit(cap_name, metric, values[cap_name], "a", 0, 0))
    if spec.max_cost_usd_per_cycle is not None:
        limits.append(Limit("max_cost_usd_per_cycle", "u", int(spec.max_cost_usd_per_cycle * MICRO), "a", 0, 0))
    for window, credits in spec.spend_windows.items():
        try:
            limits.append(spend_window(window, parse_duration(window), int(credits * MICRO)))
        except ValueError as exc:
            fail(f"{path}.spend_windows.{window}", str(exc))
    for provider, caps in spec.providers.items():
        if upstream_names is not None and provider not in upstream_names:
            fail(f"{path}.providers.{provider}",
                 f"unknown upstream {provider!r} (defined: {', '.join(sorted(upstream_names))})")
        for cap_name, metric in (("calls_per_cycle", "n"), ("tokens_per_cycle", "t")):
            cap = getattr(caps, cap_name)
            if cap is not None:
                limits.append(Limit(f"{provider}.{cap_name}", metric, cap, "a", 0, 0, provider))
    return tuple(limits)


def key_limits(values: Any) -> tuple[Limit, ...]:
    """Rate limits of one API key (tighter than its account's), validated; ValueError names the problem."""
    if not isinstance(values, dict):
        raise ValueError("limits: expected a mapping")
    for name, cap in values.items():
        if name not in RATE_LIMITS:
            raise ValueError(f"limits.{name}: unknown key (allowed: {', '.join(sorted(RATE_LIMITS))})")
        if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= MAX_SAFE:
            raise ValueError(f"limits.{name}: expected a whole number of at least 1")
    return rate_limits(values, "k")


def _plan(name: str, spec: PlanSpec, upstream_names: set[str] | None, fail: Callable[[str, str], None]) -> Plan:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    path = f"plans.{name}"
    try:
        ZoneInfo(spec.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        fail(f"{path}.timezone", f"unknown timezone {spec.timezone!r} (use an IANA name such as Europe/Paris)")
    alerts = spec.alerts
    return Plan(
        name=name, monthly_credits=int(spec.monthly_credits * MICRO), credit_usd=spec.credit_usd,
        markup=spec.markup, models=tuple(spec.models),
        pricing=tuple(_plan_price(pattern, price, f"{path}.pricing.{pattern}", fail)
                      for pattern, price in spec.pricing.items()),
        limits=_limits(spec.limits, f"{path}.limits", upstream_names, fail), max_keys=spec.limits.max_keys,
        timezone=spec.timezone,
        alerts=AlertPolicy(float(alerts.low_credit_share), tuple(alerts.thresholds), alerts.webhook_url,
                           Secret(alerts.webhook_secret)),
    )


def _plans(path: Path, upstream_names: set[str] | None, problems: _Problems
           ) -> tuple[dict[str, Plan], str, dict[str, Pack]] | None:
    spec = _read(path, PlansFile, problems)
    if spec is None:
        return None

    def fail(where: str, problem: str) -> None:
        problems.add(path, where, problem)

    plans = {name: _plan(name, plan, upstream_names, fail) for name, plan in spec.plans.items()}
    if spec.default_plan not in plans:
        fail("default_plan", f"unknown plan {spec.default_plan!r}")
    packs = {name: Pack(name, int(pack.credits * MICRO), pack.price_usd) for name, pack in spec.packs.items()}
    return plans, spec.default_plan, packs


def load_plans(path: Path, upstream_names: set[str] | None = None
               ) -> tuple[dict[str, Plan], str, dict[str, Pack]]:
    problems = _Problems()
    loaded = _plans(path, upstream_names, problems)
    problems.raise_any()
    assert loaded is not None
    return loaded


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
    plans: Mapping[str, Plan], routes: tuple[ModelRoute, ...], fail: Callable[[str, str], None],
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
                fail(f"models.{route.pattern}", f"worst-case cost under plan {plan.name!r} is too large")
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
    """Load and validate both files of a config directory; ConfigError carries every problem found."""
    folder = Path(config_dir)
    providers_file, plans_file = folder / "providers.yaml", folder / "plans.yaml"
    problems = _Problems()
    providers = _providers(providers_file, problems)
    plans_loaded = _plans(plans_file, set(providers[0]) if providers else None, problems)
    if providers is None or plans_loaded is None:
        problems.raise_any()  # the files' shapes first; then what they say together, below
    assert providers is not None and plans_loaded is not None
    (upstreams, routes), (plans, default, packs) = providers, plans_loaded
    for plan in plans.values():
        for i, pattern in enumerate(plan.models):
            if not any(glob_match(route.pattern, pattern) or route.matches(pattern) for route in routes):
                problems.add(plans_file, f"plans.{plan.name}.models[{i}]",
                             f"{pattern!r} matches no model in {providers_file}")
        for price in plan.pricing:
            if not any(price.matches(route.pattern) or route.matches(price.pattern) for route in routes):
                problems.add(plans_file, f"plans.{plan.name}.pricing.{price.pattern}",
                             f"{price.pattern!r} matches no model in {providers_file}")

    def fail(path: str, problem: str) -> None:
        problems.add(providers_file, path, problem)

    rates = _compile_rates(plans, routes, fail, upstreams)
    usd = _compile_rates({"<usd>": Plan("<usd>", 0, Decimal(1), Decimal(1), ("*",))}, routes, fail, upstreams)
    problems.raise_any()
    return Config(upstreams, routes, plans, default, rates, {p: r for (_, p), r in usd.items()}, packs)

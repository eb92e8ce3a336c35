"""The shape of providers.yaml and plans.yaml as pydantic models: every field's type, range and default,
checked all at once, each problem with its YAML path. The published JSON Schemas (schema/*.json) are
generated from these models (`python -m gateway.config_schema` writes them).

What needs the whole configuration (an upstream a model names, globs that must match a model, the
worst-case cost) is checked afterwards, in gateway.config, which compiles the runtime tables.
"""

from __future__ import annotations

import json
import sys
from decimal import Decimal, InvalidOperation
from inspect import isclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from gateway.money import MAX_SAFE, MICRO

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema"


def _problem(text: str) -> PydanticCustomError:
    return PydanticCustomError("config", "{problem}", {"problem": text})


def _number(positive: bool = False, micro: bool = False) -> BeforeValidator:
    """A YAML number (or numeric string) as an exact Decimal, zero or more (or positive); `micro`: it
    must be a whole number of micro-units and fit below 2^53 once converted."""
    def check(value: Any) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
            raise _problem("expected a number")
        try:
            dec = Decimal(str(value))
        except InvalidOperation:
            raise _problem(f"expected a number, got {value!r}") from None
        if not dec.is_finite() or dec < 0 or (positive and dec == 0):
            raise _problem("must be a positive number" if positive else "must be zero or more")
        if micro and dec * MICRO != (dec * MICRO).to_integral_value():
            raise _problem("at most 6 decimal places")
        if micro and dec * MICRO > MAX_SAFE:
            raise _problem("is too large")
        return dec
    return BeforeValidator(check)


def _whole(minimum: int) -> BeforeValidator:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _problem(f"expected a whole number of at least {minimum}")
        if value > MAX_SAFE:
            raise _problem("is too large")
        return value
    return BeforeValidator(check)


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _problem("expected a non-empty string")
    return value


def _choice(*choices: str) -> BeforeValidator:
    def check(value: Any) -> str:
        if _text(value) not in choices:
            raise _problem(f"must be one of {', '.join(choices)}, got {value!r}")
        return str(value)
    return BeforeValidator(check)


def _secret(value: Any) -> str:
    if not isinstance(value, str):
        raise _problem("expected a string (use ${ENV_VAR})")
    return value


def _url(value: Any) -> str:
    if not _text(value).startswith(("http://", "https://")):
        raise _problem(f"must start with http:// or https://, got {value!r}")
    return str(value)


def _not_empty(what: str) -> AfterValidator:
    def check(value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise _problem(f"define at least one {what}")
        return value
    return AfterValidator(check)


Amount = Annotated[Decimal, _number()]
Positive = Annotated[Decimal, _number(positive=True)]
Micro = Annotated[Decimal, _number(micro=True)]  # credits (or a multiplier) exact in millionths
Count = Annotated[int, _whole(0), Field(ge=0)]
Count1 = Annotated[int, _whole(1), Field(ge=1)]
Text = Annotated[str, BeforeValidator(_text), Field(min_length=1)]
SecretText = Annotated[str, BeforeValidator(_secret)]
Url = Annotated[str, BeforeValidator(_url), Field(pattern=r"^(https?://|\$\{)")]  # ${VAR:-https://...} in the file


class Strict(BaseModel):
    """Unknown keys are errors (a typo must not silently drop a limit or a price)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- providers.yaml


def _or_a_number(schema: dict[str, Any]) -> None:
    """The JSON Schema of a mapping that may also be written as a bare number (its short form)."""
    long_form = dict(schema)
    schema.clear()
    schema.update({"title": long_form.pop("title", ""), "anyOf": [{"type": "number", "minimum": 0}, long_form]})


class ToolFeeSpec(Strict):
    """A built-in tool's fee: USD per call, or the long form."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_or_a_number)

    per_call: Amount
    max_calls_per_request: Count1 | None = None
    prompt_tokens_per_call: Count = 0

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        return value if isinstance(value, dict) else {"per_call": value}


class UpstreamSpec(Strict):
    dialect: Annotated[Literal["openai", "anthropic", "gemini", "http"], _choice("openai", "anthropic", "gemini",
                                                                                  "http")]
    base_url: Url
    api_key: SecretText = ""
    auth: Annotated[Literal["bearer", "x-api-key", "x-goog-api-key", "none"],
                    _choice("bearer", "x-api-key", "x-goog-api-key", "none")] = "bearer"
    timeout_seconds: Positive = Decimal(600)
    connect_timeout_seconds: Positive = Decimal(10)
    stream_usage: Annotated[Literal["inject", "always", "none"], _choice("inject", "always", "none")] = "inject"
    output_cap_field: Annotated[Literal["max_completion_tokens", "max_tokens"],
                                _choice("max_completion_tokens", "max_tokens")] = "max_completion_tokens"
    service_tiers: dict[str, Annotated[Decimal, _number(positive=True, micro=True)]] = {}  # tier -> multiplier
    tool_fees: dict[str, ToolFeeSpec] = {}
    allowed_betas: list[Text] | None = None
    stored_prompt_tokens: Count | None = None


class PriceSpec(Strict):
    """USD per 1M tokens; a missing price takes its default in gateway.config (input, or the route's)."""

    input: Amount | None = None
    cached_input: Amount | None = None
    cache_write: Amount | None = None
    cache_write_1h: Amount | None = None
    output: Amount | None = None


class TierSpec(PriceSpec):
    above_input_tokens: Count1


class RouteSpec(PriceSpec):
    upstream: Text
    per_request: Amount | None = None
    max_output_tokens: Count1 | None = None
    tiers: Annotated[list[TierSpec], Field(min_length=1)] | None = None


class ProvidersFile(Strict):
    upstreams: Annotated[dict[str, UpstreamSpec], _not_empty("upstream")]
    models: dict[str, RouteSpec]


# ---------------------------------------------------------------- plans.yaml


class PlanPriceSpec(Strict):
    tokens_per_credit: Positive | None = None
    output_tokens_per_credit: Positive | None = None
    credits_per_call: Micro | None = None


class ProviderCapsSpec(Strict):
    calls_per_cycle: Count1 | None = None
    tokens_per_cycle: Count1 | None = None


class LimitsSpec(Strict):
    requests_per_minute: Count1 | None = None
    requests_per_day: Count1 | None = None
    tokens_per_minute: Count1 | None = None
    tokens_per_day: Count1 | None = None
    concurrent_requests: Count1 | None = None
    requests_per_cycle: Count1 | None = None
    tokens_per_cycle: Count1 | None = None
    max_cost_usd_per_cycle: Micro | None = None
    spend_windows: dict[str, Micro] = {}  # duration (30m, 5h, 1d, 1w) -> credits
    providers: dict[str, ProviderCapsSpec] = {}  # upstream -> per-cycle caps
    max_keys: Count1 | None = None


class AlertsSpec(Strict):
    low_credit_share: Annotated[Decimal, _number(), Field(le=1)] = Decimal("0.25")
    thresholds: Annotated[list[Count1], Field(min_length=1)] = [80, 90, 100]
    webhook_url: Annotated[str, BeforeValidator(lambda v: "" if v in (None, "") else _url(v))] = ""
    webhook_secret: SecretText = ""


class PlanSpec(Strict):
    monthly_credits: Micro
    credit_usd: Positive = Decimal(1)
    markup: Positive = Decimal(1)
    models: Annotated[list[Text], Field(min_length=1)]
    pricing: dict[str, PlanPriceSpec] = {}
    limits: LimitsSpec = LimitsSpec()
    timezone: Text = "UTC"
    alerts: AlertsSpec = AlertsSpec()


class PackSpec(Strict):
    credits: Annotated[Decimal, _number(positive=True, micro=True)]
    price_usd: Amount = Decimal(0)


class PlansFile(Strict):
    default_plan: Text
    packs: dict[str, PackSpec] = {}
    plans: Annotated[dict[str, PlanSpec], _not_empty("plan")]


# ---------------------------------------------------------------- errors, schemas


def _unwrap(kind: Any) -> Any:
    """`X` of `Annotated[X, ...]` and of `X | None`."""
    while get_origin(kind) in (Annotated, Union, UnionType):
        kind = next(a for a in get_args(kind) if a is not type(None))
    return kind


def _model_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model whose field `loc` names (to list its keys when one is unknown)."""
    kind: Any = root
    for part in loc:
        kind = _unwrap(kind)
        if isclass(kind) and issubclass(kind, BaseModel):
            kind = kind.model_fields[str(part)].annotation if str(part) in kind.model_fields else None
        elif get_origin(kind) in (dict, list):
            kind = get_args(kind)[-1]
    kind = _unwrap(kind)
    return kind if isclass(kind) and issubclass(kind, BaseModel) else None


def problems(root: type[BaseModel], error: ValidationError) -> list[tuple[str, str]]:
    """Every problem of a failed validation as (YAML path, what is wrong), in file order."""
    found = []
    for item in error.errors(include_url=False):
        loc = tuple(p for p in item["loc"] if p != "[key]")
        path = ""
        for part in loc:
            path = f"{path}[{part}]" if isinstance(part, int) else (f"{path}.{part}" if path else str(part))
        kind = item["type"]
        if kind == "config":
            text = item["ctx"]["problem"]
        elif kind == "extra_forbidden":
            model = _model_at(root, loc[:-1])
            text = "unknown key" + (f" (allowed: {', '.join(sorted(model.model_fields))})" if model else "")
        elif kind == "missing":
            text = "is required"
        elif kind in ("dict_type", "model_type", "model_attributes_type"):
            text = f"expected a mapping, got {type(item['input']).__name__}"
        elif kind in ("list_type", "too_short"):
            text = "expected a non-empty list"
        elif kind == "less_than_equal":
            text = f"must be between 0 and {item['ctx']['le']}"
        else:
            text = item["msg"]
        found.append((path, text))
    return found


def json_schema(model: type[BaseModel], title: str) -> dict[str, Any]:
    schema = model.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": title}


SCHEMAS: dict[str, tuple[type[BaseModel], str]] = {
    "plans.schema.json": (PlansFile, "plans.yaml of the metering gateway"),
    "providers.schema.json": (ProvidersFile, "providers.yaml of the metering gateway"),
}


def render_schemas() -> dict[str, str]:
    """The published schema files' text, by name."""
    return {name: json.dumps(json_schema(model, title), indent=2) + "\n" for name, (model, title) in SCHEMAS.items()}


if __name__ == "__main__":  # python -m gateway.config_schema: write schema/*.json
    SCHEMA_DIR.mkdir(exist_ok=True)
    for file, text in render_schemas().items():
        (SCHEMA_DIR / file).write_text(text, encoding="utf-8")
        print(f"wrote {SCHEMA_DIR / file}", file=sys.stderr)

"""Cost drivers: request features that change what the provider charges beyond the tokens the body
bound and the output cap cover. Each dialect reports the ones it finds (`CostDrivers`); `admit`
then prices them with the upstream's configuration or refuses the request with a 400 naming the
parameter. Nothing that changes the price is forwarded unpriced.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from gateway.config import Rates, Upstream
from gateway.errors import BadRequest


@dataclass(frozen=True, slots=True)
class ToolUse:
    """A built-in (provider-run) tool a request enables, with the call bound the request gives."""

    kind: str  # normalised: web_search, web_fetch, code_execution, file_search, google_search, …
    param: str  # the request parameter that enabled it (for the error message)
    max_uses: int | None = None  # the request's own bound on its calls, if any


@dataclass(frozen=True, slots=True)
class CostDrivers:
    """What a request asks for that the upstream prices on top of tokens."""

    service_tier: str | None = None
    tools: tuple[ToolUse, ...] = ()
    max_tool_calls: int | None = None  # a bound on all built-in tool calls (OpenAI `max_tool_calls`)
    stored_prompt: str | None = None  # the parameter naming a prompt held provider-side
    betas: tuple[str, ...] = ()  # anthropic-beta values (when the request's headers were given)


NONE = CostDrivers()
_DATE_SUFFIX = re.compile(r"_\d{8}$|_\d{4}_\d{2}_\d{2}$")


def tool_kind(name: str) -> str:
    """`web_search_20250305` -> `web_search`; `web_search_preview_2025_03_11` -> `web_search`."""
    kind = _DATE_SUFFIX.sub("", name)
    return "web_search" if kind == "web_search_preview" else kind


def betas_of(headers: Mapping[str, str] | None) -> tuple[str, ...]:
    """The comma-separated `anthropic-beta` values of a request's headers (every occurrence)."""
    if headers is None:
        return ()
    getall = getattr(headers, "getall", None)
    values: Iterable[str] = getall("anthropic-beta", ()) if getall else (
        [v for k, v in headers.items() if k.lower() == "anthropic-beta"])
    return tuple(b.strip() for value in values for b in value.split(",") if b.strip())


def check_betas(upstream: Upstream, betas: Iterable[str]) -> None:
    """Refuse an `anthropic-beta` the upstream does not allow (betas can switch prices, e.g. 1M context)."""
    for beta in betas:
        if beta not in upstream.allowed_betas:
            raise BadRequest(f"anthropic-beta: '{beta[:80]}' is not enabled on this gateway (it may change the "
                             "price of the request). Ask the operator to add it to allowed_betas.",
                             param="anthropic-beta")


def admit(upstream: Upstream, rates: Rates, drivers: CostDrivers) -> Rates:
    """The request's price sheet: `rates` with its service tier, built-in tool calls and extra prompt
    allowance set; a BadRequest naming the parameter for anything the upstream does not price."""
    if drivers is NONE:
        return rates
    check_betas(upstream, drivers.betas)
    tier = drivers.service_tier
    if tier is not None and tier not in upstream.service_tiers and not (tier == "auto" and upstream.service_tiers):
        listed = ", ".join(sorted(upstream.service_tiers)) or "none"
        raise BadRequest(f"service_tier '{tier[:40]}' is not available on this gateway (priced tiers: {listed}).",
                         param="service_tier")
    extra = 0
    if drivers.stored_prompt is not None:
        if upstream.stored_prompt_tokens is None:
            raise BadRequest(f"'{drivers.stored_prompt}' refers to a prompt held by the provider, which this gateway "
                             "cannot bound; send the whole prompt instead.", param=drivers.stored_prompt)
        extra += upstream.stored_prompt_tokens
    calls: dict[str, int] = {}
    for tool in drivers.tools:
        fee = upstream.tool_fees.get(tool.kind)
        if fee is None:
            raise BadRequest(f"{tool.param}: the built-in tool '{tool.kind}' is charged per call by the provider and "
                             "is not enabled on this gateway.", param=tool.param)
        # a bound the request sets is enforced by the provider; the configured one is the operator's
        requested = [b for b in (tool.max_uses, drivers.max_tool_calls) if b is not None]
        bound = min(requested) if requested else fee.max_calls_per_request
        if bound is None:
            raise BadRequest(f"{tool.param}: the built-in tool '{tool.kind}' needs a bound on its calls "
                             "(max_uses / max_tool_calls).", param=tool.param)
        calls[tool.kind] = calls.get(tool.kind, 0) + bound
        extra += bound * fee.prompt_tokens_per_call
    return replace(rates, service_tier=tier, tool_calls=tuple(sorted(calls.items())), extra_prompt_tokens=extra)

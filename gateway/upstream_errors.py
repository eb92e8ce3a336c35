"""Upstream error answers, relayed without the operator's identity.

A provider's error text names the account the gateway calls with: OpenAI's 429s carry the
organisation id and its tier's limits, Anthropic's the organisation's id, Gemini's the project and
its quota tier. The client keeps the status, the error type and code and the SDK-compatible shape of
its dialect; a rate limit gets a generic message that keeps what is useful (what ran out, when to
retry); other messages (a bad parameter) are kept with identifiers scrubbed out.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gateway.dialects.base import Dialect
from gateway.errors import GatewayError

REDACTED = "[redacted]"
MAX_MESSAGE = 2000  # characters of an upstream message relayed

#: Identifiers of the operator's provider account, keys and request ids, as providers write them.
_IDENTIFYING = re.compile(
    r"\borg-[A-Za-z0-9_-]+"  # OpenAI organisation
    r"|\bproj_[A-Za-z0-9_-]+"  # OpenAI project
    r"|\bsk-[A-Za-z0-9_*.-]{3,}"  # OpenAI / Anthropic keys, also masked ones (sk-abc***)
    r"|\bAIza[0-9A-Za-z_-]{10,}"  # Google API keys
    r"|\breq_[A-Za-z0-9_-]+"  # OpenAI / Anthropic request ids
    r"|\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"  # Anthropic org ids
    r"|[\w.+-]+@[\w-]+(?:\.[\w-]+)+"  # e-mail addresses
)
_PROJECT_NUMBER = re.compile(r"\b(projects?[/ ]|project_number[:=]|consumer[/ :=]+)\d{4,}", re.IGNORECASE)

#: What ran out, in a rate-limit text ("on tokens per min (TPM)", "of 50,000 input tokens per minute").
_PER = re.compile(r"\b((?:input |output )?(?:tokens|requests)) per (min(?:ute)?|hour|day)\b", re.IGNORECASE)
#: When to retry ("Please try again in 1.2s", "in 6m0s", "Please retry in 28.5s").
_RETRY_IN = re.compile(r"\b(?:try again|retry) in ((?:\d+(?:\.\d+)?(?:ms|s|m|h)){1,3})\b", re.IGNORECASE)
_RETRY_DELAY = re.compile(r"^\d+(?:\.\d+)?s$")

_KIND = {400: "invalid_request", 401: "authentication", 403: "permission", 404: "not_found", 413: "too_large",
         429: "rate_limit"}
_GEMINI_DETAILS = ("type.googleapis.com/google.rpc.RetryInfo", "type.googleapis.com/google.rpc.BadRequest",
                   "type.googleapis.com/google.rpc.ErrorInfo")


def scrub(text: str) -> str:
    """The text with provider account identifiers, keys, request ids and e-mail addresses replaced."""
    return _PROJECT_NUMBER.sub(lambda m: m.group(1) + REDACTED, _IDENTIFYING.sub(REDACTED, text))


def rate_limit_message(model: str, text: str, retry_delay: str | None = None, *, quota: bool = False) -> str:
    """A rate-limit message without the upstream account's id, tier or limits: which model, what ran
    out when the provider says so, and when to retry. `quota`: the provider's billing quota is spent
    (OpenAI's `insufficient_quota`), which no retry soon will fix."""
    if quota:
        return f"The upstream provider's quota for {model} is exhausted; try again later."
    per = _PER.search(text)
    retry = _RETRY_IN.search(text)
    when = retry.group(1) if retry else retry_delay
    lead = "Request too large" if text.lower().startswith("request too large") else "Rate limit reached"
    what = f" on {per.group(1).lower()} per {per.group(2).lower()}" if per else ""
    return f"{lead} for {model} upstream{what}; " + (f"try again in {when}." if when else "try again later.")


def relay_body(dialect: Dialect, status: int, data: bytes, model: str, request_id: str) -> bytes:
    """The body to answer an upstream error with: the dialect's error shape with the upstream's
    status, type and code, and a message without identifying text. Plain HTTP tools keep their own
    body shape, scrubbed."""
    if dialect.name == "http":  # a tool's own shape: scrubbed text (the patterns never cross a JSON quote)
        return scrub(data.decode("utf-8", "replace")).encode()
    try:
        obj: Any = json.loads(data)
    except (ValueError, RecursionError):
        obj = None
    error = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(error, dict):  # Mistral's flat shape (for the OpenAI dialect), or no JSON at all
        error = obj if isinstance(obj, dict) and dialect.name == "openai" else {}
    text = error["message"][:MAX_MESSAGE] if isinstance(error.get("message"), str) else ""
    details = [d for d in error.get("details") or [] if isinstance(d, dict) and d.get("@type") in _GEMINI_DETAILS]
    delay = next((d.get("retryDelay") for d in details if isinstance(d.get("retryDelay"), str)
                  and _RETRY_DELAY.match(d["retryDelay"])), None)
    if status == 429:
        message = rate_limit_message(model, text, delay,
                                     quota="insufficient_quota" in (error.get("code"), error.get("type")))
    else:
        message = scrub(text).strip() or f"The upstream provider answered with HTTP {status}."
    fallback = GatewayError(message)
    fallback.status, fallback.kind = status, _KIND.get(status, "upstream")
    body: dict[str, Any] = json.loads(dialect.error_response(fallback)[1])
    own = body["error"]
    if dialect.name == "anthropic":
        own["type"] = _word(error.get("type")) or own["type"]
        body["request_id"] = request_id
    elif dialect.name == "gemini":
        own["status"] = _word(error.get("status")) or own["status"]
        kept = [_gemini_detail(d) for d in details]
        if kept:
            own["details"] = kept
    else:
        for name in ("type", "param", "code"):
            if name in error:
                own[name] = _word(error[name])
    return json.dumps(body).encode()


def _word(value: Any) -> str | int | None:
    """A type, code, param or status value: a short string (scrubbed) or an integer, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and len(value) <= 200:
        return scrub(value)
    return None


def _gemini_detail(detail: dict[str, Any]) -> dict[str, Any]:
    kind = detail["@type"]
    if kind.endswith("RetryInfo"):
        delay = detail.get("retryDelay")
        return {"@type": kind, "retryDelay": delay if isinstance(delay, str) and _RETRY_DELAY.match(delay) else None}
    if kind.endswith("ErrorInfo"):  # the reason only: its metadata names the project
        return {"@type": kind, "reason": _word(detail.get("reason")), "domain": _word(detail.get("domain"))}
    violations = [{"field": _word(v.get("field")), "description": _word(v.get("description"))}
                  for v in detail.get("fieldViolations") or [] if isinstance(v, dict)]
    return {"@type": kind, "fieldViolations": violations}


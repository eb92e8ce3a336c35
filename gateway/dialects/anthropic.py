"""The Anthropic Messages wire dialect: /v1/messages (stream and not), count_tokens, models."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from gateway.config import Upstream
from gateway.dialects.base import (
    ParsedRequest,
    checked_model,
    forward_headers,
    inject_provider_key,
    json_object,
    media_parts,
)
from gateway.dialects.drivers import NONE, CostDrivers, ToolUse, betas_of, check_betas, tool_kind
from gateway.errors import BadRequest, GatewayError, InsufficientCredits
from gateway.money import ceil_div
from gateway.sse import Run, SSEDecoder, TextEstimate, unreported_output
from gateway.usage import Usage

DEFAULT_VERSION = "2023-06-01"
MEDIA_PART_TOKENS = 2_000  # per image or document block: not bounded by the body's bytes
TOOL_SYSTEM_TOKENS = 1_000  # Anthropic's hidden tool-use system prompt (a few hundred tokens)
_TEMPLATE_TOKENS = 16
_MIN_THINKING_BUDGET = 1024
_MEDIA = re.compile(rb'"type"\s*:\s*"(?:image|document)"')
_MEDIA_NAMES = frozenset({"image", "document"})
_DELTA_TEXT = re.compile(r'"(?:text|thinking|partial_json)"\s*+:\s*+"((?:[^"\\]++|\\.)++)"')
#: Where the name of an event carrying usage may be (its `event:` line): only those are decoded.
_USAGE_EVENT = re.compile(rb"message_(?:start|delta)")

_ERROR_TYPES = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "insufficient_credits": "billing_error",
    "permission": "permission_error",
    "not_found": "not_found_error",
    "too_large": "request_too_large",
    "rate_limit": "rate_limit_error",
    "upstream": "api_error",
    "upstream_timeout": "timeout_error",
    "unavailable": "api_error",
    "server_error": "api_error",
}


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def parse_usage(usage: Mapping[str, Any], previous: Usage | None = None) -> Usage:
    """Anthropic usage to the normalised Usage. `input_tokens` excludes cache reads and writes.

    Fields absent from `usage` keep their `previous` value (stream deltas are cumulative snapshots).
    """
    prev = previous or Usage()
    total = _count(usage.get("cache_creation_input_tokens"))  # 5-minute and 1-hour writes together
    split = usage.get("cache_creation")
    short, long_written = prev.cache_write_tokens, prev.cache_write_1h_tokens
    if isinstance(split, dict):
        long_written = _count(split.get("ephemeral_1h_input_tokens")) or 0
        five = _count(split.get("ephemeral_5m_input_tokens"))
        short = max(total - long_written, 0) if total is not None else five if five is not None else short
    elif total is not None:
        # a later snapshot repeats the total without the breakdown: the earlier 1-hour part stands
        short = max(total - (long_written or 0), 0)
    tier = usage.get("service_tier")
    tools = usage.get("server_tool_use")
    return Usage(
        input_tokens=_pick(usage, "input_tokens", prev.input_tokens),
        cached_input_tokens=_pick(usage, "cache_read_input_tokens", prev.cached_input_tokens),
        cache_write_tokens=short,
        cache_write_1h_tokens=long_written,
        output_tokens=_pick(usage, "output_tokens", prev.output_tokens),
        reasoning_tokens=prev.reasoning_tokens,
        service_tier=tier if isinstance(tier, str) else prev.service_tier,
        tool_calls=_server_tool_calls(tools) if isinstance(tools, dict) else prev.tool_calls,
    )


def _server_tool_calls(counts: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    """`server_tool_use: {web_search_requests: 2, web_fetch_requests: 0}` -> (("web_fetch", 0), ("web_search", 2))."""
    return tuple(sorted((name.removesuffix("_requests"), n) for name, value in counts.items()
                        if name.endswith("_requests") and (n := _count(value)) is not None))


def _pick(usage: Mapping[str, Any], name: str, previous: int | None) -> int | None:
    value = _count(usage.get(name))
    return value if value is not None else previous


#: Tool types the client runs itself (tokens only); any other typed tool runs on Anthropic's side.
_CLIENT_TOOLS = ("custom", "bash_", "text_editor_", "computer_", "memory_")


def _drivers(body: dict[str, Any], headers: Mapping[str, str] | None) -> CostDrivers:
    """Service tier, server tools (web search, web fetch, code execution, …) and beta headers."""
    tier = body.get("service_tier")
    if tier is not None and not isinstance(tier, str):
        raise BadRequest("service_tier: Input should be a string", param="service_tier")
    tools: list[ToolUse] = []
    raw_tools = body.get("tools")
    for tool in raw_tools if isinstance(raw_tools, list) else ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind is None or (isinstance(kind, str) and kind.startswith(_CLIENT_TOOLS)):
            continue
        if not isinstance(kind, str):
            raise BadRequest("tools: a tool's type must be a string", param="tools")
        uses = tool.get("max_uses")
        if uses is not None and (isinstance(uses, bool) or not isinstance(uses, int) or uses < 1):
            raise BadRequest("tools: max_uses must be a positive integer", param="tools")
        tools.append(ToolUse(tool_kind(kind), "tools", uses))
    betas = betas_of(headers)
    if tier is None and not tools and not betas:
        return NONE
    return CostDrivers(tier, tuple(tools), None, None, betas)


class MessagesStreamMeter:
    """Meters a Messages stream: input from `message_start`, cumulative totals from `message_delta`.
    The stream is forwarded untouched (event lines included); per chunk, only those two events
    are decoded (see gateway.sse)."""

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self._usage: Usage | None = None
        self._output_seen = False
        self._text = TextEstimate(_DELTA_TEXT)

    @property
    def usage(self) -> Usage | None:
        if self._usage is None or self._output_seen:
            return self._usage
        # message_start's output count is a placeholder: without a message_delta, output is unknown
        return replace(self._usage, output_tokens=None, reasoning_tokens=None)

    def estimated_output_tokens(self) -> int:
        return unreported_output(self.usage, self._text)

    def feed(self, chunk: bytes) -> bytes:
        run = self._decoder.feed_run(chunk)
        if run:
            self._text.add(run)
            marks = [m.start() for m in _USAGE_EVENT.finditer(run)]
            for _start, _end, event in Run(run, self._decoder.eol).events_at(marks) if marks else ():
                if event.event in ("message_start", "message_delta"):
                    self._observe(event.event, event.data)
        return chunk

    def finish(self) -> bytes:
        self._decoder.flush()
        return b""

    def _observe(self, name: str, data: str) -> None:
        try:
            obj = json.loads(data)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        usage = (obj.get("message") or {}).get("usage") if name == "message_start" else obj.get("usage")
        if isinstance(usage, dict):
            self._usage = parse_usage(usage, self._usage)
            if name == "message_delta":
                self._output_seen = True


class AnthropicDialect:
    name = "anthropic"
    json_body = True

    def client_key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        if "x-api-key" in headers:
            return headers["x-api-key"]
        auth = headers.get("Authorization")
        if auth is None:
            return None
        scheme, _, token = auth.strip().partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""

    def upstream_path(self, path: str) -> str:
        return path  # base URLs are origins; the path keeps its /v1

    def parse_request(self, endpoint: str, raw: bytes, max_choices: int, path_model: str | None = None,
                      headers: Mapping[str, str] | None = None) -> ParsedRequest:
        body = json_object(raw)
        if not isinstance(body.get("model"), str) or not body["model"].strip():
            raise BadRequest("model: Field required", param="model")
        model = checked_model(body["model"])
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: Field required (a non-empty list)", param="messages")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise BadRequest("stream: Input should be a valid boolean", param="stream")
        cap: int | None = None
        if endpoint == "messages":
            cap = body.get("max_tokens")
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
                raise BadRequest("max_tokens: Field required (an integer of at least 1)", param="max_tokens")
        media = media_parts(raw, _MEDIA, body, _MEDIA_NAMES, type_only=True)
        tools = TOOL_SYSTEM_TOKENS if body.get("tools") else 0
        return ParsedRequest(
            endpoint=endpoint, model=model, stream=bool(stream), body=body,
            cap_field="max_tokens" if cap is not None else None, output_cap=cap, choices=1,
            prompt_tokens_bound=len(raw) + _TEMPLATE_TOKENS + media * MEDIA_PART_TOKENS + tools,
            prompt_tokens_estimate=ceil_div(len(raw), 4) + media * MEDIA_PART_TOKENS + tools,
            drivers=_drivers(body, headers),
        )

    def upstream_body(
        self, req: ParsedRequest, upstream: Upstream, lowered_cap: int | None
    ) -> tuple[bytes | None, bool]:
        if lowered_cap is None:
            return None, False
        body = dict(req.body)
        body["max_tokens"] = lowered_cap
        thinking = body.get("thinking")
        budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
        if isinstance(budget, int) and lowered_cap <= budget:  # the budget must stay below max_tokens
            if lowered_cap - 1 < _MIN_THINKING_BUDGET:
                raise InsufficientCredits("Insufficient credits for the minimum extended-thinking budget.")
            body["thinking"] = {**(thinking or {}), "budget_tokens": lowered_cap - 1}
        return json.dumps(body, ensure_ascii=True, separators=(",", ":")).encode(), False

    def upstream_headers(self, upstream: Upstream, incoming: Mapping[str, str]) -> dict[str, str]:
        check_betas(upstream, betas_of(incoming))  # also when the request was parsed without its headers
        headers = forward_headers(incoming)
        if not any(name.lower() == "anthropic-version" for name in headers):
            headers["anthropic-version"] = DEFAULT_VERSION
        return inject_provider_key(headers, upstream)

    def usage_from_body(self, endpoint: str, body: bytes) -> Usage | None:
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None
        usage = obj.get("usage") if isinstance(obj, dict) else None
        return parse_usage(usage) if isinstance(usage, dict) else None

    def stream_meter(self, endpoint: str, hide_usage: bool) -> MessagesStreamMeter:
        return MessagesStreamMeter()

    def error_response(self, error: GatewayError) -> tuple[int, bytes]:
        payload = {"type": "error", "error": {"type": _ERROR_TYPES.get(error.kind, "api_error"),
                                              "message": error.message, **error.details()}}
        return error.status, json.dumps(payload).encode()

    def stream_error_event(self, message: str) -> bytes:
        payload = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"


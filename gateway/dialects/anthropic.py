"""The Anthropic Messages wire dialect: /v1/messages (stream and not), count_tokens, models."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from gateway.config import Upstream
from gateway.dialects.base import ParsedRequest, forward_headers, inject_provider_key, json_object
from gateway.errors import BadRequest, GatewayError, InsufficientCredits
from gateway.money import ceil_div
from gateway.sse import SSEDecoder
from gateway.usage import Usage

DEFAULT_VERSION = "2023-06-01"
MEDIA_PART_TOKENS = 2_000  # per image or document block: not bounded by the body's bytes
TOOL_SYSTEM_TOKENS = 1_000  # Anthropic's hidden tool-use system prompt (a few hundred tokens)
_TEMPLATE_TOKENS = 16
_MIN_THINKING_BUDGET = 1024
_MEDIA = re.compile(rb'"type"\s*:\s*"(?:image|document)"')
_DELTA_TEXT = re.compile(r'"(?:text|thinking|partial_json)"\s*:\s*"((?:[^"\\]|\\.)+)"')

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
    written = _count(usage.get("cache_creation_input_tokens"))
    split = usage.get("cache_creation")
    long_written: int | None = prev.cache_write_1h_tokens
    if isinstance(split, dict) and written is not None:
        long_written = _count(split.get("ephemeral_1h_input_tokens")) or 0
        written = max(written - long_written, 0)
    return Usage(
        input_tokens=_pick(usage, "input_tokens", prev.input_tokens),
        cached_input_tokens=_pick(usage, "cache_read_input_tokens", prev.cached_input_tokens),
        cache_write_tokens=written if written is not None else prev.cache_write_tokens,
        cache_write_1h_tokens=long_written,
        output_tokens=_pick(usage, "output_tokens", prev.output_tokens),
        reasoning_tokens=prev.reasoning_tokens,
    )


def _pick(usage: Mapping[str, Any], name: str, previous: int | None) -> int | None:
    value = _count(usage.get(name))
    return value if value is not None else previous


class MessagesStreamMeter:
    """Meters a Messages stream: input from `message_start`, cumulative totals from `message_delta`.
    The stream is forwarded untouched (event lines included)."""

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self._usage: Usage | None = None
        self._output_seen = False
        self._estimate = 0

    @property
    def usage(self) -> Usage | None:
        if self._usage is None or self._output_seen:
            return self._usage
        # message_start's output count is a placeholder: without a message_delta, output is unknown
        u = self._usage
        return Usage(u.input_tokens, u.cached_input_tokens, u.cache_write_tokens, None, None,
                     u.cache_write_1h_tokens)

    def estimated_output_tokens(self) -> int:
        return self._estimate

    def feed(self, chunk: bytes) -> bytes:
        for event in self._decoder.feed(chunk):
            if event.event == "content_block_delta":
                texts = _DELTA_TEXT.findall(event.data)
                if texts:
                    self._estimate += max(1, ceil_div(sum(len(t) for t in texts), 4))
            elif event.event in ("message_start", "message_delta"):
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

    def parse_request(self, endpoint: str, raw: bytes, max_choices: int, path_model: str | None = None
                      ) -> ParsedRequest:
        body = json_object(raw)
        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            raise BadRequest("model: Field required", param="model")
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
        media = len(_MEDIA.findall(raw))
        tools = TOOL_SYSTEM_TOKENS if body.get("tools") else 0
        return ParsedRequest(
            endpoint=endpoint, model=model, stream=bool(stream), body=body,
            cap_field="max_tokens" if cap is not None else None, output_cap=cap, choices=1,
            prompt_tokens_bound=len(raw) + _TEMPLATE_TOKENS + media * MEDIA_PART_TOKENS + tools,
            prompt_tokens_estimate=ceil_div(len(raw), 4) + media * MEDIA_PART_TOKENS + tools,
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
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(), False

    def upstream_headers(self, upstream: Upstream, incoming: Mapping[str, str]) -> dict[str, str]:
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
                                              "message": error.message}}
        return error.status, json.dumps(payload).encode()

    def stream_error_event(self, message: str) -> bytes:
        payload = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"


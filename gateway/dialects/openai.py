"""The OpenAI wire dialect (and OpenAI-compatible upstreams): chat completions, completions,
embeddings and the Responses API."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.config import Upstream
from gateway.dialects.base import (
    ParsedRequest,
    checked_model,
    forward_headers,
    inject_provider_key,
    json_object,
    media_parts,
    splice_field,
    top_level_fields,
)
from gateway.dialects.drivers import NONE, CostDrivers, ToolUse, tool_kind
from gateway.errors import BadRequest, GatewayError
from gateway.money import ceil_div
from gateway.sse import Run, SSEDecoder, SSEEvent, TextEstimate, unreported_output
from gateway.usage import Usage

#: Tokens reserved per image or audio part: their tokens cannot be bounded from the body's bytes.
#: The overdraft this allows is bounded by (actual media tokens - allowance) x input rate.
MEDIA_PART_TOKENS = 2_000
_MEDIA = re.compile(rb'"(?:image_url|input_audio|input_image|file)"')
_MEDIA_NAMES = frozenset({"image_url", "input_audio", "input_image", "file"})


def _refuse_unpriced_output(endpoint: str, body: dict[str, Any]) -> None:
    """Output the gateway cannot price or bound: audio output (billed at audio rates), and Responses
    run in the background (the answer comes later, its usage never through this request)."""
    modalities = body.get("modalities")
    if body.get("audio") is not None or (isinstance(modalities, list) and "audio" in modalities):
        raise BadRequest("Audio output is not available through this gateway.", param="modalities")
    if endpoint == "responses" and body.get("background"):
        raise BadRequest("Background responses are not available through this gateway: stream the response "
                         "or wait for it.", param="background")
_TEMPLATE_TOKENS = 16  # reply primer and role markers beyond what the JSON bytes already cover


@dataclass(frozen=True, slots=True)
class _Endpoint:
    input_field: str  # the field holding the prompt (required)
    cap_fields: tuple[str, ...]  # output-cap fields, in order of preference
    default_cap: int | None  # the cap when none is given (None: the model's ceiling)
    multi_choice: bool  # `n` (and `best_of`) multiply the output
    stream_usage: bool  # usage in a stream only with stream_options.include_usage


_ENDPOINTS = {
    "chat": _Endpoint("messages", ("max_completion_tokens", "max_tokens"), None, True, True),
    "completions": _Endpoint("prompt", ("max_tokens",), 16, True, True),
    "responses": _Endpoint("input", ("max_output_tokens",), None, False, False),
    "embeddings": _Endpoint("input", (), 0, False, False),
}
_TERMINAL = ("response.completed", "response.incomplete", "response.failed")

_ERROR_TYPES: dict[str, tuple[str, str | None]] = {
    "invalid_request": ("invalid_request_error", None),
    "authentication": ("invalid_request_error", "invalid_api_key"),
    "insufficient_credits": ("insufficient_quota", "insufficient_credits"),
    "permission": ("invalid_request_error", "model_not_allowed"),
    "not_found": ("invalid_request_error", "model_not_found"),
    "too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit": ("requests", "rate_limit_exceeded"),
    "upstream": ("server_error", "upstream_error"),
    "upstream_timeout": ("server_error", "upstream_timeout"),
    "unavailable": ("server_error", "service_unavailable"),
    "server_error": ("server_error", None),
}


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


#: Request tool types that are plain function calling (their tokens are in usage, no fee).
_ORDINARY_TOOLS = frozenset({"function", "custom", "local_shell", "shell", "apply_patch", "computer_use_preview"})
#: Responses output items of built-in tools, counted for settlement (absent: zero calls).
_TOOL_ITEMS = {"web_search_call": "web_search", "file_search_call": "file_search",
               "code_interpreter_call": "code_interpreter", "image_generation_call": "image_generation"}


def _tool_calls(output: Any) -> tuple[tuple[str, int], ...] | None:
    """Built-in tool calls in a Responses `output` list (None when there is no such list)."""
    if not isinstance(output, list):
        return None
    counts = dict.fromkeys(_TOOL_ITEMS.values(), 0)
    for item in output:
        kind = _TOOL_ITEMS.get(str(item.get("type"))) if isinstance(item, dict) else None
        if kind is not None:
            counts[kind] += 1
    return tuple(sorted(counts.items()))


def usage_of(obj: Mapping[str, Any], embeddings: bool = False) -> Usage | None:
    """Usage of a whole response object (chat, completion, response or embeddings list), with the
    service tier it echoes and, for the Responses API, the built-in tool calls in its output."""
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    parsed = parse_usage(usage)
    tier = obj.get("service_tier")
    return Usage(parsed.input_tokens, parsed.cached_input_tokens, parsed.cache_write_tokens,
                 0 if embeddings and parsed.output_tokens is None else parsed.output_tokens,
                 parsed.reasoning_tokens, None, tier if isinstance(tier, str) else None,
                 _tool_calls(obj.get("output")))


def parse_usage(usage: Mapping[str, Any]) -> Usage:
    """OpenAI usage (chat/completions or responses naming) to the normalised Usage.

    `prompt_tokens` includes cached and cache-write tokens; `completion_tokens` includes reasoning.
    """
    prompt = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    written = _count(details.get("cache_write_tokens")) if isinstance(details, dict) else None
    output = _count(usage.get("completion_tokens", usage.get("output_tokens")))
    out_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
    reasoning = _count(out_details.get("reasoning_tokens")) if isinstance(out_details, dict) else None
    uncached = None if prompt is None else max(prompt - (cached or 0) - (written or 0), 0)
    return Usage(uncached, cached, written, output, reasoning)


def _prompt_count(prompt: Any) -> int:
    """Completions prompts: a string or one token array is one prompt; an array of strings or of
    token arrays is one prompt per item."""
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
        return len(prompt)
    return 1


def _drivers(endpoint: str, body: dict[str, Any]) -> CostDrivers:
    """Service tier, built-in tools and provider-held prompts of a chat or Responses request."""
    tier = body.get("service_tier")
    if tier is not None and not isinstance(tier, str):
        raise BadRequest("Invalid 'service_tier': expected a string.", param="service_tier")
    tools: list[ToolUse] = []
    raw_tools = body.get("tools")
    for tool in raw_tools if isinstance(raw_tools, list) else ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        if not isinstance(kind, str):
            raise BadRequest("Invalid 'tools': every tool needs a string 'type'.", param="tools")
        if kind not in _ORDINARY_TOOLS:
            tools.append(ToolUse(tool_kind(kind), "tools"))
    if body.get("web_search_options") is not None:
        tools.append(ToolUse("web_search", "web_search_options"))
    # Responses: a prior response, a conversation or a stored prompt template adds unseen prompt tokens
    stored = next((name for name in ("previous_response_id", "conversation", "prompt")
                   if body.get(name) is not None), None) if endpoint == "responses" else None
    max_calls = _int_field(body, "max_tool_calls", 0)
    if tier is None and not tools and stored is None:
        return NONE
    return CostDrivers(tier, tuple(tools), max_calls, stored)


def _int_field(body: dict[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadRequest(f"Invalid '{name}': expected an integer of at least {minimum}, got {value!r}.",
                         param=name)
    return value


class ChatStreamMeter:
    """Meters a chat-completions SSE stream; can hide the usage-only chunk the gateway asked for.

    Works on whole runs of events (see gateway.sse): one search for a usage object and one for
    delta text per chunk; only an event that may carry usage is decoded and parsed."""

    def __init__(self, hide_usage: bool) -> None:
        self._decoder = SSEDecoder()
        self._hide = hide_usage
        self._usage: Usage | None = None
        self._text = TextEstimate(_DELTA_TEXT)

    @property
    def usage(self) -> Usage | None:
        return self._usage

    def estimated_output_tokens(self) -> int:
        return unreported_output(self.usage, self._text)

    def feed(self, chunk: bytes) -> bytes:
        run = self._decoder.feed_run(chunk)
        if not run:
            return b"" if self._hide else chunk
        self._text.add(run)
        # every "usage" key followed by :null (the chunks before the last): nothing to parse
        if run.count(b'"usage"') == run.count(b'"usage":null'):
            return run if self._hide else chunk
        hidden = [(start, end) for start, end, event in Run(run, self._decoder.eol).events_at(
            [m.start() for m in _USAGE_KEY.finditer(run)]) if self._observe(event)]
        if not self._hide:
            return chunk
        if not hidden:
            return run
        kept, at = [], 0
        for start, end in hidden:
            kept.append(run[at:start])
            at = end
        kept.append(run[at:])
        return b"".join(kept)

    def finish(self) -> bytes:
        rest = self._decoder.flush()
        return rest if self._hide else b""

    def _observe(self, event: SSEEvent) -> bool:
        """Record the usage of an event that may carry it; True if it is a usage-only chunk."""
        data = event.data
        if _USAGE_OBJECT.search(data):
            try:
                obj = json.loads(data)
            except ValueError:
                return False
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                self._usage = usage_of(obj)
                return obj.get("choices") == []
        return False


class ResponsesStreamMeter:
    """Meters a Responses API stream: usage sits only on the terminal event's `response.usage`."""

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self._usage: Usage | None = None
        self._text = TextEstimate(_RESPONSES_DELTA)

    @property
    def usage(self) -> Usage | None:
        return self._usage

    def estimated_output_tokens(self) -> int:
        return unreported_output(self.usage, self._text)

    def feed(self, chunk: bytes) -> bytes:
        run = self._decoder.feed_run(chunk)
        if not run:
            return chunk
        self._text.add(run)
        marks = [m.start() for m in _TERMINAL_NAME.finditer(run)]
        for _start, _end, event in Run(run, self._decoder.eol).events_at(marks) if marks else ():
            if event.event in _TERMINAL:
                try:
                    obj = json.loads(event.data)
                except ValueError:
                    continue
                response = obj.get("response") if isinstance(obj, dict) else None
                if isinstance(response, dict):
                    self._usage = usage_of(response)
        return chunk

    def finish(self) -> bytes:
        self._decoder.flush()
        return b""


_RESPONSES_DELTA = re.compile(r'"delta"\s*+:\s*+"((?:[^"\\]++|\\.)++)"')
#: Where a terminal event's name may be (its `event:` line): only those events are decoded.
_TERMINAL_NAME = re.compile(rb"response\.(?:completed|incomplete|failed)")
#: A chunk that carries usage (`"usage":null` in the other chunks does not match).
_USAGE_OBJECT = re.compile(r'"usage"\s*:\s*\{')
#: Where _USAGE_OBJECT may match in an event's data, searched in the raw bytes: every "usage" key
#: except one followed on its line by `: null` (data lines are substrings of the raw lines, and
#: ASCII text decodes to itself, so no match of _USAGE_OBJECT is missed).
_USAGE_KEY = re.compile(rb'"usage"(?![ \t]*:[ \t]*null)')
#: The generated text of a streamed delta: content, reasoning, refusal and tool-call arguments
#: (possessive: no backtracking over a long or unterminated string).
_DELTA_TEXT = re.compile(r'"(?:content|reasoning_content|refusal|arguments|text)"\s*+:\s*+"((?:[^"\\]++|\\.)++)"')


class OpenAIDialect:
    name = "openai"
    json_body = True

    def client_key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        auth = headers.get("Authorization")
        if auth is None:
            return None
        scheme, _, token = auth.strip().partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""

    def upstream_path(self, path: str) -> str:
        """OpenAI-style base URLs end in /v1; SDKs pointed at a base without /v1 send bare paths."""
        return path[len("/v1"):] if path.startswith("/v1/") else path

    def parse_request(self, endpoint: str, raw: bytes, max_choices: int, path_model: str | None = None,
                      headers: Mapping[str, str] | None = None) -> ParsedRequest:
        spec = _ENDPOINTS[endpoint]
        body = json_object(raw)
        if not isinstance(body.get("model"), str) or not body["model"].strip():
            raise BadRequest("You must provide a model parameter.", param="model")
        model = checked_model(body["model"])
        prompt = body.get(spec.input_field)
        if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt):
            kind = "a non-empty array" if endpoint == "chat" else "a non-empty string or array"
            raise BadRequest(f"'{spec.input_field}' must be {kind}.", param=spec.input_field)
        if endpoint == "chat" and not isinstance(prompt, list):
            raise BadRequest("'messages' must be a non-empty array.", param="messages")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise BadRequest("'stream' must be a boolean.", param="stream")
        if endpoint == "embeddings" and stream:
            raise BadRequest("Embeddings cannot be streamed.", param="stream")
        if body.get("stream_options") is not None and not stream:
            raise BadRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                             param="stream_options")
        choices = 1
        if spec.multi_choice:
            # a completions prompt array is one completion per prompt, each with n (best_of) choices
            prompts = _prompt_count(prompt) if endpoint == "completions" else 1
            choices = prompts * max(_int_field(body, "n", 1) or 1, _int_field(body, "best_of", 1) or 1)
            if choices > max_choices:
                raise BadRequest(f"Invalid '{'prompt' if prompts > 1 else 'n'}': this gateway allows at most "
                                 f"{max_choices} choice(s) per request ({prompts} prompt(s) x n/best_of).",
                                 param="prompt" if prompts > 1 else "n")
        cap_field, cap = None, spec.default_cap
        for name in spec.cap_fields:
            value = _int_field(body, name, 1)
            if value is not None:
                cap_field, cap = name, value
                break
        if endpoint == "chat" and "max_completion_tokens" in body and "max_tokens" in body:
            raise BadRequest("Set only one of 'max_completion_tokens' and 'max_tokens'.", param="max_tokens")
        _refuse_unpriced_output(endpoint, body)
        media = media_parts(raw, _MEDIA, body, _MEDIA_NAMES)
        return ParsedRequest(
            endpoint=endpoint,
            model=model,
            stream=bool(stream),
            body=body,
            cap_field=cap_field,
            output_cap=cap,
            choices=choices,
            prompt_tokens_bound=len(raw) + _TEMPLATE_TOKENS + media * MEDIA_PART_TOKENS,
            prompt_tokens_estimate=ceil_div(len(raw), 4) + media * MEDIA_PART_TOKENS,
            drivers=_drivers(endpoint, body),
            raw=raw,
        )

    def upstream_body(
        self, req: ParsedRequest, upstream: Upstream, lowered_cap: int | None
    ) -> tuple[bytes | None, bool]:
        body, changed, hide_usage = req.body, False, False
        spec = _ENDPOINTS[req.endpoint]
        if (req.raw and lowered_cap is None and req.stream and spec.stream_usage
                and upstream.stream_usage == "inject" and "stream_options" not in body
                and not (req.cap_field == "max_completion_tokens" and upstream.output_cap_field == "max_tokens")):
            # the one change is asking for usage: splice it into the client's bytes instead of dumping
            # the whole body again (the upstream then gets exactly the bytes that were priced, plus it)
            spliced = splice_field(req.raw, b'"stream_options":{"include_usage":true}')
            if spliced is not None:
                return spliced, True
        if lowered_cap is not None:
            body = dict(body)
            default_field = upstream.output_cap_field if req.endpoint == "chat" else spec.cap_fields[0]
            body[req.cap_field or default_field] = lowered_cap
            changed = True
        if req.cap_field == "max_completion_tokens" and upstream.output_cap_field == "max_tokens":
            # an upstream that only knows max_tokens would ignore the cap the hold was sized for
            body = dict(body) if not changed else body
            body["max_tokens"] = body.pop("max_completion_tokens")
            changed = True
        if req.stream and spec.stream_usage and upstream.stream_usage == "inject":
            options = body.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            if options.get("include_usage") is not True:
                options["include_usage"] = True
                body = dict(body) if not changed else body
                body["stream_options"] = options
                changed, hide_usage = True, True
        if not changed:
            return None, False
        return json.dumps(body, ensure_ascii=True, separators=(",", ":")).encode(), hide_usage

    def upstream_headers(self, upstream: Upstream, incoming: Mapping[str, str]) -> dict[str, str]:
        return inject_provider_key(forward_headers(incoming), upstream)

    def usage_from_body(self, endpoint: str, body: bytes) -> Usage | None:
        if endpoint != "responses":  # the Responses API's usage needs its output list (tool calls) too
            found = top_level_fields(body, (b"usage", b"service_tier"))
            if found is not None:
                return usage_of(found, embeddings=endpoint == "embeddings")
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None
        return usage_of(obj, embeddings=endpoint == "embeddings") if isinstance(obj, dict) else None

    def stream_meter(self, endpoint: str, hide_usage: bool) -> ChatStreamMeter | ResponsesStreamMeter:
        return ResponsesStreamMeter() if endpoint == "responses" else ChatStreamMeter(hide_usage)

    def error_response(self, error: GatewayError) -> tuple[int, bytes]:
        etype, code = _ERROR_TYPES.get(error.kind, ("server_error", None))
        payload = {"error": {"message": error.message, "type": etype, "param": error.param, "code": error.code or code,
                             **error.details()}}
        return error.status, json.dumps(payload).encode()

    def stream_error_event(self, message: str) -> bytes:
        payload = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

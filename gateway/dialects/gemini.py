"""The Gemini (Generative Language API) wire dialect: generateContent, streamGenerateContent
(`alt=sse`), countTokens, embedContent, batchEmbedContents, on both /v1 and /v1beta."""

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
from gateway.dialects.drivers import NONE, CostDrivers, ToolUse
from gateway.errors import BadRequest, GatewayError
from gateway.money import ceil_div
from gateway.sse import Run, SSEDecoder, TextEstimate, parse_events, unreported_output
from gateway.usage import Usage

MEDIA_PART_TOKENS = 2_000  # per inline or file part (image, audio, video, document)
_TEMPLATE_TOKENS = 16
_MEDIA = re.compile(rb'"(?:inlineData|inline_data|fileData|file_data)"')
_MEDIA_NAMES = frozenset({"inlineData", "inline_data", "fileData", "file_data"})
#: Each generation-config spelling, with the names of the other one it must not be mixed with.
_SPELLINGS = (("generationConfig", "maxOutputTokens", "candidateCount", ("max_output_tokens", "candidate_count")),
              ("generation_config", "max_output_tokens", "candidate_count", ("maxOutputTokens", "candidateCount")))
_TEXT = re.compile(r'"text"\s*+:\s*+"((?:[^"\\]++|\\.)++)"')
GENERATE = ("generateContent", "streamGenerateContent")
EMBED = ("embedContent", "batchEmbedContents")
METHODS = (*GENERATE, *EMBED, "countTokens")
_PATH = re.compile(r"/(v1|v1beta)/models/([^/]+):([A-Za-z]+)")
#: Tool entries that are plain function calling; every other key is a Google-run tool (search, code…)
_FUNCTION_TOOLS = frozenset({"functionDeclarations", "function_declarations"})
_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")

_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 402: "RESOURCE_EXHAUSTED", 403: "PERMISSION_DENIED",
           404: "NOT_FOUND", 413: "INVALID_ARGUMENT", 415: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
           500: "INTERNAL", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def parse_usage(meta: Mapping[str, Any], final: bool = True) -> Usage:
    """usageMetadata to the normalised Usage: the prompt count includes cached tokens; thinking
    tokens are outside `candidatesTokenCount` and billed as output. When `final` is False and no
    output count is present yet, output is unknown (None)."""
    prompt = _count(meta.get("promptTokenCount"))
    cached = _count(meta.get("cachedContentTokenCount")) or 0
    tool = _count(meta.get("toolUsePromptTokenCount")) or 0
    candidates = _count(meta.get("candidatesTokenCount"))
    thoughts = _count(meta.get("thoughtsTokenCount"))
    output: int | None = (candidates or 0) + (thoughts or 0)
    if not final and candidates is None and thoughts is None:
        output = None
    return Usage(
        input_tokens=None if prompt is None else max(prompt - cached, 0) + tool,
        cached_input_tokens=cached if prompt is not None else None,
        output_tokens=output,
        reasoning_tokens=thoughts,
    )


class GenerateStreamMeter:
    """Meters `streamGenerateContent?alt=sse`: every chunk carries a cumulative usage snapshot; the
    last one counts. Bytes are forwarded untouched.

    Per chunk (see gateway.sse), only the last event with a snapshot and the events naming a
    finishReason are parsed, unless an escape could spell those keys (then every event is)."""

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self._meta: dict[str, Any] | None = None
        self._finished = False
        self._text = TextEstimate(_TEXT)

    @property
    def usage(self) -> Usage | None:
        return None if self._meta is None else parse_usage(self._meta, final=self._finished)

    def estimated_output_tokens(self) -> int:
        return unreported_output(self.usage, self._text)

    def feed(self, chunk: bytes) -> bytes:
        run = self._decoder.feed_run(chunk)
        if not run:
            return chunk
        self._text.add(run)
        eol = self._decoder.eol
        # one event (a chunk per event: every one has a snapshot to read), or a key could be escaped
        if (eol and run.count(eol + eol) == 1) or _ESCAPED_LETTER.search(run):
            for event in parse_events(run, eol):
                obj = _object(event.data)
                if obj is not None:
                    self._snapshot(obj)
                    self._finish(obj)
            return chunk
        events = Run(run, eol)
        parsed: dict[int, dict[str, Any] | None] = {}
        at = run.rfind(_META_KEY)
        while at >= 0:  # the last snapshot wins: read back to the last event that has one
            start, _end, found = events.event_at(at)
            obj = parsed[start] = _object(found.data) if found is not None else None
            if obj is not None and self._snapshot(obj):
                break
            at = run.rfind(_META_KEY, 0, start)
        if not self._finished:
            for start, _end, event in events.events_at([m.start() for m in _FINISH_KEY.finditer(run)]):
                obj = parsed[start] if start in parsed else _object(event.data)
                if obj is not None and self._finish(obj):
                    break
        return chunk

    def finish(self) -> bytes:
        self._decoder.flush()
        return b""

    def _snapshot(self, obj: dict[str, Any]) -> bool:
        meta = obj.get("usageMetadata")
        if isinstance(meta, dict):
            self._meta = meta
            return True
        return False

    def _finish(self, obj: dict[str, Any]) -> bool:
        candidates = obj.get("candidates")
        if isinstance(candidates, list) and any(isinstance(c, dict) and c.get("finishReason") for c in candidates):
            self._finished = True
        return self._finished


def _object(data: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


_META_KEY = b'"usageMetadata"'
_FINISH_KEY = re.compile(rb'"finishReason"')
#: A `\u00XX` escape of an ASCII letter could spell a key the byte searches above would miss (text
#: escapes such as `\u003c` for `<` do not match).
_ESCAPED_LETTER = re.compile(rb"\\u00[4-7]")


def _check_inner_models(requests: list[Any], path_model: str) -> None:
    """batchEmbedContents items name their model too: it must be the one in the path (priced)."""
    for i, item in enumerate(requests):
        inner = item.get("model") if isinstance(item, dict) else None
        if inner is not None and inner not in (path_model, f"models/{path_model}"):
            raise BadRequest(f"* BatchEmbedContentsRequest.requests[{i}].model: must be models/{path_model}, the "
                             "model in the URL.", param="model")


def _drivers(body: dict[str, Any]) -> CostDrivers:
    """Google-run tools (Search grounding, code execution, URL context, …) and cached contents."""
    tools: list[ToolUse] = []
    raw_tools = body.get("tools")
    for tool in raw_tools if isinstance(raw_tools, list) else ():
        if not isinstance(tool, dict):
            raise BadRequest("Invalid value at 'tools': expected objects.", param="tools")
        for key in tool:
            if key not in _FUNCTION_TOOLS:
                kind = _SNAKE.sub("_", key).lower()
                tools.append(ToolUse("google_search" if kind.startswith("google_search") else kind, "tools"))
    stored = next((name for name in ("cachedContent", "cached_content") if body.get(name) is not None), None)
    if not tools and stored is None:
        return NONE
    return CostDrivers(None, tuple(tools), None, stored)


def _generation_cap(body: dict[str, Any]) -> tuple[str | None, str | None, int | None, int]:
    """(config key, cap key, cap, candidate count) in whichever spelling the client used. Both
    spellings in one body are refused: the API reads one of them, and it must be the one priced."""
    if "generationConfig" in body and "generation_config" in body:
        raise BadRequest("Send 'generationConfig' or 'generation_config', not both.", param="generationConfig")
    for config_key, cap_key, count_key, other in _SPELLINGS:
        config = body.get(config_key)
        if isinstance(config, dict):
            mixed = [name for name in other if name in config]
            if mixed:
                raise BadRequest(f"'{config_key}.{mixed[0]}' mixes spellings: use '{cap_key}' and '{count_key}'.",
                                 param=mixed[0])
            modalities = config.get("responseModalities", config.get("response_modalities"))
            if isinstance(modalities, list) and any(str(m).upper() != "TEXT" for m in modalities):
                raise BadRequest("Only text output is available through this gateway.", param="responseModalities")
            cap, count = config.get(cap_key), config.get(count_key, 1)
            for name, value in ((cap_key, cap), (count_key, count)):
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    raise BadRequest(f"Invalid value at '{config_key}.{name}': expected a positive integer.",
                                     param=name)
            return config_key, cap_key, cap, count or 1
    return None, None, None, 1


class GeminiDialect:
    name = "gemini"
    json_body = True

    def client_key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        return headers.get("x-goog-api-key") or query.get("key")

    def upstream_path(self, path: str) -> str:
        """Rebuilt from validated parts (version, model, method), never the raw path: an encoded
        `/` or `..` in the model would otherwise be normalised into another model's path."""
        match = _PATH.fullmatch(path)
        if match is None or match[3] not in METHODS:
            raise BadRequest("Expected a path of the form /{version}/models/{model}:{method}.")
        version, model, method = match.groups()
        return f"/{version}/models/{checked_model(model, in_path=True)}:{method}"

    def parse_request(self, endpoint: str, raw: bytes, max_choices: int, path_model: str | None = None,
                      headers: Mapping[str, str] | None = None) -> ParsedRequest:
        if not path_model:
            raise BadRequest("The model is missing from the URL (…/models/{model}:{method}).")
        path_model = checked_model(path_model, in_path=True)
        body = json_object(raw)
        config_key, cap_key, cap, count = (None, None, None, 1)
        if endpoint in GENERATE:
            contents = body.get("contents")
            if not isinstance(contents, list) or not contents:
                raise BadRequest("* GenerateContentRequest.contents: contents is not specified", param="contents")
            config_key, cap_key, cap, count = _generation_cap(body)
            if count > max_choices:
                raise BadRequest(f"candidateCount above {max_choices} is not allowed by this gateway.",
                                 param="candidateCount")
        elif endpoint == "embedContent" and not isinstance(body.get("content"), dict):
            raise BadRequest("* EmbedContentRequest.content: content is not specified", param="content")
        elif endpoint == "batchEmbedContents":
            if not isinstance(body.get("requests"), list):
                raise BadRequest("* BatchEmbedContentsRequest.requests: requests is not specified", param="requests")
            _check_inner_models(body["requests"], path_model)
        media = media_parts(raw, _MEDIA, body, _MEDIA_NAMES)
        return ParsedRequest(
            endpoint=endpoint, model=path_model, stream=endpoint == "streamGenerateContent", body=body,
            cap_field=f"{config_key}.{cap_key}" if cap is not None else None,
            output_cap=0 if endpoint in EMBED else cap, choices=count,
            prompt_tokens_bound=len(raw) + _TEMPLATE_TOKENS + media * MEDIA_PART_TOKENS,
            prompt_tokens_estimate=ceil_div(len(raw), 4) + media * MEDIA_PART_TOKENS,
            drivers=_drivers(body) if endpoint in GENERATE else NONE,
        )

    def upstream_body(
        self, req: ParsedRequest, upstream: Upstream, lowered_cap: int | None
    ) -> tuple[bytes | None, bool]:
        if lowered_cap is None:
            return None, False
        config_key, cap_key = (req.cap_field or "generationConfig.maxOutputTokens").split(".")
        body = dict(req.body)
        body[config_key] = {**(body.get(config_key) or {}), cap_key: lowered_cap}
        return json.dumps(body, ensure_ascii=True, separators=(",", ":")).encode(), False

    def upstream_headers(self, upstream: Upstream, incoming: Mapping[str, str]) -> dict[str, str]:
        return inject_provider_key(forward_headers(incoming), upstream)

    def usage_from_body(self, endpoint: str, body: bytes) -> Usage | None:
        """Usage of a whole answer: one GenerateContentResponse, or (streamGenerateContent without
        `alt=sse`) a JSON array of them whose last usageMetadata is the cumulative total."""
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None
        items = obj if isinstance(obj, list) else [obj]
        metas = [item["usageMetadata"] for item in items
                 if isinstance(item, dict) and isinstance(item.get("usageMetadata"), dict)]
        if not metas:
            return None
        usage = parse_usage(metas[-1])
        return replace(usage, output_tokens=0) if endpoint in EMBED and usage.output_tokens is None else usage

    def stream_meter(self, endpoint: str, hide_usage: bool) -> GenerateStreamMeter:
        return GenerateStreamMeter()

    def error_response(self, error: GatewayError) -> tuple[int, bytes]:
        payload = {"error": {"code": error.status, "message": error.message,
                             "status": _STATUS.get(error.status, "UNKNOWN"), **error.details()}}
        return error.status, json.dumps(payload).encode()

    def stream_error_event(self, message: str) -> bytes:
        payload = {"error": {"code": 503, "message": message, "status": "UNAVAILABLE"}}
        return b"data: " + json.dumps(payload).encode() + b"\n\n"


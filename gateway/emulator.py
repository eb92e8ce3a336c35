"""A provider emulator speaking OpenAI's, Anthropic's and Gemini's wire formats, for tests, the
benchmark and the demo (OpenAI: base URL http://host:port/v1; Anthropic and Gemini: http://host:port).

Token counts are deterministic: a prompt costs (words + 4) per message + 3; an answer is 12 words
(one token each) unless told otherwise. Behaviour can be steered per request with a directive in
the last message, e.g. `[[emu out=40 cached=5 reasoning=3 fail=midstream delay_ms=20]]`:

  out=N          answer with N output tokens (capped by the request's max tokens)
  cached=N       report N of the prompt tokens as cached (Anthropic: read from cache)
  cache_write=N  Anthropic: N prompt tokens written to the 5-minute cache (cache_write_1h=N: 1-hour)
  reasoning=N    report N reasoning tokens (inside the output tokens and the cap; Gemini: thoughts)
  delay_ms=N     wait N ms between streamed chunks
  fail=KIND      500 | 429 | 400 | 401 | hang (never answer) | cut (stream stops, connection drops)
                 | midstream (stream ends with an in-stream error) | nousage (stream without usage)
  usage=always   OpenAI chat stream: usage on the finish chunk whether asked for or not (Mistral, vLLM)
  obfuscation=N  OpenAI chat stream: pad every delta chunk with an N-character `obfuscation` string
  tier=NAME      OpenAI: the service tier the answer says it used (default: the one asked for, or "default")
  searches=N     built-in web search calls made (Anthropic: up to the tool's max_uses; Responses: output items)

Gemini's streamGenerateContent answers SSE with `alt=sse`, else one JSON array of the chunks, as Google does.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

WORDS = ("Hello", "from", "the", "metering", "gateway", "emulator,", "answering", "with", "deterministic",
         "tokens", "for", "you.")
_DIRECTIVE = re.compile(r"\[\[emu ([^\]]*)\]\]")


@dataclass
class EmulatorState:
    """Behaviour settings and a record of what the emulator received (for assertions)."""

    expected_key: str | None = None  # when set, other keys get a 401 like the real API
    latency_ms: float = 0.0  # before the response headers
    chunk_delay_ms: float = 0.0
    received: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=2000))
    total_requests: int = 0


EMULATOR = web.AppKey("emulator", EmulatorState)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_tokens(messages: list[Any]) -> int:
    """The emulator's deterministic prompt token count."""
    return sum(len(_text_of(m.get("content")).split()) + 4 for m in messages if isinstance(m, dict)) + 3


def _directives(messages: list[Any]) -> dict[str, str]:
    text = _text_of(messages[-1].get("content")) if messages and isinstance(messages[-1], dict) else ""
    return _directives_in(text)


def _directives_in(text: str) -> dict[str, str]:
    match = _DIRECTIVE.search(text)
    if not match:
        return {}
    return dict(item.split("=", 1) for item in match.group(1).split() if "=" in item)


def _error(status: int, message: str, etype: str, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return web.json_response(body, status=status, headers={"x-request-id": f"req_emu_{time.time_ns()}"})


@dataclass(frozen=True)
class Answer:
    model: str
    prompt: int
    cached: int
    visible: int
    reasoning: int
    finish: str

    @property
    def usage(self) -> dict[str, Any]:
        completion = self.visible + self.reasoning
        return {
            "prompt_tokens": self.prompt, "completion_tokens": completion, "total_tokens": self.prompt + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }

    def words(self) -> list[str]:
        return [(" " if i else "") + WORDS[i % len(WORDS)] for i in range(self.visible)]


def plan_answer(body: dict[str, Any], directives: dict[str, str]) -> Answer:
    messages = body.get("messages") or []
    cap = body.get("max_completion_tokens") or body.get("max_tokens") or 4096
    n = body.get("n") or 1
    wanted = int(directives.get("out", len(WORDS)))
    reasoning = min(int(directives.get("reasoning", 0)), cap)
    visible = min(wanted, cap - reasoning)
    prompt = prompt_tokens(messages)
    return Answer(
        model=str(body.get("model")), prompt=prompt, cached=min(int(directives.get("cached", 0)), prompt),
        visible=visible * n, reasoning=reasoning * n, finish="length" if wanted + reasoning > cap else "stop",
    )


async def _receive(request: web.Request, empty_ok: bool = False) -> dict[str, Any] | None:
    """Count and record a request; its JSON body (`{}` for an empty one when `empty_ok`), or None when
    the body is not JSON (such a request is counted, not recorded)."""
    state = request.app[EMULATOR]
    state.total_requests += 1
    raw = await request.read()
    try:
        body: dict[str, Any] = json.loads(raw) if raw or not empty_ok else {}
    except ValueError:
        return None
    state.received.append({"path": request.path, "query": dict(request.query), "headers": dict(request.headers),
                           "body": body})
    return body


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[EMULATOR]
    body, refused = await _openai_request(request)
    if refused is not None:
        return refused
    directives = _directives(body.get("messages") or [])
    fail = directives.get("fail")
    if state.latency_ms:
        await asyncio.sleep(state.latency_ms / 1000)
    if fail == "hang":
        await asyncio.sleep(3600)
    if fail in ("500", "429", "400", "401"):
        status = int(fail)
        etype = {500: "server_error", 429: "requests", 400: "invalid_request_error", 401: "invalid_request_error"}
        return _error(status, f"Emulated upstream {status}.", etype[status])
    answer = plan_answer(body, directives)
    if body.get("stream"):
        return await _stream(request, state, body, answer, directives)
    return web.json_response({
        "id": f"chatcmpl-emu{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
        "model": answer.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(answer.words())},
                     "logprobs": None, "finish_reason": answer.finish}],
        "usage": answer.usage, "service_tier": _tier(body, directives), "system_fingerprint": "fp_emulator",
    }, headers={"x-request-id": f"req_emu_{time.time_ns()}", "openai-processing-ms": "1"})


def _tier(body: dict[str, Any], directives: dict[str, str]) -> str:
    """The service tier an OpenAI answer reports: as steered, as asked (auto runs at default), else default."""
    asked = body.get("service_tier")
    return directives.get("tier") or (asked if asked in ("default", "flex", "priority", "scale") else "default")


def _chunk(answer: Answer, choices: list[dict[str, Any]], usage: Any = None, with_usage_key: bool = False,
           tier: str = "default", obfuscation: str = "") -> bytes:
    obj: dict[str, Any] = {"id": "chatcmpl-emu", "object": "chat.completion.chunk", "created": int(time.time()),
                           "model": answer.model, "service_tier": tier, "choices": choices}
    if obfuscation:
        obj["obfuscation"] = obfuscation
    if with_usage_key:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _stream(request: web.Request, state: EmulatorState, body: dict[str, Any], answer: Answer,
                  directives: dict[str, str]) -> web.StreamResponse:
    fail = directives.get("fail")
    include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and fail != "nousage"
    usage_on_last = directives.get("usage") == "always"  # OpenAI-compatible servers that always report it
    delay = float(directives.get("delay_ms", state.chunk_delay_ms)) / 1000
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "x-request-id": f"req_emu_{time.time_ns()}"})
    await response.prepare(request)
    tier = _tier(body, directives)
    frames = [_chunk(answer, [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                     None, include_usage, tier)]
    padding = "x" * int(directives.get("obfuscation", 0))  # OpenAI pads deltas with an `obfuscation` string
    frames += [_chunk(answer, [{"index": 0, "delta": {"content": w}, "finish_reason": None}], None, include_usage,
                      tier, padding) for w in answer.words()]
    frames.append(_chunk(answer, [{"index": 0, "delta": {}, "finish_reason": answer.finish}],
                         answer.usage if usage_on_last else None, include_usage or usage_on_last, tier))
    if include_usage:
        frames.append(_chunk(answer, [], answer.usage, True, tier))
    frames.append(b"data: [DONE]\n\n")
    if fail in ("cut", "midstream"):
        frames = frames[: max(2, len(frames) // 2)]
    for frame in frames:
        await response.write(frame)
        if delay:
            await asyncio.sleep(delay)
    if fail == "cut":
        assert request.transport is not None
        request.transport.close()  # drop the connection without ending the chunked body
        return response
    if fail == "midstream":
        error = {"error": {"message": "Emulated failure mid-stream.", "type": "server_error", "param": None,
                           "code": None}}
        await response.write(b"data: " + json.dumps(error).encode() + b"\n\n")
    await response.write_eof()
    return response


async def models(request: web.Request) -> web.Response:
    if "x-goog-api-key" in request.headers:
        return web.json_response({"models": [{"name": "models/demo-gemini", "displayName": "Demo Gemini",
                                              "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
                                              "supportedGenerationMethods": ["generateContent", "countTokens"]}]})
    if "anthropic-version" in request.headers:
        claude = [{"type": "model", "id": "demo-claude", "display_name": "Demo Claude",
                   "created_at": "2025-05-22T00:00:00Z"}]
        return web.json_response({"data": claude, "has_more": False, "first_id": "demo-claude",
                                  "last_id": "demo-claude"})
    data = [{"id": m, "object": "model", "created": 1721172741, "owned_by": "emulator"}
            for m in ("demo-mini", "demo-large", "gpt-4o-mini")]
    return web.json_response({"object": "list", "data": data})


# ---------------------------------------------------------------- OpenAI completions, embeddings, responses


async def _openai_request(request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
    state = request.app[EMULATOR]
    body = await _receive(request)
    if body is None:
        return {}, _error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
    if state.expected_key is not None and request.headers.get("Authorization") != f"Bearer {state.expected_key}":
        return body, _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
    return body, None


def _words_of(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words_of(v) if not isinstance(v, int) else 1 for v in value)
    if isinstance(value, dict):
        return _words_of(value.get("content")) + _words_of(value.get("text"))
    return 0


async def completions(request: web.Request) -> web.StreamResponse:
    body, refused = await _openai_request(request)
    if refused is not None:
        return refused
    prompt_text = body.get("prompt")
    # an array of strings (or of token arrays) is one completion per prompt, each with n choices
    prompts = prompt_text if isinstance(prompt_text, list) and not all(isinstance(t, int) for t in prompt_text) \
        else [prompt_text]
    directives = _directives_in(prompt_text if isinstance(prompt_text, str) else " ".join(
        p for p in prompts if isinstance(p, str)))
    cap = body.get("max_tokens") or 16
    wanted = int(directives.get("out", len(WORDS)))
    count = len(prompts) * int(body.get("n") or 1)
    answer = Answer(model=str(body.get("model")), prompt=_words_of(prompt_text) + len(prompts), cached=0,
                    visible=min(wanted, cap), reasoning=0, finish="length" if wanted > cap else "stop")
    if not body.get("stream"):
        billed = Answer(answer.model, answer.prompt, 0, answer.visible * count, 0, answer.finish)
        return web.json_response({
            "id": "cmpl-emu", "object": "text_completion", "created": int(time.time()), "model": answer.model,
            "choices": [{"text": "".join(answer.words()), "index": i, "logprobs": None,
                         "finish_reason": answer.finish} for i in range(count)], "usage": billed.usage})
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for word in answer.words():
        chunk = {"id": "cmpl-emu", "object": "text_completion", "created": 1, "model": answer.model,
                 "choices": [{"text": word, "index": 0, "logprobs": None, "finish_reason": None}]}
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    if include_usage:
        final = {"id": "cmpl-emu", "object": "text_completion", "created": 1, "model": answer.model,
                 "choices": [], "usage": answer.usage}
        await response.write(b"data: " + json.dumps(final).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def embeddings(request: web.Request) -> web.Response:
    body, refused = await _openai_request(request)
    if refused is not None:
        return refused
    items = body["input"] if isinstance(body.get("input"), list) and not all(
        isinstance(i, int) for i in body["input"]) else [body.get("input")]
    vector = [0.25, -0.5, 1.0]
    if body.get("encoding_format") == "base64":
        encoded: Any = base64.b64encode(struct.pack("<3f", *vector)).decode()
    else:
        encoded = vector
    tokens = sum(max(1, _words_of(i)) for i in items)
    return web.json_response({"object": "list", "model": body.get("model"),
                              "data": [{"object": "embedding", "index": n, "embedding": encoded}
                                       for n in range(len(items))],
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _response_object(body: dict[str, Any], status: str, text: str, usage: dict[str, Any] | None,
                     searches: int = 0) -> dict[str, Any]:
    calls = [{"type": "web_search_call", "id": f"ws_emu{i}", "status": "completed",
              "action": {"type": "search", "query": "emulated"}} for i in range(searches)]
    message = [{"type": "message", "id": "msg_emu", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}] if text else []
    return {"id": "resp_emu", "object": "response", "created_at": int(time.time()), "status": status,
            "model": body.get("model"), "usage": usage, "service_tier": _tier(body, {}), "output": calls + message}


async def responses(request: web.Request) -> web.StreamResponse:
    body, refused = await _openai_request(request)
    if refused is not None:
        return refused
    prompt_input = body.get("input")
    directives = _directives_in(prompt_input if isinstance(prompt_input, str) else "")
    cap = body.get("max_output_tokens") or 4096
    reasoning = min(int(directives.get("reasoning", 0)), cap)
    wanted = int(directives.get("out", len(WORDS)))
    prompt = _words_of(prompt_input) + 4 + _words_of(body.get("instructions"))
    visible = min(wanted, cap - reasoning)
    words = [(" " if i else "") + WORDS[i % len(WORDS)] for i in range(visible)]
    cached = min(int(directives.get("cached", 0)), prompt)
    usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
             "output_tokens": visible + reasoning, "output_tokens_details": {"reasoning_tokens": reasoning},
             "total_tokens": prompt + visible + reasoning}
    status = "incomplete" if wanted + reasoning > cap else "completed"
    searches = int(directives.get("searches", 0))
    if not body.get("stream"):
        return web.json_response(_response_object(body, status, "".join(words), usage, searches))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    seq = 0

    async def send(name: str, data: dict[str, Any]) -> None:
        nonlocal seq
        await response.write(_event(name, {"type": name, "sequence_number": seq, **data}))
        seq += 1

    delay = float(directives.get("delay_ms", 0)) / 1000
    await send("response.created", {"response": _response_object(body, "in_progress", "", None)})
    if reasoning:  # a reasoning item: the model thinks (invisibly) before it writes
        item = {"type": "reasoning", "id": "rs_emu", "summary": []}
        await send("response.output_item.added", {"output_index": 0, "item": item})
        await asyncio.sleep(delay * reasoning)
        await send("response.output_item.done", {"output_index": 0, "item": item})
    for word in words:
        await asyncio.sleep(delay)
        await send("response.output_text.delta", {"item_id": "msg_emu", "output_index": 0, "content_index": 0,
                                                  "delta": word})
    terminal = "response.completed" if status == "completed" else "response.incomplete"
    await send(terminal, {"response": _response_object(body, status, "".join(words), usage, searches)})
    await response.write_eof()
    return response


# ---------------------------------------------------------------- Anthropic Messages


def _anthropic_error(status: int, etype: str, message: str) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": etype, "message": message},
                              "request_id": f"req_emu_{time.time_ns()}"}, status=status,
                             headers={"request-id": f"req_emu_{time.time_ns()}"})


def _anthropic_prompt(body: dict[str, Any]) -> int:
    system = body.get("system")
    return prompt_tokens(body.get("messages") or []) + len(_text_of(system).split())


async def _anthropic_request(request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
    state = request.app[EMULATOR]
    body = await _receive(request)
    if body is None:
        return {}, _anthropic_error(400, "invalid_request_error", "invalid JSON body")
    if state.expected_key is not None and request.headers.get("x-api-key") != state.expected_key:
        return body, _anthropic_error(401, "authentication_error", "invalid x-api-key")
    if "anthropic-version" not in request.headers:
        return body, _anthropic_error(400, "invalid_request_error", "anthropic-version header is required")
    return body, None


async def count_tokens(request: web.Request) -> web.Response:
    body, refused = await _anthropic_request(request)
    return refused or web.json_response({"input_tokens": _anthropic_prompt(body)})


async def messages(request: web.Request) -> web.StreamResponse:
    body, refused = await _anthropic_request(request)
    if refused is not None:
        return refused
    state = request.app[EMULATOR]
    directives = _directives(body.get("messages") or [])
    fail = directives.get("fail")
    if state.latency_ms:
        await asyncio.sleep(state.latency_ms / 1000)
    if fail == "hang":
        await asyncio.sleep(3600)
    errors = {"500": (500, "api_error"), "529": (529, "overloaded_error"), "429": (429, "rate_limit_error"),
              "400": (400, "invalid_request_error"), "401": (401, "authentication_error")}
    if fail in errors:
        status, etype = errors[fail]
        return _anthropic_error(status, etype, f"Emulated upstream {status}.")
    prompt = _anthropic_prompt(body)
    read = min(int(directives.get("cached", 0)), prompt)
    write_5m = min(int(directives.get("cache_write", 0)), prompt - read)
    write_1h = min(int(directives.get("cache_write_1h", 0)), prompt - read - write_5m)
    cap = int(body.get("max_tokens") or 0)
    wanted = int(directives.get("out", len(WORDS)))
    out = min(wanted, cap)
    words = [(" " if i else "") + WORDS[i % len(WORDS)] for i in range(out)]
    usage: dict[str, Any] = {
             "input_tokens": prompt - read - write_5m - write_1h, "cache_creation_input_tokens": write_5m + write_1h,
             "cache_read_input_tokens": read,
             "cache_creation": {"ephemeral_5m_input_tokens": write_5m, "ephemeral_1h_input_tokens": write_1h},
             "output_tokens": out, "service_tier": "standard"}
    search_tool = next((t for t in body.get("tools") or [] if str(t.get("type", "")).startswith("web_search_")), None)
    if search_tool is not None:
        searches = min(int(directives.get("searches", 0)), int(search_tool.get("max_uses") or 10**6))
        usage["server_tool_use"] = {"web_search_requests": searches, "web_fetch_requests": 0}
    message = {"id": f"msg_emu{time.time_ns()}", "type": "message", "role": "assistant", "model": body.get("model"),
               "content": [{"type": "text", "text": "".join(words)}],
               "stop_reason": "max_tokens" if wanted > cap else "end_turn", "stop_sequence": None, "usage": usage}
    if not body.get("stream"):
        return web.json_response(message, headers={"request-id": f"req_emu_{time.time_ns()}"})
    return await _anthropic_stream(request, message, words, directives)


def _delta_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """The final message_delta's usage as the API sends it today: cumulative totals, the cache write
    total without its 5-minute / 1-hour breakdown (which only message_start carries)."""
    keys = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens",
            "server_tool_use")
    return {k: usage[k] for k in keys if k in usage}


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _anthropic_stream(request: web.Request, message: dict[str, Any], words: list[str],
                            directives: dict[str, str]) -> web.StreamResponse:
    fail = directives.get("fail")
    delay = float(directives.get("delay_ms", request.app[EMULATOR].chunk_delay_ms)) / 1000
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "request-id": f"req_emu_{time.time_ns()}"})
    await response.prepare(request)
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    frames = [_event("message_start", {"type": "message_start", "message": start}),
              _event("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {"type": "text", "text": ""}}),
              _event("ping", {"type": "ping"})]
    frames += [_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "text_delta", "text": w}}) for w in words]
    frames += [_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
               _event("message_delta", {"type": "message_delta", "delta": {"stop_reason": message["stop_reason"],
                                        "stop_sequence": None}, "usage": _delta_usage(usage)}),
               _event("message_stop", {"type": "message_stop"})]
    if fail in ("cut", "midstream"):
        frames = frames[: max(3, len(frames) // 2)]
    for frame in frames:
        await response.write(frame)
        if delay:
            await asyncio.sleep(delay)
    if fail == "cut":
        assert request.transport is not None
        request.transport.close()
        return response
    if fail == "midstream":
        await response.write(_event("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                          "message": "Emulated overload mid-stream."}}))
    await response.write_eof()
    return response


# ---------------------------------------------------------------- Gemini


def _gemini_error(status: int, code: str, message: str, reason: str | None = None) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": code}
    if reason:
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason}]
    return web.json_response({"error": error}, status=status)


def _gemini_texts(content: Any) -> str:
    parts = content.get("parts") if isinstance(content, dict) else None
    return " ".join(p["text"] for p in parts or [] if isinstance(p, dict) and isinstance(p.get("text"), str))


def gemini_prompt(body: dict[str, Any]) -> int:
    """The emulator's Gemini prompt count: (words + 4) per content + 3, plus system words."""
    contents = body.get("contents") or []
    return sum(len(_gemini_texts(c).split()) + 4 for c in contents) + 3 + len(
        _gemini_texts(body.get("systemInstruction")).split())


async def gemini(request: web.Request) -> web.StreamResponse:
    state = request.app[EMULATOR]
    body = await _receive(request)
    if body is None:
        return _gemini_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
    if state.expected_key is not None and request.headers.get("x-goog-api-key") != state.expected_key:
        return _gemini_error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.",
                             "API_KEY_INVALID")
    method, model = request.match_info["method"], request.match_info["model"]
    if method == "countTokens":
        inner = body.get("generateContentRequest") or body
        return web.json_response({"totalTokens": gemini_prompt(inner)})
    if method in ("embedContent", "batchEmbedContents"):
        items = body.get("requests") or [body]
        tokens = sum(len(_gemini_texts(item.get("content")).split()) for item in items)
        vectors = [{"values": [0.1 * (i + 1), 0.2, 0.3]} for i in range(len(items))]
        batch = method == "batchEmbedContents"
        result: dict[str, Any] = {"embeddings": vectors} if batch else {"embedding": vectors[0]}
        result["usageMetadata"] = {"promptTokenCount": tokens, "totalTokenCount": tokens}
        return web.json_response(result)
    contents = body.get("contents") or []
    directives = _directives_in(_gemini_texts(contents[-1]) if contents else "")
    fail = directives.get("fail")
    if state.latency_ms:
        await asyncio.sleep(state.latency_ms / 1000)
    if fail == "hang":
        await asyncio.sleep(3600)
    if fail in ("500", "503", "429", "400"):
        codes = {"500": "INTERNAL", "503": "UNAVAILABLE", "429": "RESOURCE_EXHAUSTED", "400": "INVALID_ARGUMENT"}
        return _gemini_error(int(fail), codes[fail], f"Emulated upstream {fail}.")
    config = body.get("generationConfig") or body.get("generation_config") or {}
    cap = config.get("maxOutputTokens") or config.get("max_output_tokens") or 65536
    thoughts = min(int(directives.get("reasoning", 0)), cap)
    wanted = int(directives.get("out", len(WORDS)))
    visible = min(wanted, cap - thoughts)
    prompt = gemini_prompt(body)
    cached = min(int(directives.get("cached", 0)), prompt)
    usage: dict[str, Any] = {"promptTokenCount": prompt, "candidatesTokenCount": visible,
                             "totalTokenCount": prompt + visible + thoughts}
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    if cached:
        usage["cachedContentTokenCount"] = cached
    finish = "MAX_TOKENS" if wanted + thoughts > cap else "STOP"
    words = [(" " if i else "") + WORDS[i % len(WORDS)] for i in range(visible)]

    def chunk(text: str, final: bool) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
        if final:
            candidate["finishReason"] = finish
        meta = usage if final else {"promptTokenCount": prompt, "totalTokenCount": prompt}
        return {"candidates": [candidate], "usageMetadata": meta, "modelVersion": model, "responseId": "emu"}

    if method == "generateContent":
        return web.json_response(chunk("".join(words), True))
    frames = [chunk(w, i == len(words) - 1) for i, w in enumerate(words)] or [chunk("", True)]
    if request.query.get("alt") != "sse":  # without alt=sse Google answers one JSON array of the chunks
        return web.json_response(frames)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    if fail in ("cut", "midstream"):
        frames = frames[: max(1, len(frames) // 2)]
    delay = float(directives.get("delay_ms", state.chunk_delay_ms)) / 1000
    for frame in frames:
        await response.write(b"data: " + json.dumps(frame, separators=(",", ":")).encode() + b"\r\n\r\n")
        if delay:
            await asyncio.sleep(delay)
    if fail == "cut":
        assert request.transport is not None
        request.transport.close()
        return response
    if fail == "midstream":
        error = {"error": {"code": 503, "message": "Emulated failure mid-stream.", "status": "UNAVAILABLE"}}
        await response.write(b"data: " + json.dumps(error).encode() + b"\r\n\r\n")
    await response.write_eof()
    return response


# ---------------------------------------------------------------- a web-search API priced per call


async def search(request: web.Request) -> web.Response:
    """Serper-style search (`X-API-KEY` header, JSON body `{"q": ...}`); `q` = "fail" answers 500."""
    state = request.app[EMULATOR]
    body = await _receive(request, empty_ok=True)
    if body is None:
        return web.json_response({"message": "Invalid JSON.", "statusCode": 400}, status=400)
    if state.expected_key is not None and request.headers.get("X-API-KEY") != state.expected_key:
        return web.json_response({"message": "Unauthorized.", "statusCode": 403}, status=403)
    query = body.get("q") or request.query.get("q", "")
    if query == "fail":
        return web.json_response({"message": "Emulated search failure.", "statusCode": 500}, status=500)
    return web.json_response({"searchParameters": {"q": query, "type": "search"},
                              "organic": [{"title": f"Result {i} for {query}", "link": f"https://example.com/{i}",
                                           "position": i} for i in (1, 2, 3)], "credits": 1})


def create_emulator_app(state: EmulatorState | None = None) -> web.Application:
    """The emulator as an aiohttp app (base URL: http://host:port/v1)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[EMULATOR] = state or EmulatorState()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    for version in ("v1", "v1beta"):
        app.router.add_post(f"/{version}/models/{{model}}:{{method}}", gemini)
        app.router.add_get(f"/{version}/models", models)
    app.router.add_route("*", "/search", search)
    return app

"""Micro-benchmark of the dialects' per-request work: stream meters on bench-like streams of each
dialect (16 text deltas plus the usage events, as one read and as one read per event), request parsing,
the stream_options splice and usage reading from a JSON answer.

Usage: python bench/dialect_micro.py [--number 2000] [--repeat 7] [--only NAME] [--callgrind NAME]
Prints µs per call (the minimum over the repeats: robust on a busy machine). `--callgrind NAME` runs
only that case, `--number` times, for `valgrind --tool=callgrind` instruction counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from upstream import USAGE, WORDS, json_answer, sse_answer  # noqa: E402

from bench import body_of  # noqa: E402
from gateway.config_tables import Upstream  # noqa: E402
from gateway.dialects.anthropic import AnthropicDialect  # noqa: E402
from gateway.dialects.gemini import GeminiDialect  # noqa: E402
from gateway.dialects.openai import OpenAIDialect  # noqa: E402
from gateway.secret import Secret  # noqa: E402


def _texts() -> list[str]:
    return [w if i == 0 else " " + w for i, w in enumerate(WORDS)]


def responses_stream() -> bytes:
    """A Responses API stream (PROVIDERS.md): created, one delta per word, completed with usage."""
    def event(name: str, obj: dict[str, object]) -> str:
        return f"event: {name}\ndata: {json.dumps({'type': name, **obj}, separators=(',', ':'))}\n\n"
    response = {"id": "resp_bench", "object": "response", "status": "in_progress", "model": "bench-stream",
                "output": [], "usage": None}
    out = [event("response.created", {"response": response, "sequence_number": 0})]
    out += [event("response.output_text.delta", {"item_id": "msg_1", "output_index": 0, "content_index": 0,
                                                  "delta": t, "sequence_number": i + 1})
            for i, t in enumerate(_texts())]
    done = {**response, "status": "completed",
            "output": [{"type": "message", "id": "msg_1", "role": "assistant",
                        "content": [{"type": "output_text", "text": "".join(_texts())}]}],
            "usage": {"input_tokens": 9, "output_tokens": len(WORDS), "total_tokens": 9 + len(WORDS),
                      "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}}
    out.append(event("response.completed", {"response": done, "sequence_number": 99}))
    return "".join(out).encode()


def anthropic_stream() -> bytes:
    """A Messages stream (PROVIDERS.md §3): message_start, one text block of deltas, message_delta, stop."""
    def event(name: str, obj: dict[str, object]) -> str:
        return f"event: {name}\ndata: {json.dumps({'type': name, **obj}, separators=(',', ':'))}\n\n"
    out = [event("message_start", {"message": {
        "id": "msg_bench", "type": "message", "role": "assistant", "content": [], "model": "bench-stream",
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 9, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                  "output_tokens": 1}}}),
        event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        event("ping", {})]
    out += [event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": t}}) for t in _texts()]
    out += [event("content_block_stop", {"index": 0}),
            event("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                    "usage": {"output_tokens": len(WORDS)}}),
            event("message_stop", {})]
    return "".join(out).encode()


def gemini_stream() -> bytes:
    """streamGenerateContent?alt=sse (PROVIDERS.md §4.6): a cumulative usageMetadata in every chunk."""
    out = []
    texts = _texts()
    for i, t in enumerate(texts):
        candidate: dict[str, object] = {"content": {"parts": [{"text": t}], "role": "model"}, "index": 0}
        if i == len(texts) - 1:
            candidate["finishReason"] = "STOP"
        meta = {"promptTokenCount": 9, "candidatesTokenCount": i + 1, "totalTokenCount": 10 + i}
        chunk = {"candidates": [candidate], "usageMetadata": meta, "modelVersion": "bench-stream",
                 "responseId": "bench"}
        out.append("data: " + json.dumps(chunk, separators=(",", ":")) + "\r\n\r\n")
    return "".join(out).encode()


def events_of(stream: bytes) -> list[bytes]:
    """The stream cut after every blank line (one read per event)."""
    sep = b"\r\n\r\n" if b"\r\n\r\n" in stream else b"\n\n"
    parts = stream.split(sep)
    return [p + sep for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _meter_case(make: Callable[[], object], chunks: list[bytes]) -> Callable[[], object]:
    def run() -> object:
        meter = make()
        for chunk in chunks:
            meter.feed(chunk)  # type: ignore[attr-defined]
        meter.finish()  # type: ignore[attr-defined]
        return meter.usage  # type: ignore[attr-defined]
    return run


def cases() -> dict[str, Callable[[], object]]:
    openai, anthropic, gemini = OpenAIDialect(), AnthropicDialect(), GeminiDialect()
    chat = sse_answer().encode()
    streams = {
        "chat-hide": (lambda: openai.stream_meter("chat", True), chat),
        "chat": (lambda: openai.stream_meter("chat", False), chat),
        "responses": (lambda: openai.stream_meter("responses", False), responses_stream()),
        "anthropic": (lambda: anthropic.stream_meter("messages", False), anthropic_stream()),
        "gemini": (lambda: gemini.stream_meter("streamGenerateContent", False), gemini_stream()),
    }
    out: dict[str, Callable[[], object]] = {}
    for name, (make, stream) in streams.items():
        out[f"{name} 1 read"] = _meter_case(make, [stream])
        out[f"{name} per event"] = _meter_case(make, events_of(stream))
    raw = body_of(True).encode()
    upstream = Upstream("bench", "openai", "http://127.0.0.1:1", Secret("k"), "bearer", 60.0, 5.0, "inject",
                        "max_tokens")
    parsed = openai.parse_request("chat", raw, 8)
    answer = json_answer().encode()
    out["parse_request chat"] = lambda: openai.parse_request("chat", raw, 8)
    out["upstream_body splice"] = lambda: openai.upstream_body(parsed, upstream, None)
    out["usage_from_body chat"] = lambda: openai.usage_from_body("chat", answer)
    assert USAGE  # the usage the bench streams and answers carry
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--only", default="")
    parser.add_argument("--callgrind", default="")
    args = parser.parse_args()
    table = cases()
    if args.callgrind:
        fn = table[args.callgrind]
        for _ in range(args.number):
            fn()
        return
    for name, fn in table.items():
        if args.only and args.only not in name:
            continue
        best = min(timeit.repeat(fn, number=args.number, repeat=args.repeat)) / args.number
        print(f"{name:28s} {best * 1e6:8.2f} µs")


if __name__ == "__main__":
    main()

"""Optional OpenTelemetry traces: one span per proxied request with the GenAI semantic conventions,
a child of the inbound traceparent, propagated upstream; off unless GATEWAY_OTEL asks for it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Harness, emulator_state, make_settings
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway import tracing
from gateway.app import create_app

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
CHAT = {"model": "demo-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Every span the gateway ends, in memory (create_app builds its tracer from this provider)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "from_env", lambda: tracing.Tracer(provider))
    yield exporter
    provider.shutdown()


@pytest.fixture
def settings_overrides(spans: InMemorySpanExporter) -> dict[str, Any]:
    return {}  # depends on `spans`: the harness's app is built with the in-memory tracer


async def _post(harness: Harness, key: str, body: dict[str, Any] = CHAT, **headers: str) -> int:
    async with harness.client.post("/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {key}", **headers}) as resp:
        await resp.read()
        return resp.status


async def test_a_served_request_is_one_genai_span_under_the_inbound_trace(harness: Harness,
                                                                          spans: InMemorySpanExporter) -> None:
    account, key = await harness.account(credits=1)
    assert await _post(harness, key, traceparent=f"00-{TRACE}-{PARENT}-01", **{"X-Request-ID": "mine"}) == 200
    await harness.gw.quiesce()
    (span,) = spans.get_finished_spans()
    assert span.name == "chat demo-mini" and span.kind == SpanKind.CLIENT
    assert format(span.context.trace_id, "032x") == TRACE and span.parent is not None
    assert format(span.parent.span_id, "016x") == PARENT
    attrs = dict(span.attributes or {})
    assert {"gen_ai.operation.name": "chat", "gen_ai.system": "openai", "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "demo-mini", "gen_ai.response.model": "demo-mini",
            "gen_ai.request.max_tokens": 20, "gateway.account_id": account, "http.response.status_code": 200,
            "gateway.client_request_id": "mine", "gateway.outcome": "served"}.items() <= attrs.items()
    assert attrs["gateway.credits_micro"] == harness.state(account)["charged"] > 0
    assert attrs["gen_ai.usage.input_tokens"] > 0 and attrs["gen_ai.usage.output_tokens"] > 0
    assert span.status.status_code == StatusCode.UNSET
    sent = {k.lower(): v for k, v in emulator_state(harness.emulator).received[-1]["headers"].items()}
    assert sent["traceparent"] == f"00-{TRACE}-{format(span.context.span_id, '016x')}-01"  # the span is the parent


async def test_failures_and_refusals_end_their_span_as_errors(harness: Harness, spans: InMemorySpanExporter
                                                              ) -> None:
    _, key = await harness.account(credits=1)
    body = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "x [[emu fail=500]]"}]}
    assert await _post(harness, key, body) == 500
    _, broke = await harness.account(credits=0)
    assert await _post(harness, broke) == 402
    await harness.gw.quiesce()
    failed, refused = spans.get_finished_spans()
    assert failed.status.status_code == StatusCode.ERROR and failed.status.description == "status_5xx"
    assert dict(failed.attributes or {})["error.type"] == "status_5xx"
    assert "gen_ai.usage.output_tokens" not in dict(failed.attributes or {})
    assert refused.status.status_code == StatusCode.ERROR
    assert dict(refused.attributes or {})["http.response.status_code"] == 402
    assert format(failed.context.trace_id, "032x") != format(refused.context.trace_id, "032x")  # new traces


def test_tracing_is_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tracing.from_env({}) is None
    assert tracing.from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}) is None
    assert isinstance(tracing.from_env({"GATEWAY_OTEL": "1", "OTEL_TRACES_EXPORTER": "none"}), tracing.Tracer)
    assert isinstance(tracing.from_env({"GATEWAY_OTEL": "true", "OTEL_TRACES_EXPORTER": "console"}), tracing.Tracer)
    assert tracing.from_env({"GATEWAY_OTEL": "1", "OTEL_TRACES_EXPORTER": "zipkin"}) is None


def test_an_app_without_tracing_has_no_tracer(config_dir: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tracing.OTEL_ENV, raising=False)
    app = create_app(make_settings(config_dir, "redis://127.0.0.1:1"))
    assert app.get(tracing.TRACER) is None  # the proxy then makes no span object at all

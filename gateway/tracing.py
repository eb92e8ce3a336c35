"""Optional OpenTelemetry traces: one span per proxied request, with the GenAI semantic conventions.

Off by default. On when GATEWAY_OTEL=1 and `opentelemetry-sdk` is importable: the spans go to the
tracer provider already installed in the process (e.g. by `opentelemetry-instrument`), else to one
made here with the exporter the standard `OTEL_TRACES_EXPORTER` names (`otlp`, the default, needs
`opentelemetry-exporter-otlp`; `console`; `none`) and the standard `OTEL_EXPORTER_OTLP_*` and
`OTEL_SERVICE_NAME` settings. The `OTEL_*` variables alone do not turn tracing on: they are often
set for other processes of a deployment, and a span per request has a cost.

With tracing off nothing here runs on a request: the proxy looks for `TRACER` in the app once and
finds None, and no span object is made. The inbound `traceparent` then goes upstream unchanged (it is
forwarded like any other header); with tracing on, the upstream gets the request span's own
`traceparent` (same trace, the span as parent).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.logs import Access

log = logging.getLogger("gateway.tracing")
OTEL_ENV = "GATEWAY_OTEL"

#: A dialect endpoint -> gen_ai.operation.name.
_OPERATIONS = {"chat": "chat", "messages": "chat", "responses": "chat", "completions": "text_completion",
               "embeddings": "embeddings", "embedContent": "embeddings", "batchEmbedContents": "embeddings",
               "generateContent": "generate_content", "streamGenerateContent": "generate_content",
               "call": "execute_tool"}
#: A dialect -> gen_ai.provider.name (the wire format's provider; the route names the actual upstream).
_PROVIDERS = {"openai": "openai", "anthropic": "anthropic", "gemini": "gcp.gemini"}
_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


class Tracer:
    """Starts a request's span; built by `from_env` (or a test, from its own tracer provider)."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._tracer = provider.get_tracer("gateway")
        self._propagator = TraceContextTextMapPropagator()

    def start(self, dialect: str, endpoint: str, model: str, max_tokens: int | None, inbound: Mapping[str, str]
              ) -> Span:
        """A span for one proxied request, a child of the inbound `traceparent` when it is valid."""
        operation = _OPERATIONS.get(endpoint, endpoint)
        provider = _PROVIDERS.get(dialect, dialect)
        attributes: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.system": provider,
                                      "gen_ai.provider.name": provider, "gen_ai.request.model": model}
        if max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = max_tokens
        parent = self._propagator.extract(inbound)
        span = self._tracer.start_span(f"{operation} {model}", context=parent, kind=self._trace.SpanKind.CLIENT,
                                       attributes=attributes)
        return Span(self, span)


class Span:
    """One request's span: its `traceparent` for the upstream, and its end with the call's facts."""

    __slots__ = ("_owner", "_span")

    def __init__(self, owner: Tracer, span: Any) -> None:
        self._owner = owner
        self._span = span

    def inject(self, headers: dict[str, str]) -> None:
        """Replace the trace headers going upstream with this span's."""
        for name in [n for n in headers if n.lower() in _TRACE_HEADERS]:
            del headers[name]
        self._owner._propagator.inject(headers, context=self._owner._trace.set_span_in_context(self._span))

    def end(self, access: Access, status: int) -> None:
        from opentelemetry.trace import Status, StatusCode

        span = self._span
        facts: dict[str, Any] = {
            "http.response.status_code": status, "gateway.request_id": access.request_id,
            "gateway.account_id": access.account_id, "gateway.key_id": access.key_id,
            "gateway.route": access.route, "gateway.upstream": access.upstream,
            "gen_ai.usage.input_tokens": access.input_tokens, "gen_ai.usage.output_tokens": access.output_tokens,
            "gateway.credits_micro": access.credits_micro, "gateway.outcome": access.outcome,
            "gateway.client_request_id": access.client_request_id,
        }
        if access.outcome in ("served", "client_gone", "upstream_error") and access.model is not None and (
                access.upstream_status is None):
            facts["gen_ai.response.model"] = access.model  # as forwarded: the answer's own name is not parsed
        if access.cause is not None:
            facts["error.type"] = access.cause
        span.set_attributes({k: v for k, v in facts.items() if v is not None})
        if status >= 400 or access.outcome in ("error", "upstream_error"):
            span.set_status(Status(StatusCode.ERROR, access.cause or access.outcome or str(status)))
            if "error.type" not in facts:
                span.set_attribute("error.type", str(status))
        span.end()


TRACER = web.AppKey("tracer", Tracer)


def from_env(environ: Mapping[str, str] | None = None) -> Tracer | None:
    """The tracer GATEWAY_OTEL asks for, or None (off, or the SDK or the exporter is missing: said once)."""
    env = os.environ if environ is None else environ
    if env.get(OTEL_ENV, "").strip().lower() not in ("1", "true", "yes", "on"):
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("%s is set but opentelemetry-sdk is not installed: tracing stays off", OTEL_ENV)
        return None
    provider: Any = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):  # one is installed already (opentelemetry-instrument)
        return Tracer(provider)
    exporter = _exporter(env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp")
    if exporter is False:
        return None
    provider = TracerProvider(resource=Resource.create(
        {"service.name": env.get("OTEL_SERVICE_NAME") or "metering-gateway"}))
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracer(provider)


def _exporter(name: str) -> Any:
    """The span exporter OTEL_TRACES_EXPORTER names; None for `none`; False when it is unavailable."""
    if name == "none":
        return None
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore
        except ImportError:
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore
                    OTLPSpanExporter,
                )
            except ImportError:
                log.warning("OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp: tracing stays off")
                return False
        return OTLPSpanExporter()
    log.warning("OTEL_TRACES_EXPORTER=%s is not supported here (otlp, console, none): tracing stays off", name)
    return False

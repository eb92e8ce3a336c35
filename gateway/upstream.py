"""The HTTP edges of a proxied call: reading the client's body, the headers and query string that go
upstream, and the headers and error bodies that come back."""

from __future__ import annotations

import os
from typing import Any

from aiohttp import web

from gateway.dialects.base import Dialect
from gateway.errors import ClientDisconnected, PayloadTooLarge, UnreadableBody, UnsupportedMediaType, UpstreamError
from gateway.money import format_credits
from gateway.state import GATEWAY, REQUEST_DIALECT
from gateway.upstream_client import UpstreamResponse
from gateway.upstream_errors import relay_body

#: Upstream response headers not copied to the client: hop-by-hop, recomputed, or the operator's own.
_DROP_RESPONSE = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "set-cookie",
    "openai-organization", "openai-project", "x-request-id", "request-id", "date", "server", "trailer",
    "upgrade",
})
_DROP_RESPONSE_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-", "anthropic-organization")


def new_request_id() -> str:
    """`req_` and 32 random hex digits (the shape uuid4().hex had, without building a UUID object)."""
    return "req_" + os.urandom(16).hex()


def response_headers(upstream_headers: Any, request_id: str, available: int, client_id: str | None = None
                     ) -> dict[str, str]:
    """The answer's headers: the upstream's, minus hop-by-hop and the operator's, plus the gateway's
    request id (`x-request-id` echoes the client's own X-Request-ID instead when it sent a valid one;
    `x-gateway-request-id` and `request-id` are always the gateway's) and the credits remaining."""
    headers = {}
    for name, value in upstream_headers.items():
        lowered = name.lower()
        if lowered not in _DROP_RESPONSE and not lowered.startswith(_DROP_RESPONSE_PREFIXES):
            headers[name] = value
    upstream_id = upstream_headers.get("x-request-id") or upstream_headers.get("request-id")
    if upstream_id:
        headers["x-upstream-request-id"] = upstream_id
    headers["x-request-id"] = client_id or request_id
    headers["x-gateway-request-id"] = request_id
    headers["request-id"] = request_id  # the Anthropic SDK's name for it
    headers["x-credits-remaining"] = format_credits(max(available, 0))
    return headers


#: Content-Encodings aiohttp decodes while reading a request body (as its parser spells them).
_DECODED_ENCODINGS = frozenset({"gzip", "deflate", "br", "zstd"})


async def read_body(request: web.Request, dialect: Dialect) -> bytes:
    """The request body, decoded: what the dialect parses and what goes upstream (without its
    Content-Encoding, see `forward_headers`). The size limit applies after decoding."""
    if dialect.json_body and request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"Unsupported Content-Type {request.content_type!r}: send the body as application/json.")
    encodings = request.headers.getall("Content-Encoding", [])
    encoding = encodings[0].lower() if len(encodings) == 1 else ",".join(encodings)
    if encodings and encoding not in _DECODED_ENCODINGS and encoding not in ("identity", ""):
        shown = encoding[:40].encode("unicode_escape").decode("ascii")
        raise UnsupportedMediaType(f"Unsupported Content-Encoding {shown!r}: send the body uncompressed, "
                                   "or with Content-Encoding gzip or deflate.")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[GATEWAY].settings.max_body_bytes
        raise PayloadTooLarge(f"The request body is larger than this gateway's limit of {limit} bytes.") from None
    except web.RequestPayloadError:
        # aiohttp's parser stopped at the bad bytes; marking the payload ended keeps aiohttp from
        # draining it after the answer (which re-raises and logs a traceback)
        request.content.feed_eof()
        if encoding in _DECODED_ENCODINGS:
            raise UnreadableBody(
                f"The request body is not valid {encoding} data (Content-Encoding: {encoding}).") from None
        raise UnreadableBody("The request body could not be read: its framing (Content-Length or chunked "
                             "encoding) is broken.") from None
    except ConnectionError:  # the client hung up mid-upload (not Redis: see error_middleware)
        raise ClientDisconnected("The client closed the connection before its request body was read.") from None


#: Query parameters each dialect forwards (others could change what the answer reports, e.g. Gemini's
#: `alt=proto` or `fields`, so they are dropped); per-call tools forward everything but the key.
QUERY_FORWARDED = {"openai": frozenset({"api-version"}), "anthropic": frozenset({"beta"}),
                    "gemini": frozenset({"alt"})}


def forward_query(request: web.Request) -> dict[str, str]:
    allowed = QUERY_FORWARDED.get(request[REQUEST_DIALECT].name)
    query = {k: v for k, v in request.query.items() if k != "key" and (allowed is None or k in allowed)}
    if "alt" in query and (query["alt"] != "sse" or not request.path.endswith(":streamGenerateContent")):
        del query["alt"]  # only a stream may ask for SSE; alt=proto would hide usageMetadata
    return query


def refuse_operator_problems(status: int) -> None:
    """A 502 for upstream answers that are the operator's business: its credentials refused, or a
    redirect (never followed: the provider key would go along to wherever it points)."""
    if status in (401, 403):
        raise UpstreamError("The upstream provider rejected the gateway's credentials.")
    if 300 <= status < 400:
        raise UpstreamError(f"The upstream provider answered with a redirect ({status}), which this gateway "
                            "does not follow.")


def relayed_error(dialect: Dialect, up: UpstreamResponse, data: bytes, model: str, request_id: str,
                   available: int, client_id: str | None = None) -> web.Response:
    headers = response_headers(up.headers, request_id, available, client_id)
    if dialect.name != "http":
        headers = {name: value for name, value in headers.items() if name.lower() != "content-type"}
        headers["Content-Type"] = "application/json"
    return web.Response(body=relay_body(dialect, up.status, data, model, request_id), status=up.status,
                        headers=headers)

"""Plain HTTP pass-through for APIs priced per call (web search such as Tavily or Serper).

`ANY /tools/{name}/{path}` goes to `{upstream base_url}/{path}` of the providers.yaml entry `name`,
whose upstream has `dialect: http`. The body is forwarded untouched and never parsed; a 2xx answer
is charged the entry's `per_request` price (or the plan's `credits_per_call`), anything else is free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from gateway.config import Upstream
from gateway.dialects.base import ParsedRequest, forward_headers, inject_provider_key
from gateway.errors import GatewayError
from gateway.usage import Usage

PREFIX = "/tools/"


class _NoStream:
    """Pass-through answers are relayed whole: there is nothing to meter inside them."""

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def finish(self) -> bytes:
        return b""

    @property
    def usage(self) -> Usage | None:
        return Usage(0, 0, 0, 0, 0)

    def estimated_output_tokens(self) -> int:
        return 0


class HttpDialect:
    name = "http"
    json_body = False  # any content type: the body is the tool's business

    def client_key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        auth = headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip() or None
        return headers.get("x-api-key") or None

    def upstream_path(self, path: str) -> str:
        _name, _, rest = path[len(PREFIX):].partition("/")
        return "/" + rest

    def parse_request(self, endpoint: str, raw: bytes, max_choices: int, path_model: str | None = None,
                      headers: Mapping[str, str] | None = None) -> ParsedRequest:
        return ParsedRequest(endpoint=endpoint, model=path_model or "", stream=False, body={}, cap_field=None,
                             output_cap=None, choices=1, prompt_tokens_bound=0, prompt_tokens_estimate=0)

    def upstream_body(self, req: ParsedRequest, upstream: Upstream, lowered_cap: int | None
                      ) -> tuple[bytes | None, bool]:
        return None, False

    def upstream_headers(self, upstream: Upstream, incoming: Mapping[str, str]) -> dict[str, str]:
        return inject_provider_key(forward_headers(incoming), upstream)

    def usage_from_body(self, endpoint: str, body: bytes) -> Usage | None:
        return Usage(0, 0, 0, 0, 0)  # a served call: its price is the per-call price alone

    def stream_meter(self, endpoint: str, hide_usage: bool) -> _NoStream:
        return _NoStream()

    def error_response(self, error: GatewayError) -> tuple[int, bytes]:
        payload = {"error": {"message": error.message, "type": error.kind, "param": error.param}}
        return error.status, json.dumps(payload).encode()

    def stream_error_event(self, message: str) -> bytes:
        return b""

"""Plain HTTP pass-through for APIs priced per call (web search such as Tavily or Serper).

`ANY /tools/{name}/{path}` goes to `{upstream base_url}/{path}` of the providers.yaml entry `name`,
whose upstream has `dialect: http`. The body is forwarded untouched and never parsed; a 2xx answer
is charged the entry's `per_request` price (or the plan's `credits_per_call`), anything else is free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from urllib.parse import quote, unquote

from gateway.config import Upstream
from gateway.dialects.base import ParsedRequest, forward_headers, inject_provider_key
from gateway.errors import BadRequest, GatewayError
from gateway.usage import Usage

PREFIX = "/tools/"
_PCHAR = "!$&'()*+,;=:@-._~"  # RFC 3986 path characters kept as they are (besides letters and digits)
_ENCODED_SEPARATORS = ("%2f", "%3f", "%23", "%5c")  # / ? # \\ sent encoded: refused, never decoded into the path


def _refuse(why: str) -> BadRequest:
    return BadRequest(f"The tool path is not allowed: {why}.", param="path")


def _tail(path: str) -> str:
    if not path.startswith(PREFIX):
        raise _refuse("it must start with /tools/{entry}/")
    _entry, _, tail = path[len(PREFIX):].partition("/")
    return tail


def _segments(tail: str, *, encoded: bool) -> str:
    """`/` + the tail's segments, each decoded once (when `encoded`), checked and quoted again."""
    quoted = []
    for segment in tail.split("/"):
        if encoded:
            if any(sep in segment.lower() for sep in _ENCODED_SEPARATORS):
                raise _refuse("encoded '/', '?', '#' or '\\'")
            try:
                segment = unquote(segment, errors="strict")
            except UnicodeDecodeError:
                raise _refuse("percent-encoding that is not UTF-8") from None
        if segment in (".", ".."):
            raise _refuse("'.' and '..' segments")
        if any(ch in "?#%\\" or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in segment):
            raise _refuse("'?', '#', '%', '\\' or control characters")
        quoted.append(quote(segment, safe=_PCHAR))
    return "/" + "/".join(quoted)


def tool_path(raw_target: str) -> str:
    """The upstream path (below the entry's base URL) for a raw request target `/tools/{entry}/{tail}`
    (as sent, percent-encoding included; a query string is ignored): raises BadRequest for a tail that
    could leave the base path once decoded or normalised by anyone on the way."""
    return _segments(_tail(raw_target.partition("?")[0]), encoded=True)


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
        """The tail after `/tools/{entry}/`, as quoted segments below the entry's base path: a tail that
        could leave it (dot segments, `?`, `#`, `\\`, control characters) is refused."""
        return _segments(_tail(path), encoded=False)

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
        payload = {"error": {"message": error.message, "type": error.kind, "param": error.param,
                             **error.details()}}
        return error.status, json.dumps(payload).encode()

    def stream_error_event(self, message: str) -> bytes:
        return b""

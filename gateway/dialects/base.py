"""The interface every wire dialect implements, and the values passed across it.

A dialect knows one provider family's wire format: where the client's key is, how the provider
key is injected, how a request is parsed and its output cap lowered, where usage sits in a
response or a stream, and how an error looks. The proxy knows nothing of any of these.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config import Upstream
from gateway.dialects.drivers import NONE, CostDrivers
from gateway.errors import BadRequest, GatewayError
from gateway.usage import Usage

#: Request headers never forwarded upstream: credentials, hop-by-hop, ones aiohttp sets itself, and
#: Content-Encoding (the gateway reads the body decoded and forwards it so, see `read_body`).
DROP_REQUEST_HEADERS = frozenset({
    "authorization", "x-api-key", "x-goog-api-key", "api-key", "openai-organization", "openai-project",
    "host", "content-length", "connection", "keep-alive", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "accept-encoding", "cookie", "x-admin-key",
    "x-goog-fieldmask",  # a field mask could strip usageMetadata from the answer the bill is read from
    "content-encoding", "expect",
})


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """What the gateway needs to know about a request body, in dialect-neutral terms."""

    endpoint: str
    model: str
    stream: bool
    body: dict[str, Any]
    cap_field: str | None  # the output-cap field the client used (None: not given)
    output_cap: int | None  # the cap per choice the client asked for
    choices: int
    prompt_tokens_bound: int  # an upper bound on prompt tokens (text); see gotchas in the README
    prompt_tokens_estimate: int  # a typical-case estimate, used only when usage never arrives
    drivers: CostDrivers = NONE  # what else the provider prices (tier, built-in tools, …): see admit()
    raw: bytes = b""  # the body as received (b"": not kept), for changes spliced into it


class StreamMeter(Protocol):
    """Watches a streamed answer: returns the bytes to forward and collects usage."""

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...

    @property
    def usage(self) -> Usage | None: ...

    def estimated_output_tokens(self) -> int:
        """Output tokens estimated from the text relayed, for a stream whose usage does not report
        the output (0 when it does: the estimate is then never billed)."""
        ...


class Dialect(Protocol):
    """One wire format. Adding a provider family means one module implementing this."""

    name: str
    json_body: bool  # requests must be application/json

    def client_key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        """The gateway key as this dialect's SDKs send it (None when absent)."""
        ...

    def upstream_path(self, path: str) -> str:
        """The request path as it goes below the upstream's base URL."""
        ...

    def parse_request(self, endpoint: str, raw: bytes, max_choices: int, path_model: str | None = None,
                      headers: Mapping[str, str] | None = None) -> ParsedRequest:
        """Validate and parse a request body (`path_model`: a model named in the URL, Gemini-style;
        `headers`: the request's, for features switched on by a header); raise BadRequest with a
        clear message."""
        ...

    def upstream_body(
        self, req: ParsedRequest, upstream: Upstream, lowered_cap: int | None
    ) -> tuple[bytes | None, bool]:
        """The body to send upstream (None: forward the client's bytes unchanged), and whether
        the stream carries usage the client did not ask for (to be hidden from it)."""
        ...

    def upstream_headers(self, upstream: Upstream, incoming: Mapping[str, str]) -> dict[str, str]:
        """Forwarded headers without the client's credentials, with the provider key injected."""
        ...

    def usage_from_body(self, endpoint: str, body: bytes) -> Usage | None:
        """Usage from a whole (non-streamed) response body."""
        ...

    def stream_meter(self, endpoint: str, hide_usage: bool) -> StreamMeter:
        """A fresh meter for one streamed answer."""
        ...

    def error_response(self, error: GatewayError) -> tuple[int, bytes]:
        """Status and JSON body of a gateway error in this dialect's shape."""
        ...

    def stream_error_event(self, message: str) -> bytes:
        """An in-stream error event the dialect's SDKs raise on (status already 200)."""
        ...


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook: a JSON object as a dict, refusing a key given twice. Parsers disagree on
    which of two values wins (the first, the last), so the upstream could act on a value the gateway
    never priced."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


#: Built once: `json.loads` with a hook builds a decoder per call (a third of a small body's parse).
_UNIQUE_KEYS_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object; anything else is a 400 with a clear message.
    A key repeated in any object, at any depth, is refused (a parser differential), and so is
    nesting too deep for the parser."""
    if not raw.strip():
        raise BadRequest("The request body is empty; send a JSON object.")
    try:
        # what json.loads does with bytes: UTF-8/16/32 detected, lone surrogates kept
        body = _UNIQUE_KEYS_DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except _DuplicateKey as dup:
        raise BadRequest(f"The JSON body repeats the key {dup.key!r} in one object; send each key once.",
                         param=dup.key) from None
    except RecursionError:
        raise BadRequest("The JSON body is nested too deeply.") from None
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("We could not parse the JSON body of your request. "
                         "Send valid JSON with Content-Type: application/json.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


#: Longest model name accepted; real ones are well under 100 characters.
MAX_MODEL_NAME = 256
_BAD_MODEL_CHARS = re.compile(r"[\\%\s\x00-\x1f\x7f]")


def checked_model(value: Any, param: str = "model", *, in_path: bool = False) -> str:
    """A model name safe to route, price and forward: no `..`, backslash, percent-encoding, whitespace
    or control characters, at most MAX_MODEL_NAME characters. In a body, `org/model` names (OpenRouter,
    vLLM) are fine: route globs never cross '/'. A name in a URL path may contain neither '/' nor ':'
    (which separates it from the method). Raises BadRequest naming `param`."""
    if not isinstance(value, str) or not value.strip():
        raise BadRequest("You must provide a model name.", param=param)
    if (len(value) > MAX_MODEL_NAME or _BAD_MODEL_CHARS.search(value) or ".." in value
            or (in_path and (":" in value or "/" in value)) or value.startswith("/") or value.endswith("/")):
        shown = value[:60].encode("unicode_escape").decode("ascii")
        where = "in a URL path no '/' or ':', and " if in_path else ""
        raise BadRequest(f"Invalid model name {shown!r}: a model name has at most {MAX_MODEL_NAME} characters, "
                         f"{where}no '\\', '..', '%', whitespace or control characters.", param=param)
    return value


def media_parts(raw: bytes, pattern: re.Pattern[bytes], body: Any, names: frozenset[str],
                type_only: bool = False) -> int:
    """How many media parts (images, audio, files) a request carries: `pattern` counted on the raw
    bytes, or, when the body uses JSON escapes (which could spell a name past the pattern), the
    parsed body walked for the same `names` as keys or string values (`type_only`: only as the
    value of a "type" key)."""
    if b"\\u" not in raw:
        return len(pattern.findall(raw))
    count, stack = 0, [body]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                count += not type_only and key in names
                if isinstance(value, str):
                    count += value in names and (key == "type" or not type_only)
                elif isinstance(value, dict | list):
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(item for item in node if isinstance(item, dict | list))
    return count


_WS = b" \t\r\n"  # JSON's whitespace


def splice_field(raw: bytes, member: bytes) -> bytes | None:
    """`raw`, a JSON object the caller has parsed (and checked has no such key), with `member`
    (`"name":value`) added as its last member, without re-serialising the rest. None when the bytes
    are not plain UTF-8 starting with `{` (a BOM, UTF-16 or UTF-32: the caller re-serialises)."""
    start, end = 0, len(raw)
    while start < end and raw[start] in _WS:
        start += 1
    while end > start and raw[end - 1] in _WS:
        end -= 1
    if end - start < 2 or raw[start] != ord("{") or raw[end - 1] != ord("}") or b"\x00" in raw:
        return None
    head = end - 1  # the closing brace; the new member goes before it, after the last one
    while raw[head - 1] in _WS:
        head -= 1
    comma = b"" if head - 1 == start else b","  # an empty object has no member to follow
    return b"".join((memoryview(raw)[start:head], comma, member, b"}"))  # one copy of a large body


_DECODER = json.JSONDecoder()


def top_level_fields(body: bytes, names: tuple[bytes, ...]) -> dict[str, Any] | None:
    """The named members of a response object, read where they are instead of parsing the whole
    answer (usage sits in its tail). None when that cannot be done unambiguously: the body does
    not look like one JSON object, a name appears more than once (it could be nested) or its value
    does not parse; the caller then parses all of it. A name found as a key is a key: inside a JSON
    string its quotes would be escaped."""
    text = body.strip()
    if not (text.startswith(b"{") and text.endswith(b"}")) or b"\\u" in text:
        return None  # not one object, or escapes that could spell a name: parse all of it
    found: dict[str, Any] = {}
    for name in names:
        quoted = b'"' + name + b'"'
        at = text.find(quoted)
        if at < 0:
            continue
        if text.find(quoted, at + len(quoted)) >= 0:
            return None
        colon = at + len(quoted)
        while colon < len(text) and text[colon] in _WS:
            colon += 1
        if colon >= len(text) or text[colon] != ord(":"):
            return None
        start = colon + 1
        try:
            value, _end = _DECODER.raw_decode(text[start:].lstrip(_WS).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        found[name.decode()] = value
    return found


def forward_headers(incoming: Mapping[str, str]) -> dict[str, str]:
    """Copy request headers minus credentials and hop-by-hop ones, including those the request's
    `Connection` header declares hop-by-hop (RFC 9110 §7.6.1)."""
    declared = {token.strip().lower() for name, value in incoming.items() if name.lower() == "connection"
                for token in value.split(",")}
    out = {name: value for name, value in incoming.items()
           if name.lower() not in DROP_REQUEST_HEADERS and name.lower() not in declared}
    out["Accept-Encoding"] = "identity"  # parse plain bytes; forward them unchanged
    return out


def inject_provider_key(headers: dict[str, str], upstream: Upstream) -> dict[str, str]:
    """Add the provider key from config in the upstream's auth style."""
    key = upstream.api_key.reveal()
    if key:
        if upstream.auth == "bearer":
            headers["Authorization"] = f"Bearer {key}"
        elif upstream.auth == "x-api-key":
            headers["x-api-key"] = key
        elif upstream.auth == "x-goog-api-key":
            headers["x-goog-api-key"] = key
    return headers

"""A review's attacks on the lean upstream client (gateway/upstream_client.py) and on the
metered handler that forwards and settles in its own task. Each test fails on the code it was
written against; its comment says the attack and what the gateway should do instead."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import Harness, fake_demo_upstream

AUTH = "Authorization"


async def chat(request: web.Request) -> web.Response:
    body = await request.json()
    said = body["messages"][-1]["content"]
    # "big": an answer whose body is larger than the client's HIGH_WATER (256 KiB): a key holder gets
    # one by asking for a long answer (or many choices)
    text = "word " * (80_000 if said == "big" else 10)
    usage = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
    return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                           "finish_reason": "stop"}], "usage": usage})


@pytest.fixture
async def emulator(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with fake_demo_upstream(app, monkeypatch) as server:
        yield server


def _usage_events(harness: Harness, account: str) -> list[dict[str, str]]:
    return [e for e in harness.ledger(account) if e["type"] == "usage"]


async def test_a_big_answer_does_not_leave_a_paused_connection_in_the_pool(harness: Harness) -> None:
    """Attack: ask for an answer larger than HIGH_WATER (256 KiB), not streamed. `read()` does not
    take chunks until the end, so every packet past 256 KiB pauses the transport (`feed`), including
    the last one, in which llhttp completes the message and `on_message_complete` puts the connection
    back in the pool, still paused (the response let go of it: nothing resumes it). The next request
    to the same upstream (anyone's) is written on that connection, its answer is never read, and it
    waits for the upstream's read timeout (60 s here, 600 s by default) and is answered 504 and not
    charged, although the provider served it. Expected: a connection is pooled reading (or closed),
    and the next request is answered 200 and charged."""
    account, key = await harness.account(credits=10)
    big = {"model": "demo-mini", "messages": [{"role": "user", "content": "big"}]}
    async with harness.client.post("/v1/chat/completions", json=big, headers={AUTH: f"Bearer {key}"}) as resp:
        assert resp.status == 200
        assert len(await resp.read()) > 256 * 1024
    client = harness.gw.upstream
    assert client is not None
    pooled = [conn for idle in client._idle.values() for conn in idle if not conn.lost]
    paused = [conn for conn in pooled if conn.transport is not None and not conn.transport.is_reading()]
    small = {"model": "demo-mini", "messages": [{"role": "user", "content": "hi"}]}

    async def second() -> int:
        async with harness.client.post("/v1/chat/completions", json=small, headers={AUTH: f"Bearer {key}"}) as r:
            await r.read()
            return r.status

    try:
        status = await asyncio.wait_for(second(), 20)  # generous: the upstream answers in milliseconds
    except TimeoutError:
        status = None
    assert status == 200, f"second request: {status} ({len(paused)} pooled connection(s) left paused)"
    assert not paused
    assert len(_usage_events(harness, account)) == 2
    await harness.assert_conserved(account)


async def test_a_non_ascii_header_is_not_a_500(harness: Harness) -> None:
    """Attack: a header value with a byte that is not UTF-8 (b"\\xff"); aiohttp's server decodes it
    with surrogateescape, `forward_headers` forwards it, and the new client's head is packed with
    `.encode("utf-8")`, which raises UnicodeEncodeError: not an aiohttp.ClientError, so the handler
    dies with an internal error (500). Expected: a 4xx refusal (or the header forwarded as its bytes),
    never a 500, and nothing charged."""
    account, key = await harness.account(credits=10)
    _reader, writer = await asyncio.open_connection(harness.client.host, harness.client.port)
    body = json.dumps({"model": "demo-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\nX-Note: caf\xff\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    writer.write(head + body)
    answer = await _reader.read()
    writer.close()
    status = int(answer.split(b" ", 2)[1])
    assert status < 500, answer[:300]
    await harness.assert_conserved(account)


"""An upstream that misbehaves must not make the bill wrong: absurd usage counts, usage without an
output count, and a stream that falls silent after its client left. The fake upstream here speaks
OpenAI's wire format (PROVIDERS.md §2) but answers what a broken or hostile server might."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import Harness, fake_demo_upstream

AUTH = "Authorization"


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()


async def chat(request: web.Request) -> web.Response:
    body = await request.json()
    said = body["messages"][-1]["content"]
    usage: dict[str, Any] = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
    if said == "huge":
        usage = {"prompt_tokens": 10**18, "completion_tokens": 10**18, "total_tokens": 2 * 10**18}
    elif said == "no output count":
        usage = {"prompt_tokens": 9, "total_tokens": 9}
    text = "word " * 400
    answer = web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
                                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                             "finish_reason": "stop"}], "usage": usage})
    if said == "gzip":  # compressed although the gateway asked for identity
        answer.enable_compression(web.ContentCoding.gzip)
    return answer


async def responses(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await stream.prepare(request)
    response = {"id": "resp_1", "object": "response", "status": "in_progress", "model": body["model"],
                "usage": None, "output": []}
    await stream.write(_event("response.created", {"response": response}))
    for _ in range(30):
        await asyncio.sleep(0.05)
        await stream.write(_event("response.output_text.delta", {"delta": "word "}))
    await asyncio.sleep(3)  # the model reasons (invisibly) or runs a tool
    usage = {"input_tokens": 9, "output_tokens": 4000, "output_tokens_details": {"reasoning_tokens": 3995}}
    await stream.write(_event("response.completed", {"response": {**response, "status": "completed", "usage": usage}}))
    await stream.write_eof()
    return stream


@pytest.fixture
async def emulator(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/responses", responses)
    async with fake_demo_upstream(app, monkeypatch) as server:
        yield server


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"drain_seconds": 1.0}


def _usage_event(harness: Harness, account: str) -> dict[str, str]:
    return [e for e in harness.ledger(account) if e["type"] == "usage"][-1]


async def test_absurd_usage_counts_charge_what_the_balance_can_pay_and_nothing_is_half_written(
        harness: Harness) -> None:
    account, key = await harness.account(credits=10)
    body = {"model": "demo-mini", "messages": [{"role": "user", "content": "huge"}]}
    async with harness.client.post("/v1/chat/completions", json=body, headers={AUTH: f"Bearer {key}"}) as resp:
        assert resp.status == 200
    state = await harness.assert_conserved(account)
    event = _usage_event(harness, account)
    assert state["charged"] == int(event["cost"]) > 0 and int(event["uncollected"]) > 0
    assert state["allow"] + state["extra"] == 0  # everything there was, and not a unit more


async def test_usage_without_an_output_count_is_billed_an_output_estimate_not_zero(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    body = {"model": "demo-mini", "messages": [{"role": "user", "content": "no output count"}]}
    async with harness.client.post("/v1/chat/completions", json=body, headers={AUTH: f"Bearer {key}"}) as resp:
        assert resp.status == 200
    await harness.assert_conserved(account)
    event = _usage_event(harness, account)
    assert event["estimated"] == "1" and int(event["in"]) == 9 and int(event["out"]) > 100


async def test_a_stream_still_silent_when_the_drain_time_ends_is_charged_its_whole_hold(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    body = {"model": "demo-mini", "stream": True, "input": "think", "max_output_tokens": 4000}
    resp = await harness.client.post("/v1/responses", json=body, headers={AUTH: f"Bearer {key}"})
    assert resp.status == 200
    await resp.content.readline()
    resp.close()  # the client leaves; the upstream falls silent for longer than drain_seconds
    await harness.assert_conserved(account)
    event = _usage_event(harness, account)
    assert event["outcome"] == "client_disconnected_estimated"
    assert int(event["cost"]) == int(event["hold"])  # unknown output: the provider may have made it all


async def test_an_answer_compressed_against_the_gateways_wish_is_decoded_billed_and_relayed_plain(
        harness: Harness) -> None:
    account, key = await harness.account(credits=10)
    body = {"model": "demo-mini", "messages": [{"role": "user", "content": "gzip"}]}
    resp = await harness.client.post("/v1/chat/completions", json=body, headers={AUTH: f"Bearer {key}"},
                                     auto_decompress=False)
    assert resp.status == 200 and "Content-Encoding" not in resp.headers
    answer = json.loads(await resp.read())  # plain JSON on the wire, as the gateway relays it
    assert answer["usage"]["completion_tokens"] == 5
    event = _usage_event(harness, account)
    assert (event["in"], event["out"], event["estimated"]) == ("9", "5", "0")
    await harness.assert_conserved(account)

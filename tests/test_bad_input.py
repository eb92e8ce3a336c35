"""Bad input gets the right 4xx in OpenAI's error shape and leaves nothing behind."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import SETUP_EVENTS, Harness, emulator_state

from gateway.keys import KeySchema

GOOD = {"model": "demo-mini", "messages": [{"role": "user", "content": "hi"}]}


async def _post(harness: Harness, key: str | None, body: bytes | str, content_type: str = "application/json",
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    sent = {"Content-Type": content_type, **(headers or {})}
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    resp = await harness.client.post("/v1/chat/completions", data=body, headers=sent)
    return resp.status, await resp.json()


def assert_openai_error(payload: dict[str, Any], etype: str | None = None) -> dict[str, Any]:
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if etype:
        assert error["type"] == etype
    return error


async def assert_nothing_left(harness: Harness, account: str) -> None:
    await harness.gw.quiesce()
    assert harness.holds(account) == {}
    state = harness.state(account)
    assert state["held"] == 0 and state["charged"] == 0
    # only the set-up's own events (account, grant, key), nothing from the refused request
    assert {e["type"] for e in harness.ledger(account)} <= set(SETUP_EVENTS)
    keys = KeySchema().for_account(account)
    assert harness.redis.zcard(keys.hold_expiry) == 0


BAD_BODIES = [
    pytest.param(b"{not json", 400, "invalid_request_error", None, id="malformed-json"),
    pytest.param(b"", 400, "invalid_request_error", None, id="empty-body"),
    pytest.param(b"[1, 2]", 400, "invalid_request_error", None, id="not-an-object"),
    pytest.param(json.dumps({"messages": GOOD["messages"]}), 400, "invalid_request_error", "model", id="no-model"),
    pytest.param(json.dumps({**GOOD, "model": ""}), 400, "invalid_request_error", "model", id="empty-model"),
    pytest.param(json.dumps({**GOOD, "model": 42}), 400, "invalid_request_error", "model", id="model-not-string"),
    pytest.param(json.dumps({"model": "demo-mini"}), 400, "invalid_request_error", "messages", id="no-messages"),
    pytest.param(json.dumps({**GOOD, "max_tokens": -5}), 400, "invalid_request_error", "max_tokens",
                 id="negative-max-tokens"),
    pytest.param(json.dumps({**GOOD, "max_tokens": 0}), 400, "invalid_request_error", "max_tokens",
                 id="zero-max-tokens"),
    pytest.param(json.dumps({**GOOD, "max_completion_tokens": 10**12}), 400, "invalid_request_error",
                 "max_completion_tokens", id="absurd-max-tokens"),
    pytest.param(json.dumps({**GOOD, "max_tokens": "many"}), 400, "invalid_request_error", "max_tokens",
                 id="max-tokens-not-int"),
    pytest.param(json.dumps({**GOOD, "max_tokens": True}), 400, "invalid_request_error", "max_tokens",
                 id="max-tokens-bool"),
    pytest.param(json.dumps({**GOOD, "n": 2}), 400, "invalid_request_error", "n", id="n-above-limit"),
    pytest.param(json.dumps({**GOOD, "n": 0}), 400, "invalid_request_error", "n", id="n-zero"),
    pytest.param(json.dumps({**GOOD, "stream": "yes"}), 400, "invalid_request_error", "stream", id="stream-not-bool"),
    pytest.param(json.dumps({**GOOD, "stream_options": {"include_usage": True}}), 400, "invalid_request_error",
                 "stream_options", id="stream-options-without-stream"),
]


@pytest.mark.parametrize(("body", "status", "etype", "param"), BAD_BODIES)
async def test_bad_body_is_refused_in_openai_shape_and_leaves_nothing(
        harness: Harness, body: bytes | str, status: int, etype: str, param: str | None) -> None:
    account, key = await harness.account(credits=1)
    before = emulator_state(harness.emulator).total_requests
    got, payload = await _post(harness, key, body)
    assert got == status
    error = assert_openai_error(payload, etype)
    assert error["param"] == param
    assert emulator_state(harness.emulator).total_requests == before
    await assert_nothing_left(harness, account)


async def test_unknown_model_is_404_model_not_found(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    status, payload = await _post(harness, key, json.dumps({**GOOD, "model": "no-such-model"}))
    assert status == 404
    assert assert_openai_error(payload)["code"] == "model_not_found"
    await assert_nothing_left(harness, account)


async def test_non_json_content_type_is_415(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    status, payload = await _post(harness, key, "model=demo-mini", content_type="application/x-www-form-urlencoded")
    assert status == 415
    assert "application/json" in assert_openai_error(payload, "invalid_request_error")["message"]
    await assert_nothing_left(harness, account)


async def test_body_over_the_limit_is_413(harness: Harness, config_dir, redis_url, aiohttp_client) -> None:
    from conftest import make_settings

    from gateway.app import create_app

    client = await aiohttp_client(create_app(make_settings(config_dir, redis_url, max_body_bytes=1024)))
    small = Harness(client, harness.redis, harness.emulator)
    account, key = await small.account(credits=1)
    big = json.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * 4096}]})
    status, payload = await _post(small, key, big)
    assert status == 413
    assert assert_openai_error(payload)["code"] == "request_too_large"
    await assert_nothing_left(small, account)


@pytest.mark.parametrize("header", [
    pytest.param(None, id="missing"),
    pytest.param("", id="empty"),
    pytest.param("Bearer ", id="empty-bearer"),
    pytest.param("Basic dXNlcjpwYXNz", id="wrong-scheme"),
    pytest.param("Bearer " + "k" * 4000, id="oversized"),
    pytest.param("Bearer gwk_wrong-key-that-does-not-exist", id="unknown-key"),
])
async def test_bad_authorization_is_401(harness: Harness, header: str | None) -> None:
    account, _key = await harness.account(credits=1)
    headers = {} if header is None else {"Authorization": header}
    status, payload = await _post(harness, None, json.dumps(GOOD), headers=headers)
    assert status == 401
    assert assert_openai_error(payload, "invalid_request_error")["code"] == "invalid_api_key"
    await assert_nothing_left(harness, account)


async def test_unicode_in_the_key_is_401(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    mangled = ("Bearer " + key[:-2] + "é✓").encode().decode("latin-1")
    resp = await harness.client.post("/v1/chat/completions", data=json.dumps(GOOD),
                                     headers={"Content-Type": "application/json", "Authorization": mangled})
    assert resp.status == 401
    assert_openai_error(await resp.json())
    await assert_nothing_left(harness, account)


async def test_error_responses_carry_a_request_id(harness: Harness) -> None:
    _account, key = await harness.account(credits=1)
    resp = await harness.client.post("/v1/chat/completions", data=b"{", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    assert resp.status == 400
    assert resp.headers["x-request-id"].startswith("req_")


async def test_unknown_route_answers_in_openai_shape(harness: Harness) -> None:
    resp = await harness.client.get("/v1/nothing-here")
    assert resp.status == 404
    assert_openai_error(await resp.json())

"""Hot reload: file changes and SIGHUP swap the configuration between requests; bad edits are refused."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_PLANS, Harness

BODY = {"model": "demo-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi [[emu out=3]]"}]}
PER_CALL = TEST_PLANS.replace('models: ["demo-*", "gpt-4o-mini", "claude-*"]',
                              'models: ["demo-*", "gpt-4o-mini", "claude-*"]\n'
                              '    pricing: {demo-mini: {credits_per_call: 1}}')


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"config_poll_seconds": 0.02}


async def _flow(harness: Harness, key: str, stop: asyncio.Event, statuses: list[int]) -> None:
    while not stop.is_set():
        async with harness.client.post("/v1/chat/completions", json=BODY,
                                       headers={"Authorization": f"Bearer {key}"}) as resp:
            await resp.read()
            statuses.append(resp.status)


async def _until(predicate: Any) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)  # the watcher polls the files every 20 ms
    raise AssertionError("the configuration was not reloaded")


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # the way editors and deploy tools swap a file: never half-written


async def test_valid_and_invalid_edits_while_requests_flow(harness: Harness, config_dir: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    account, key = await harness.account(credits=100000)
    stop, statuses = asyncio.Event(), []
    flows = [asyncio.create_task(_flow(harness, key, stop, statuses)) for _ in range(4)]
    try:
        before = harness.gw.config
        _write(config_dir / "plans.yaml", PER_CALL)
        await _until(lambda: harness.gw.config is not before)
        caplog.set_level(logging.ERROR, logger="gateway.config")
        valid = harness.gw.config
        _write(config_dir / "plans.yaml", PER_CALL.replace("monthly_credits: 0", "monthly_credits: lots", 1))
        await _until(lambda: "configuration reload rejected" in caplog.text)
        _write(config_dir / "providers.yaml", "upstreams: [not, a, mapping]\n")
        await _until(lambda: caplog.text.count("configuration reload rejected") >= 2)
        await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*flows)
    assert harness.gw.config is valid  # the running configuration stayed through both bad edits
    assert "plans.yaml: plans.free.monthly_credits: expected a number" in caplog.text
    assert "providers.yaml: models: is required" in caplog.text
    assert "providers.yaml: upstreams: expected a mapping, got list" in caplog.text  # every problem, at once
    assert set(statuses) == {200} and len(statuses) > 20  # no request failed because of a reload
    metrics = await (await harness.client.get("/metrics")).text()
    assert 'gateway_config_reloads_total{result="error"} 2.0' in metrics
    assert 'gateway_config_reloads_total{result="ok"} 1.0' in metrics
    # the plan's new definition applies from the next request: one credit per call
    charged = harness.state(account)["charged"]
    async with harness.client.post("/v1/chat/completions", json=BODY,
                                   headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200
    assert harness.state(account)["charged"] - charged == 1_000_000
    await harness.assert_conserved(account)


@pytest.mark.parametrize("settings_overrides", [{"config_poll_seconds": 3600.0}])
async def test_sighup_reloads_without_waiting_for_the_poll(harness: Harness, config_dir: Path) -> None:
    before = harness.gw.config
    (config_dir / "plans.yaml").write_text(PER_CALL)
    await asyncio.sleep(0)  # let the watcher start waiting
    os.kill(os.getpid(), signal.SIGHUP)
    await _until(lambda: harness.gw.config is not before)
    route = harness.gw.config.route("demo-mini")
    assert route is not None and harness.gw.config.rates("free", route).per_request == 1_000_000

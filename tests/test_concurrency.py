"""Invariant 1 (no overspend) and 2 (conservation) under concurrency, across gateway processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ADMIN_KEY, LOOP_LAG_TOLERANT, ROOT, Harness, make_settings

from gateway.app import create_app
from gateway.dialects.openai import OpenAIDialect
from gateway.embedded import free_port
from gateway.metering import quote
from gateway.state import GATEWAY


# These tests run the client, the gateways and the fake provider in one event loop: hundreds of requests
# at once lag that loop by more than the half-second fail-closed deadline on a slow machine, which would
# turn healthy Redis answers into 503s. The deadline itself is tested in test_redis_failure.
@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return LOOP_LAG_TOLERANT


BODY = {"model": "demo-mini", "max_tokens": 12, "messages": [{"role": "user", "content": "hi"}]}


async def _fire(session: aiohttp.ClientSession, url: str, key: str, stream: bool) -> tuple[int, str]:
    body = {**BODY, "stream": stream}
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, await resp.text()


def assert_no_overspend(harness: Harness, account: str, statuses: list[int]) -> None:
    """Every served request was paid for out of its own hold: nothing uncollected, nothing negative."""
    usage = [e for e in harness.ledger(account) if e["type"] == "usage"]
    assert len(usage) == statuses.count(200)  # one event per served request
    assert all(int(e["uncollected"]) == 0 for e in usage)
    assert all(int(e["cost"]) <= int(e["hold"]) for e in usage)
    state = harness.state(account)
    assert state["charged"] <= state["granted"]
    assert state["allow"] >= 0 and state["extra"] >= 0


async def test_500_concurrent_requests_never_overspend(harness: Harness) -> None:
    account, key = await harness.account(credits="0.002")  # 2000 micro: about 200 answers, not 600
    url = str(harness.client.make_url("/v1/chat/completions"))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        results = await asyncio.gather(*(_fire(session, url, key, stream=i % 2 == 0) for i in range(600)))
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 402}, set(statuses)
    assert statuses.count(402) > 0 and statuses.count(200) > 0
    await harness.assert_conserved(account)
    assert_no_overspend(harness, account, statuses)
    # refusals came from outstanding holds: once quiet, the rest is spendable down to the last request
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            status, _ = await _fire(session, url, key, stream=False)
            if status == 402:
                break
            statuses.append(status)
    state = await harness.assert_conserved(account)
    assert_no_overspend(harness, account, statuses)
    # the final 402 was right: what remains does not cover the prompt bound plus one output token
    remaining = state["granted"] - state["charged"]
    raw = json.dumps({**BODY, "stream": False}).encode()
    parsed = OpenAIDialect().parse_request("chat", raw, 1)
    route = harness.gw.config.route("demo-mini")
    assert route is not None
    q = quote(harness.gw.config.rates("free", route), parsed.prompt_tokens_bound, 12)
    assert remaining < q.min_cost


async def test_two_gateway_apps_share_one_balance_exactly(harness: Harness, config_dir: Path, redis_url: str,
                                                          aiohttp_client: Any) -> None:
    other = await aiohttp_client(create_app(make_settings(config_dir, redis_url, **LOOP_LAG_TOLERANT)))
    account, key = await harness.account(credits="0.001")
    urls = [str(harness.client.make_url("/v1/chat/completions")), str(other.make_url("/v1/chat/completions"))]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        results = await asyncio.gather(*(_fire(session, urls[i % 2], key, stream=i % 3 == 0) for i in range(400)))
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 402}
    await harness.assert_conserved(account, other.app[GATEWAY])
    assert_no_overspend(harness, account, statuses)


def _spawn_gateway(port: int, config_dir: Path, redis_url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "GATEWAY_ADMIN_KEY": ADMIN_KEY,
           "GATEWAY_REDIS_TIMEOUT_SECONDS": str(LOOP_LAG_TOLERANT["redis_timeout_seconds"])}
    return subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--config-dir", str(config_dir),
         "--redis-url", redis_url], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def _wait_ready(session: aiohttp.ClientSession, port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "gateway exited")
        try:
            async with session.get(f"http://127.0.0.1:{port}/ready") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)  # a separate OS process: nothing in this loop to await instead
    raise RuntimeError("gateway process did not become ready")


async def test_separate_gateway_processes_never_overspend(harness: Harness, config_dir: Path,
                                                          redis_url: str) -> None:
    account, key = await harness.account(credits="0.001")
    ports = [free_port(), free_port()]
    procs = [_spawn_gateway(port, config_dir, redis_url) for port in ports]
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for port, proc in zip(ports, procs, strict=True):
                await _wait_ready(session, port, proc)
            urls = [f"http://127.0.0.1:{port}/v1/chat/completions" for port in ports]
            results = await asyncio.gather(*(_fire(session, urls[i % 2], key, stream=i % 2 == 0) for i in range(300)))
    finally:
        for proc in procs:
            proc.terminate()  # graceful: aiohttp finishes settlements in its cleanup
        for proc in procs:
            proc.wait(timeout=20)
            if proc.stderr:
                proc.stderr.close()
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 402}
    assert statuses.count(200) > 0 and statuses.count(402) > 0
    await harness.assert_conserved(account)
    assert_no_overspend(harness, account, statuses)

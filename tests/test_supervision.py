"""Children that die are restarted: the workers by the master, the embedded redis-server by the
process that owns it (with its data); and when they keep dying the gateway says so (exit status, 503
from /health) so that an orchestrator acts."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from conftest import ADMIN, Harness
from served import Served, account_with_key, get_json, serve, wait_ready, wait_until

from gateway.embedded import EmbeddedRedis, free_port
from gateway.supervision import EmbeddedStatus, RestartBudget, keep_running

BODY = {"model": "demo-mini", "messages": [{"role": "user", "content": "hi"}]}


async def _chat(served: Served, key: str, timeout: float = 10) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session, session.post(
            served.url("/v1/chat/completions"), json=BODY, headers={"Authorization": f"Bearer {key}"}) as resp:
        await resp.read()
        return resp.status


async def _pids(served: Served, want: int) -> set[int]:
    seen: set[int] = set()

    async def enough() -> bool:
        status, body = await get_json(served.url("/health"))
        if status == 200:
            seen.add(body["pid"])
        return len(seen) >= want

    await wait_until(enough, f"{want} worker(s) answering /health")
    return seen


# ---------------------------------------------------------------- the restart budget


def test_restarts_back_off_and_stop_past_the_cap_within_a_minute() -> None:
    now = [0.0]
    budget = RestartBudget(0.5, 3, max_delay=1.5, clock=lambda: now[0])
    assert [budget.next_delay(), budget.next_delay(), budget.next_delay()] == [0.5, 1.0, 1.5]
    assert budget.next_delay() is None  # a fourth within the minute: give up
    now[0] = 60.0  # a minute after the first ones: allowed again, from the first delay
    assert budget.next_delay() == 0.5


# ---------------------------------------------------------------- workers


async def test_a_killed_worker_is_replaced_while_the_other_keeps_serving(
        tmp_path: Path, config_dir: Path, redis_url: str, emulator: TestServer) -> None:
    served = serve(tmp_path, config_dir, "--workers", "2", redis_url=redis_url)
    try:
        await wait_ready(served)
        workers = await _pids(served, 2)
        _account, key = await account_with_key(served)
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)

        async def noticed() -> bool:
            return f"worker {victim} exited (status -9)" in served.log()

        await wait_until(noticed, "the master to notice the dead worker")
        assert [await _chat(served, key) for _ in range(10)] == [200] * 10  # the survivor serves meanwhile
        replaced: set[int] = set()

        async def new_worker() -> bool:
            status, body = await get_json(served.url("/health"))
            if status == 200 and body["pid"] not in workers:
                replaced.add(body["pid"])
            return bool(replaced)

        await wait_until(new_worker, "a new worker")
        assert victim not in await _pids(served, 2)
    finally:
        assert served.stop() == 0


async def test_workers_that_keep_dying_stop_the_gateway_with_an_error(
        tmp_path: Path, config_dir: Path, redis_url: str) -> None:
    taken = socket.socket()  # the admin port, held without SO_REUSEPORT: no worker can start
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    served = serve(tmp_path, config_dir, "--workers", "2", "--admin-port", str(taken.getsockname()[1]),
                   redis_url=redis_url,
                   env={"GATEWAY_RESTART_BACKOFF_SECONDS": "0.05", "GATEWAY_MAX_RESTARTS_PER_MINUTE": "2"})
    try:
        code = await asyncio.to_thread(served.proc.wait, 60)
        assert code == 1
        log = served.log()
        assert log.count("starting another in") == 2
        assert "workers keep dying (more than 2 restarts in a minute): stopping the gateway" in log
    finally:
        taken.close()
        served.stop()


# ---------------------------------------------------------------- the embedded redis-server


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_killed_embedded_redis_fails_closed_then_comes_back_with_its_data(
        tmp_path: Path, config_dir: Path, emulator: TestServer, workers: int) -> None:
    served = serve(tmp_path, config_dir, "--workers", str(workers), env={"GATEWAY_RESTART_BACKOFF_SECONDS": "1"})
    try:
        await wait_ready(served)
        account, key = await account_with_key(served)
        assert await _chat(served, key) == 200
        status, before = await get_json(served.url(f"/admin/accounts/{account}"), headers=ADMIN)
        assert status == 200 and before["requests"] == 1
        redis_pid = served.embedded_redis_pid()
        assert redis_pid is not None
        os.kill(redis_pid, signal.SIGKILL)

        started = time.monotonic()
        assert await _chat(served, key, timeout=1) == 503  # fails closed, at once
        assert time.monotonic() - started < 1
        status, health = await get_json(served.url("/health"))
        assert status == 200 and health["redis"] == "down"  # alive: it restarts Redis itself
        assert (await get_json(served.url("/ready")))[0] == 503

        async def ready_again() -> bool:
            return (await get_json(served.url("/ready")))[0] == 200

        await wait_until(ready_again, "Redis to be restarted")
        assert served.embedded_redis_pid() not in (None, redis_pid)
        status, after = await get_json(served.url(f"/admin/accounts/{account}"), headers=ADMIN)
        assert status == 200
        assert after == before  # the append-only file brought every balance back
        assert await _chat(served, key) == 200
        status, health = await get_json(served.url("/health"))
        assert status == 200 and health["redis"] == "up"
        if workers == 1:  # the serving process owns the server and says how it went (once the restart returned)
            async def running() -> bool:
                body = (await get_json(served.url("/health")))[1]
                return body["embedded_redis"] == "running" and body["embedded_redis_restarts"] == 1

            await wait_until(running, "/health to report the restart", timeout=10)
        assert "the embedded redis-server exited (status -9); restarting it in 1.0 s" in served.log()
    finally:
        assert served.stop() == 0


async def test_an_embedded_redis_that_keeps_dying_is_given_up_on(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r", port=free_port(), persist=True)
    server.start()
    status = EmbeddedStatus()
    supervisor = asyncio.create_task(keep_running(server, RestartBudget(0.01, 1), status, lambda: False, 0.01))
    try:
        first = server._proc
        assert first is not None
        first.kill()

        async def restarted() -> bool:
            return status.restarts == 1 and server.running

        await wait_until(restarted, "the restart")
        assert server._proc is not first and server._proc is not None
        server._proc.kill()
        await asyncio.wait_for(supervisor, 10)  # the second death within the minute: it stops trying
        assert status.state == "failed" and not server.running
    finally:
        supervisor.cancel()
        server.stop()


async def test_health_answers_503_when_the_embedded_redis_is_given_up_on(harness: Harness) -> None:
    harness.gw.embedded = EmbeddedStatus(state="failed", restarts=5)
    resp = await harness.client.get("/health")
    body: dict[str, Any] = await resp.json()
    assert resp.status == 503
    assert body["status"] == "failed" and body["embedded_redis"] == "failed" and body["pid"] == os.getpid()

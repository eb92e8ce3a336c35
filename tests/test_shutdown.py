"""SIGTERM drains: no new connections, requests in flight (streams too) finish within the grace period
and are settled, then the process exits 0."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
from pathlib import Path

import aiohttp
import pytest
import redis as sync_redis
from aiohttp.test_utils import TestServer
from conftest import make_settings
from served import Served, account_with_key, get_json, serve, wait_ready, wait_until

from gateway import logs
from gateway.app import create_app
from gateway.cli_serve import _serve
from gateway.embedded import free_port
from gateway.keys import KeySchema
from gateway.ledger import parse_entry

SLOW_STREAM = {"model": "demo-mini", "stream": True, "max_tokens": 100,
               "messages": [{"role": "user", "content": "go [[emu out=40 delay_ms=50]]"}]}
CHAT = {"model": "demo-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


async def _refused(served: Served) -> bool:
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # accepted into the backlog just as the listener closed: look again
        return False
    writer.close()
    return False


def _content(stream: bytes) -> list[str]:
    pieces = []
    for line in stream.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:])["choices"]:
                pieces.append(choice["delta"].get("content") or "")
    return [p for p in pieces if p]


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_lets_a_stream_in_flight_finish_and_settle_then_exits_0(
        tmp_path: Path, config_dir: Path, redis_url: str, emulator: TestServer, workers: int) -> None:
    served = serve(tmp_path, config_dir, "--workers", str(workers), redis_url=redis_url)
    try:
        await wait_ready(served)
        account, key = await account_with_key(served)
        async with aiohttp.ClientSession() as session, session.post(
                served.url("/v1/chat/completions"), json=SLOW_STREAM,
                headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status == 200
            request_id = resp.headers["x-request-id"]
            first = await resp.content.readline()  # the stream has begun
            served.proc.send_signal(signal.SIGTERM)
            await wait_until(lambda: _refused(served), "new connections to be refused", timeout=5)
            stream = first + await resp.read()
        assert len(_content(stream)) == 40 and stream.rstrip().endswith(b"data: [DONE]")
        assert await asyncio.to_thread(served.proc.wait, 60) == 0
    finally:
        served.stop()
    client = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        events = [parse_entry(i, f) for i, f in client.xrange(KeySchema().for_account(account).ledger)]
    finally:
        client.close()
    usage = [e for e in events if e["type"] == "usage"]
    assert [(e["rid"], e["outcome"], int(e["out"])) for e in usage] == [(request_id, "ok", 40)]
    assert "shutting down: no new connections; 1 metered request(s) in flight" in served.log()


async def test_a_stream_longer_than_the_grace_period_is_cut_at_its_end_and_still_charged(
        tmp_path: Path, config_dir: Path, redis_url: str, emulator: TestServer) -> None:
    served = serve(tmp_path, config_dir, redis_url=redis_url, env={"GATEWAY_SHUTDOWN_GRACE_SECONDS": "0.3"})
    try:
        await wait_ready(served)
        account, key = await account_with_key(served)
        async with aiohttp.ClientSession() as session, session.post(
                served.url("/v1/chat/completions"), json=SLOW_STREAM,
                headers={"Authorization": f"Bearer {key}"}) as resp:
            request_id = resp.headers["x-request-id"]
            stream = await resp.content.readline()
            served.proc.send_signal(signal.SIGTERM)
            with pytest.raises(aiohttp.ClientPayloadError):
                stream += await resp.read()  # cut at the deadline, well before its 40 chunks
        assert await asyncio.to_thread(served.proc.wait, 60) == 0
    finally:
        served.stop()
    client = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        events = [parse_entry(i, f) for i, f in client.xrange(KeySchema().for_account(account).ledger)]
    finally:
        client.close()
    usage = [e for e in events if e["type"] == "usage"]
    # settled before the process exited, from the provider's own usage (read on after the cut)
    assert [(e["rid"], e["outcome"], int(e["out"])) for e in usage] == [(request_id, "client_disconnected", 40)]


async def test_a_sigterm_while_the_workers_are_still_starting_is_not_lost(
        tmp_path: Path, config_dir: Path, redis_url: str) -> None:
    served = serve(tmp_path, config_dir, "--workers", "2", redis_url=redis_url)
    try:
        async def started() -> bool:
            return served.log().count(" started") == 2

        await wait_until(started, "the master to start its workers")
        served.proc.send_signal(signal.SIGTERM)  # the workers are importing or connecting to Redis
        assert await asyncio.to_thread(served.proc.wait, 30) == 0
    finally:
        served.stop()


@pytest.mark.parametrize("workers", [1, 2])
async def test_the_access_lines_still_buffered_at_sigterm_are_written_once_each(
        tmp_path: Path, config_dir: Path, redis_url: str, emulator: TestServer, workers: int) -> None:
    served = serve(tmp_path, config_dir, "--workers", str(workers), redis_url=redis_url)
    request_ids = []
    try:
        await wait_ready(served)
        _account, key = await account_with_key(served)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
            for _ in range(25):
                async with session.post(served.url("/v1/chat/completions"), json=CHAT) as resp:
                    assert resp.status == 200, await resp.text()
                    request_ids.append(resp.headers["x-gateway-request-id"])
        served.proc.send_signal(signal.SIGTERM)  # the last lines are still buffered (written within 0.5 s)
        assert await asyncio.to_thread(served.proc.wait, 60) == 0
    finally:
        served.stop()
    lines = served.log().splitlines()
    for request_id in request_ids:
        assert sum(request_id in line and "outcome=served" in line for line in lines) == 1, request_id
    assert key not in served.log()


async def test_serve_writes_the_access_lines_still_buffered_when_it_stops(
        config_dir: Path, redis_url: str, emulator: TestServer, monkeypatch: pytest.MonkeyPatch,
        root_only: logging.Logger) -> None:
    """`gateway serve`'s serving loop, in this process, with the buffer's timer out of the way: only the
    stop can write the lines."""
    monkeypatch.setattr(logs, "ACCESS_FLUSH_SECONDS", 3600.0)
    stream = io.StringIO()
    logs.setup(fmt="text", stream=stream)
    settings = make_settings(config_dir, redis_url)
    port = free_port()
    serving = asyncio.create_task(_serve(create_app(settings), settings, "127.0.0.1", port, False))
    served = Served(None, port, config_dir, config_dir)  # type: ignore[arg-type]  # for its URLs only

    async def ready() -> bool:
        assert not serving.done()
        return (await get_json(served.url("/ready")))[0] == 200

    await wait_until(ready, "the gateway to be ready")
    _account, key = await account_with_key(served)
    request_ids = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        for _ in range(5):
            async with session.post(served.url("/v1/chat/completions"), json=CHAT) as resp:
                assert resp.status == 200
                request_ids.append(resp.headers["x-gateway-request-id"])
    os.kill(os.getpid(), signal.SIGTERM)  # _serve's handler: stop serving, clean up, write what is buffered
    await asyncio.wait_for(serving, 60)
    written = stream.getvalue()
    assert all(written.count(f" {rid} outcome=served") == 1 for rid in request_ids), written

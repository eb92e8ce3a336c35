"""`gateway serve` as a separate OS process, for the tests of what only a real process does: several
workers, signals, a redis-server killed under it. Each runs in a process group of its own, and
`Served.stop` ends it gracefully, then kills whatever of that group (and its embedded redis-server)
is left, by id."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis as sync_redis
from conftest import ADMIN, ADMIN_KEY, ROOT

from gateway.embedded import discover_url, free_port


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def embedded_redis_pid(self) -> int | None:
        """The pid of the embedded redis-server it runs, from the server itself (INFO)."""
        url = discover_url(self.data_dir)
        if url is None:
            return None
        client = sync_redis.Redis.from_url(url, socket_timeout=2)
        try:
            return int(client.info("server")["process_id"])
        except sync_redis.RedisError:
            return None
        finally:
            client.close()

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, wait, then SIGKILL what is left of its process group and its redis-server."""
        try:
            redis_pid = self.embedded_redis_pid()
        except Exception:  # never a reason to leave the processes running
            redis_pid = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group's leader is the process started here
        if redis_pid is not None:  # in a session of its own: only if its owner did not stop it
            with contextlib.suppress(ProcessLookupError):
                os.kill(redis_pid, signal.SIGKILL)
        return self.proc.wait(10)


def serve(tmp_path: Path, config_dir: Path, *args: str, redis_url: str | None = None,
          env: dict[str, str] | None = None) -> Served:
    """Start `python -m gateway serve` on a free port (embedded Redis in a data dir under tmp_path when
    no redis_url); its log goes to a file (a pipe nobody reads would block it)."""
    port = free_port()
    data_dir = tmp_path / "data"
    log_path = tmp_path / f"serve-{port}.log"
    command = [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--config-dir", str(config_dir), *args]
    if redis_url is not None:
        command += ["--redis-url", redis_url]
    full_env = {**os.environ, "GATEWAY_ADMIN_KEY": ADMIN_KEY, "GATEWAY_DATA_DIR": str(data_dir),
                "GATEWAY_REAP_INTERVAL_SECONDS": "3600", **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, env=full_env, cwd=ROOT, stdout=log, stderr=log,  # noqa: S603
                                start_new_session=True)
    return Served(proc, port, data_dir, log_path)


async def wait_until(check: Any, what: str, timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll `check()` (async, returning a truthy value when done) until it is: the other side is a
    separate OS process, nothing in this loop to await instead."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = await check()
        if found:
            return found
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


async def get_json(url: str, **kw: Any) -> tuple[int, Any]:
    """One request on a connection of its own (with several workers, each may land on another one);
    (0, None) when nothing answers."""
    try:
        async with aiohttp.ClientSession() as session, session.get(url, **kw) as resp:
            return resp.status, await resp.json(content_type=None)
    except (aiohttp.ClientError, OSError):
        return 0, None


async def wait_ready(served: Served, timeout: float = 60.0) -> None:
    async def ready() -> bool:
        if served.proc.poll() is not None:
            raise AssertionError(f"gateway serve exited with {served.proc.returncode}:\n{served.log()}")
        return (await get_json(served.url("/ready")))[0] == 200

    await wait_until(ready, "gateway serve to be ready", timeout)


async def account_with_key(served: Served, credits: str = "1") -> tuple[str, str]:
    """An account with `credits` and a key, made through the served gateway's admin API."""
    async with aiohttp.ClientSession(headers=ADMIN) as session:
        async with session.post(served.url("/admin/accounts"), json={"name": "t", "plan": "free"}) as resp:
            assert resp.status == 201, await resp.text()
            account_id = (await resp.json())["id"]
        async with session.post(served.url(f"/admin/accounts/{account_id}/credits"), json={"credits": credits}) as r:
            assert r.status == 200, await r.text()
        async with session.post(served.url(f"/admin/accounts/{account_id}/keys"), json={}) as resp:
            assert resp.status == 201, await resp.text()
            return account_id, (await resp.json())["key"]

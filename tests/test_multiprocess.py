"""With several worker processes, one scrape of any worker is the whole gateway's metrics
(prometheus-client's multiprocess mode, in a directory the master owns)."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from served import Served, account_with_key, get_json, serve, wait_ready, wait_until

from gateway import __version__
from gateway.metrics import Metrics

BODY = {"model": "demo-mini", "messages": [{"role": "user", "content": "hi"}]}
_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def samples(text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of every sample of one metric in an exposition text."""
    found = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match["name"] == name:
            found.append((match["labels"] or "", float(match["value"])))
    return found


async def _worker_pids(served: Served, want: int) -> set[int]:
    """Every worker's pid, from /health answers on fresh connections (the kernel spreads them)."""
    seen: set[int] = set()

    async def all_seen() -> bool:
        status, body = await get_json(served.url("/health"))
        if status == 200:
            seen.add(body["pid"])
        return len(seen) >= want

    await wait_until(all_seen, f"{want} workers to answer")
    return seen


async def _scrape(served: Served) -> tuple[int, str]:
    """/metrics and /health on one connection: the scrape and the pid of the worker that answered it."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        async with session.get(served.url("/metrics")) as resp:
            assert resp.status == 200
            text = await resp.text()
        async with session.get(served.url("/health")) as resp:
            return (await resp.json())["pid"], text


async def test_every_scrape_of_any_worker_counts_every_workers_requests(
        tmp_path: Path, config_dir: Path, redis_url: str, emulator: TestServer) -> None:
    served = serve(tmp_path, config_dir, "--workers", "2", redis_url=redis_url)
    try:
        await wait_ready(served)
        workers = await _worker_pids(served, 2)
        _account, key = await account_with_key(served)
        requests = 24
        for _ in range(requests):  # a connection each: the kernel spreads them over both workers
            async with aiohttp.ClientSession() as session, session.post(
                    served.url("/v1/chat/completions"), json=BODY, headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 200, await r.text()

        async def access_lines() -> list[str]:  # written within half a second (the access log is buffered)
            found = re.findall(r"^\S+ \S+ (\d+) INFO POST /v1/chat/completions 200", served.log(), re.M)
            return found if len(found) == requests else []

        served_by = {int(m) for m in await wait_until(access_lines, "every request's access line", timeout=10)}
        assert served_by == workers  # both workers counted some of them
        scraped: set[int] = set()
        for _ in range(40):
            pid, text = await _scrape(served)
            scraped.add(pid)
            assert sum(v for _, v in samples(text, "gateway_requests_total")) == requests, text
            assert samples(text, "gateway_open_holds") == [("", 0.0)]
            assert samples(text, "gateway_build_info") == [(f'version="{__version__}"', 1.0)]
            if scraped == workers:
                break
        assert scraped == workers
    finally:
        assert served.stop() == 0


def test_multiprocess_metrics_refuse_a_process_that_imported_prometheus_without_the_directory(
        tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="PROMETHEUS_MULTIPROC_DIR"):
        Metrics(tmp_path)


def test_a_single_process_exports_its_version(tmp_path: Path) -> None:
    text = Metrics().render().decode()
    assert samples(text, "gateway_build_info") == [(f'version="{__version__}"', 1.0)]

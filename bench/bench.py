"""Gateway overhead benchmark: the emulator called directly, through a bare aiohttp pass-through,
and through the gateway (auth + reserve + settle against a real redis-server), at a few
concurrencies, streaming and not. Prints requests/s, p50/p99 latency, the latency the hop adds over
the direct call, and server-side CPU per request (the proxy process's own CPU time, from /proc).

Everything runs on loopback with an instant upstream. The load generator shares the machine's
cores with the servers, so absolute figures are a floor; the comparison between rows is the point.

Usage: python bench/bench.py [--requests N] [--concurrency 1,16,64] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.embedded import EmbeddedRedis, free_port  # noqa: E402

ADMIN = "bench-admin-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    return total


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid, *(int(p) for p in out)]


async def wait_up(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(400):
            try:
                async with session.get(url) as resp:
                    if resp.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


async def one(session: aiohttp.ClientSession, url: str, key: str, stream: bool) -> float:
    body = {"model": "demo-mini", "max_tokens": 16, "stream": stream,
            "messages": [{"role": "user", "content": "benchmark request"}]}
    started = time.perf_counter()
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {await resp.text()}")
    return time.perf_counter() - started


async def load(url: str, key: str, stream: bool, concurrency: int, total: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    remaining = total

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            latencies.append(await one(session, url, key, stream))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for _ in range(min(50, total)):  # warm-up: connections, caches, scripts
            await one(session, url, key, stream)
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return elapsed, latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    redis = EmbeddedRedis(tmp / "redis", port=free_port(), persist=False)
    redis.start()
    emu_port, pass_port, gw_port = free_port(), free_port(), free_port()
    env = {**os.environ, "UPSTREAM_DEMO_BASE_URL": f"http://127.0.0.1:{emu_port}/v1", "UPSTREAM_DEMO_API_KEY": "bench",
           "GATEWAY_ADMIN_KEY": ADMIN, "PYTHONUNBUFFERED": "1"}
    py = sys.executable
    procs = {
        "emulator": subprocess.Popen([py, "-m", "gateway", "emulator", "--port", str(emu_port)], cwd=ROOT, env=env,
                                     stderr=subprocess.DEVNULL),
        "passthrough": subprocess.Popen([py, "bench/passthrough.py", str(pass_port),
                                         f"http://127.0.0.1:{emu_port}/v1"], cwd=ROOT, env=env),
        "gateway": subprocess.Popen([py, "-m", "gateway", "serve", "--port", str(gw_port), "--redis-url", redis.url,
                                     "--workers", str(args.workers)], cwd=ROOT, env=env,
                                    stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL),
    }
    try:
        await wait_up(f"http://127.0.0.1:{emu_port}/v1/models")
        await wait_up(f"http://127.0.0.1:{pass_port}/nothing")
        await wait_up(f"http://127.0.0.1:{gw_port}/health")
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
            base = f"http://127.0.0.1:{gw_port}/admin/accounts"
            account = await (await admin.post(base, json={"name": "bench", "plan": "free"})).json()
            await admin.post(f"{base}/{account['id']}/credits", json={"credits": 1_000_000})
            key = (await (await admin.post(f"{base}/{account['id']}/keys", json={})).json())["key"]
        targets = {
            "direct": (f"http://127.0.0.1:{emu_port}/v1/chat/completions", "emulator"),
            "passthrough": (f"http://127.0.0.1:{pass_port}/v1/chat/completions", "passthrough"),
            "gateway": (f"http://127.0.0.1:{gw_port}/v1/chat/completions", "gateway"),
        }
        rows = []
        for stream in (False, True):
            for level in levels:
                base_p50 = None
                for name, (url, proc) in targets.items():
                    pids = children(procs[proc].pid)
                    cpu0 = cpu_seconds(pids)
                    elapsed, lat = await load(url, key, stream, level, args.requests)
                    cpu = cpu_seconds(pids) - cpu0
                    p50 = pct(lat, 0.5)
                    if name == "direct":
                        base_p50 = p50
                    rows.append({"stream": stream, "concurrency": level, "target": name,
                                 "rps": len(lat) / elapsed, "p50_ms": p50, "p99_ms": pct(lat, 0.99),
                                 "added_p50_ms": p50 - (base_p50 or p50),
                                 "cpu_ms_per_req": cpu * 1000 / len(lat) if name != "direct" else None})
        print(f"\n{args.requests} requests per row, loopback, instant upstream, gateway workers: {args.workers}\n")
        print(f"{'mode':<7}{'conc':>5}  {'target':<12}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}"
              f"{'+p50 ms':>9}{'proxy CPU ms/req':>18}")
        for r in rows:
            cpu = f"{r['cpu_ms_per_req']:.3f}" if r["cpu_ms_per_req"] is not None else "-"
            print(f"{'stream' if r['stream'] else 'json':<7}{r['concurrency']:>5}  {r['target']:<12}{r['rps']:>8.0f}"
                  f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['added_p50_ms']:>9.2f}{cpu:>18}")
        out = ROOT / "bench" / "results"
        out.mkdir(exist_ok=True)
        (out / "latest.json").write_text(json.dumps(rows, indent=2))
        gateway_rows = [r for r in rows if r["target"] == "gateway"]
        print(f"\nmedian gateway CPU per request: "
              f"{statistics.median(r['cpu_ms_per_req'] for r in gateway_rows):.3f} ms")
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=20)
        redis.stop()


if __name__ == "__main__":
    asyncio.run(main())

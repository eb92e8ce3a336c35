"""Profile one gateway process under load: the app runs in this process under cProfile (or with
`--sample`, nothing: for a CPU-per-request figure without the profiler's own cost), nginx answers
canned answers, wrk drives it from its own core. Prints the top functions by own and cumulative time.

Usage: python bench/profile_gateway.py [--stream] [--seconds 5] [--concurrency 16] [--uvloop] [--top 40]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from upstream import start_nginx  # noqa: E402

from bench import ADMIN, PLANS, PLANS_LIMITED, PROVIDERS, body_of, run_wrk  # noqa: E402
from gateway.app import AccessLogger, create_app  # noqa: E402
from gateway.embedded import EmbeddedRedis, free_port  # noqa: E402
from gateway.settings import Settings  # noqa: E402

#: (component, test on "file:function") for the per-request breakdown of own (self) time, first match wins
COMPONENTS: list[tuple[str, Callable[[str], bool]]] = [
    ("socket send (kernel: loopback delivery)", lambda f: "'send' of '_socket.socket'" in f),
    ("socket recv + epoll (kernel)", lambda f: "'recv' of '_socket" in f or "'poll' of 'select.epoll'" in f),
    ("access log (logging)", lambda f: "/logging/" in f or ("gateway/app.py:" in f and "(log)" in f)),
    ("prometheus_client", lambda f: "prometheus_client" in f),
    ("aiohttp client", lambda f: "aiohttp/client" in f or "aiohttp/connector" in f),
    ("aiohttp server + HTTP writer/parser", lambda f: "aiohttp/" in f or "multidict" in f or "yarl" in f),
    ("event loop (asyncio, tasks, handles)", lambda f: "/asyncio/" in f or "_contextvars" in f
     or "create_task" in f or "call_soon" in f or "method 'run' of" in f),
    ("Redis client (auto-pipeline, hiredis, scripts)", lambda f: "redis_client.py" in f or "hiredis" in f
     or "gateway/scripts.py" in f or "/redis/" in f),
    ("metering + billing + settlement (argument building, ledger event JSON)", lambda f: any(
        m in f for m in ("gateway/metering.py", "gateway/billing.py", "gateway/settlement.py", "json/encoder"))),
    ("pricing + auth", lambda f: "gateway/pricing.py" in f or "gateway/auth.py" in f or "gateway/limits.py" in f),
    ("body parse + usage (dialects, json decode)", lambda f: "gateway/dialects/" in f or "json/decoder" in f
     or "gateway/sse.py" in f or "'loads'" in f),
    ("proxy handler + upstream edge", lambda f: "gateway/proxy.py" in f or "gateway/upstream.py" in f
     or "gateway/listener.py" in f or "gateway/app.py" in f),
]


def print_components(stats: pstats.Stats, requests: int, cpu: float) -> None:
    """Own time per request by component. The profiler inflates Python calls, not system calls:
    Python components are scaled so that the total matches the unprofiled CPU of `--sample` runs
    (pass it as --unprofiled-ms), system calls are shown as measured."""
    totals: dict[str, float] = {}
    for (filename, line, name), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        key = f"{filename}:{line}({name})"
        group = next((label for label, test in COMPONENTS if test(key)), "other")
        totals[group] = totals.get(group, 0.0) + tottime
    kernel = sum(v for k, v in totals.items() if "kernel" in k)
    total = sum(totals.values())
    scale = 1.0
    if ARGS.unprofiled_ms:
        scale = max(ARGS.unprofiled_ms / 1000 * requests - kernel, 0.0) / max(total - kernel, 1e-9)
    print(f"\nown time per request by component (us; Python scaled by {scale:.2f} to the unprofiled CPU):")
    for group, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        us = seconds * 1e6 / requests * (1.0 if "kernel" in group else scale)
        print(f"  {us:7.1f}  {group}")


ARGS = argparse.Namespace()


def bench_stack(prefix: str, limits: bool) -> tuple[EmbeddedRedis, subprocess.Popen[bytes], Settings, int]:
    """A private redis-server, nginx answering the canned answers, and the bench's configuration (its
    upstreams pointing at that nginx): (redis, nginx, settings, nginx's port)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    redis = EmbeddedRedis(tmp / "redis", port=free_port(), persist=False)
    redis.start()
    up_port = free_port()
    nginx = start_nginx(tmp / "nginx", up_port)
    config = tmp / "config"
    config.mkdir()
    (config / "plans.yaml").write_text(PLANS_LIMITED if limits else PLANS)
    (config / "providers.yaml").write_text(PROVIDERS)
    os.environ.update({"BENCH_JSON_BASE": f"http://127.0.0.1:{up_port}/json/v1",
                       "BENCH_SSE_BASE": f"http://127.0.0.1:{up_port}/sse/v1", "GATEWAY_ADMIN_KEY": ADMIN})
    return redis, nginx, Settings.from_env(config_dir=str(config), redis_url=redis.url), up_port


async def bench_key(gw_port: int) -> str:
    """A key of a new account on the bench plan with plenty of credits, made through the admin API."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
        base = f"http://127.0.0.1:{gw_port}/admin/accounts"
        account = await (await admin.post(base, json={"name": "bench", "plan": "bench"})).json()
        await admin.post(f"{base}/{account['id']}/credits", json={"credits": 100_000_000})
        return str((await (await admin.post(f"{base}/{account['id']}/keys", json={})).json())["key"])


async def main(args: argparse.Namespace) -> None:
    redis, nginx, settings, _up_port = bench_stack("gw-prof-", args.limits)
    gw_port = free_port()
    runner = web.AppRunner(create_app(settings), access_log_class=AccessLogger)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", gw_port).start()
    try:
        key = await bench_key(gw_port)
        url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        body = body_of(args.stream)
        await asyncio.to_thread(run_wrk, url, key, body, args.concurrency, 1, args.client_cpu)
        import redis.asyncio as aioredis

        probe = aioredis.from_url(redis.url)
        before = await probe.info("commandstats")
        # with --components, the profiler's clock is this thread's CPU time: on a shared machine a
        # wall clock charges other processes' time slices to whatever was running
        clock = time.thread_time if args.cpu_clock else time.perf_counter
        profiler = cProfile.Profile(clock) if not args.sample else None
        cpu0 = time.process_time()
        if profiler:
            profiler.enable()
        n, elapsed, p50, _p99, errors = await asyncio.to_thread(run_wrk, url, key, body, args.concurrency,
                                                                args.seconds, args.client_cpu)
        if profiler:
            profiler.disable()
        cpu = time.process_time() - cpu0
        after = await probe.info("commandstats")
        await probe.aclose()
        calls = {name.removeprefix("cmdstat_"): after[name]["calls"] - before.get(name, {"calls": 0})["calls"]
                 for name in after}
        usec = {name.removeprefix("cmdstat_"): after[name]["usec"] - before.get(name, {"usec": 0})["usec"]
                for name in after}
        # a script's usec includes the commands it runs (which are counted again under their own names)
        print(f"redis-server time in EVALSHA: {usec.get('evalsha', 0) / n:.1f} us/req "
              f"({usec.get('evalsha', 0) / max(calls.get('evalsha', 0), 1):.1f} us/call)")
        print("Redis commands per request:", ", ".join(f"{name} {count / n:.2f}" for name, count in
                                                       sorted(calls.items(), key=lambda kv: -kv[1]) if count))
        print(f"{n / elapsed:.0f} req/s, p50 {p50:.2f} ms, gateway process CPU {cpu * 1000 / n:.3f} ms/req "
              f"(without redis), {errors} errors")
        if profiler and args.components:
            print_components(pstats.Stats(profiler), n, cpu)
        if profiler:
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("tottime").print_stats(args.top)
            stats.sort_stats("cumulative").print_stats(args.top)
            for name in args.callers:
                stats.print_callers(name)
            print(out.getvalue())
    finally:
        await runner.cleanup()
        nginx.terminate()
        nginx.wait()
        redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--limits", action="store_true")
    parser.add_argument("--sample", action="store_true", help="no profiler: CPU per request only")
    parser.add_argument("--client-cpu", type=int, default=(os.cpu_count() or 1) - 1)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--callers", action="append", default=[], help="print the callers of functions matching")
    parser.add_argument("--log", default=None, help="write the access log (INFO) to this file, as `gateway serve` "
                        "writes it to stderr")
    parser.add_argument("--components", action="store_true", help="own time per request by component")
    parser.add_argument("--cpu-clock", action="store_true", help="profile with this thread's CPU time (a busy "
                        "machine), not the wall clock (less overhead)")
    parser.add_argument("--unprofiled-ms", type=float, default=None,
                        help="the gateway's CPU ms/req from a --sample run, to scale the components to")
    parser.add_argument("--count-redis-py", action="store_true", help="count redis-py commands by caller")
    cli = ARGS = parser.parse_args()
    if cli.count_redis_py:
        import collections
        import traceback

        import redis.asyncio.client as rc

        seen: collections.Counter[str] = collections.Counter()
        real = rc.Redis.execute_command

        async def counted(self, *args, **options):  # type: ignore[no-untyped-def]
            where = [f"{f.name}" for f in traceback.extract_stack(limit=8)[:-1] if "/gateway/" in f.filename]
            seen[f"{args[0]} <- {' < '.join(reversed(where))}"] += 1
            return await real(self, *args, **options)

        rc.Redis.execute_command = counted  # type: ignore[method-assign]
        import atexit

        atexit.register(lambda: print("\n".join(f"{n:>7} {k}" for k, n in seen.most_common(15))))
    if cli.log:  # the handler and formatter `gateway serve` installs (gateway.logs.setup), on a file
        from gateway import logs

        logs.setup(stream=open(cli.log, "a", encoding="utf-8"))  # noqa: SIM115 (open for the whole run)
    if cli.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main(cli))

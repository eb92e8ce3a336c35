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
import sys
import tempfile
import time
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


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="gw-prof-"))
    redis = EmbeddedRedis(tmp / "redis", port=free_port(), persist=False)
    redis.start()
    up_port, gw_port = free_port(), free_port()
    nginx = start_nginx(tmp / "nginx", up_port)
    config = tmp / "config"
    config.mkdir()
    (config / "plans.yaml").write_text(PLANS_LIMITED if args.limits else PLANS)
    (config / "providers.yaml").write_text(PROVIDERS)
    os.environ.update({"BENCH_JSON_BASE": f"http://127.0.0.1:{up_port}/json/v1",
                       "BENCH_SSE_BASE": f"http://127.0.0.1:{up_port}/sse/v1", "GATEWAY_ADMIN_KEY": ADMIN})
    settings = Settings.from_env(config_dir=str(config), redis_url=redis.url)
    runner = web.AppRunner(create_app(settings), access_log_class=AccessLogger)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", gw_port).start()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
            base = f"http://127.0.0.1:{gw_port}/admin/accounts"
            account = await (await admin.post(base, json={"name": "bench", "plan": "bench"})).json()
            await admin.post(f"{base}/{account['id']}/credits", json={"credits": 100_000_000})
            key = (await (await admin.post(f"{base}/{account['id']}/keys", json={})).json())["key"]
        url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        body = body_of(args.stream)
        await asyncio.to_thread(run_wrk, url, key, body, args.concurrency, 1, args.client_cpu)
        import redis.asyncio as aioredis

        probe = aioredis.from_url(redis.url)
        before = await probe.info("commandstats")
        profiler = cProfile.Profile() if not args.sample else None
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
    parser.add_argument("--count-redis-py", action="store_true", help="count redis-py commands by caller")
    cli = parser.parse_args()
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
    if cli.log:
        import logging

        logging.basicConfig(filename=cli.log, level=logging.INFO,
                            format="%(asctime)s %(process)d %(levelname)s %(message)s")
    if cli.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main(cli))

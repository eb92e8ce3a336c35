"""Instructions per metered request of one gateway process, counted by valgrind's callgrind: a
figure that does not move with the machine's load (CPU time on a shared 2-core machine moved by
±40 % between identical runs), for comparing two versions of the hot path, lever by lever.

The gateway runs in this process as in `profile_gateway.py` (nginx upstream, embedded redis-server,
one account and key); wrk sends `--requests`-ish load at c=`--concurrency` for `--seconds` after a
warm-up, and callgrind's counters are zeroed before and dumped after that load only
(`callgrind_control`), so start-up and warm-up are not counted. Redis runs in its own process and is
not counted (its share is `INFO commandstats`, printed by profile_gateway.py).

Usage (about a minute; valgrind runs the process some 50 times slower):
  valgrind --tool=callgrind --callgrind-out-file=/tmp/gw.%p.out python bench/count_instructions.py [--stream]
The script prints `instructions/request`, read from the dump it asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from profile_gateway import bench_key, bench_stack  # noqa: E402

from bench import body_of  # noqa: E402
from gateway.app import AccessLogger, create_app  # noqa: E402
from gateway.embedded import free_port  # noqa: E402


def wrk(url: str, key: str, body: str, concurrency: int, seconds: int) -> int:
    """Requests answered 200 in one wrk run (timeouts long enough for a process under valgrind)."""
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "60s", "-s",
           str(ROOT / "bench" / "load.lua"), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env={**os.environ, "BENCH_BODY": body, "BENCH_KEY": key}).stdout
    import json

    line = next(x for x in out.splitlines() if x.startswith("BENCH "))
    result = json.loads(line[6:])
    return int(result["requests"]) - int(result["errors"]) - int(result["non2xx"])


def callgrind(command: str) -> None:
    subprocess.run(["callgrind_control", command, str(os.getpid())], check=True, capture_output=True)


async def main(args: argparse.Namespace) -> None:
    redis, nginx, settings, up_port = bench_stack("gw-count-", args.limits)
    gw_port = free_port()
    # a process under valgrind runs some 50 times slower: Redis replies get time, and the background loops'
    # per-second work (reaper, webhook poll, config watch, ledger shipper), which would be charged to the
    # few requests it serves, is slowed to a crawl
    settings = replace(settings, redis_timeout_seconds=30, reap_interval_seconds=3600, webhook_poll_seconds=3600,
                       config_poll_seconds=3600, ledger_ship_interval_seconds=3600)
    if args.bare:  # the bare pass-through (bench/passthrough.py) in this process instead
        import passthrough

        app = web.Application()
        app[passthrough.UPSTREAM] = f"http://127.0.0.1:{up_port}/{'sse' if args.stream else 'json'}"
        app.cleanup_ctx.append(passthrough.session_ctx)
        app.router.add_post("/{tail:.*}", passthrough.forward)
        runner = web.AppRunner(app, access_log=None)
    else:
        runner = web.AppRunner(create_app(settings), access_log_class=AccessLogger)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", gw_port).start()
    try:
        key = "bare" if args.bare else await bench_key(gw_port)
        url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        body = body_of(args.stream)
        await asyncio.to_thread(wrk, url, key, body, args.concurrency, 3)  # warm-up
        await asyncio.to_thread(callgrind, "-z")
        n = await asyncio.to_thread(wrk, url, key, body, args.concurrency, args.seconds)
        await asyncio.to_thread(callgrind, "-d")
        await asyncio.sleep(0.5)
        dumps = sorted(glob.glob(args.out_glob), key=os.path.getmtime)
        total = 0
        for line in Path(dumps[-1]).read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                total = int(line.split()[1])
                break
        print(f"{'bare' if args.bare else 'gateway'} {'stream' if args.stream else 'json'} c={args.concurrency}: "
              f"{n} requests, {total / max(n, 1):,.0f} instructions/request ({dumps[-1]})")
    finally:
        await runner.cleanup()
        nginx.terminate()
        redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--limits", action="store_true")
    parser.add_argument("--bare", action="store_true", help="count the bare aiohttp pass-through instead")
    parser.add_argument("--uvloop", action="store_true", help="on uvloop's event loop")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--out-glob", default="/tmp/gw.*.out.*", help="where callgrind writes its dumps")
    parsed = parser.parse_args()
    if parsed.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main(parsed))

"""Reserve + settle throughput: one redis-server vs a local 3-primary Redis Cluster, same machine, same run.

Calls `Meter.reserve` and `Meter.settle` directly (no HTTP, no upstream), with the reaper's index
guard installed as the gateway installs it, for N pairs spread over 64 accounts at a given
concurrency. The client is one Python process: on a small machine it, not Redis, is the bottleneck,
so the figures say what one gateway process can push, and how much the cluster client costs.

Usage: python bench/meter_cluster.py [--pairs 5000] [--accounts 64] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from cluster import LocalCluster  # noqa: E402

from gateway.config import load_config  # noqa: E402
from gateway.embedded import EmbeddedRedis, free_port  # noqa: E402
from gateway.keys import AccountKeys, KeySchema  # noqa: E402
from gateway.metering import Meter, ReserveSpec, quote  # noqa: E402
from gateway.reaper import HolderIndex  # noqa: E402
from gateway.redis_client import connect_redis  # noqa: E402
from gateway.scripts import ScriptRunner, load_scripts  # noqa: E402
from gateway.store import Store  # noqa: E402


async def server_cost(url: str, keys: AccountKeys, key_id: str) -> tuple[float, int]:
    """On one node: Redis CPU per EVALSHA (µs, from INFO commandstats) and the bytes one account's
    records take (ledger aside)."""
    redis = connect_redis(url, 5.0)
    stats = await redis.info("commandstats")
    per_call = float(stats["cmdstat_evalsha"]["usec_per_call"])
    names = [keys.account, keys.api_key(key_id), keys.key_ids, keys.usable_keys, keys.holds, keys.hold_expiry,
             keys.limits]
    size = sum([await redis.memory_usage(name) or 0 for name in names])
    await redis.aclose()
    return per_call, size


async def run(url: str, pairs: int, accounts: int, concurrency: int
              ) -> tuple[float, float, float, tuple[AccountKeys, str]]:
    """(pairs per second, p50 ms, p99 ms) of one reserve + settle, and one account's keys and key id."""
    redis = connect_redis(url, 5.0)
    schema = KeySchema()
    runner = ScriptRunner(redis, load_scripts())
    await runner.register_all()
    meter = Meter(runner, 120_000)
    runner.guard("reserve", HolderIndex(redis, schema, lambda: 0).before_reserve)
    config = load_config(ROOT / "config")
    store = Store(redis, schema, runner)
    made = []
    for i in range(accounts):
        account = await store.create_account(config, f"bench-{i}", "free")
        await store.grant(account, 10**12)
        made.append((schema.for_account(account), (await store.create_key(account)).id))
    route = config.route("gpt-4o-mini") or config.routes[0]
    q = quote(config.rates("free", route), 100, 100)
    spec = ReserveSpec(200, 101, 0, 0, "", (0, 2**52), 0, "free", 0)
    latencies: list[float] = []
    queue = list(range(pairs))

    async def worker() -> None:
        while queue:
            n = queue.pop()
            keys, key_id = made[n % accounts]
            started = time.perf_counter()
            await meter.reserve(keys, key_id, f"req_bench_{n}", "free", q, spec)
            await meter.settle(keys, f"req_bench_{n}", key_id, 50, {"outcome": "bench"})
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await redis.aclose()
    latencies.sort()
    return pairs / elapsed, statistics.median(latencies) * 1000, latencies[int(len(latencies) * 0.99)] * 1000, made[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5000)
    parser.add_argument("--accounts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        single = EmbeddedRedis(Path(folder) / "single", port=free_port(), persist=False)
        single.start()
        cluster = LocalCluster(Path(folder) / "cluster")
        cluster.start()
        try:
            for name, url in (("single node", single.url), ("3-primary cluster", cluster.url)):
                asyncio.run(run(url, 500, args.accounts, args.concurrency))  # warm up (scripts, pools)
                rate, p50, p99, (keys, key_id) = asyncio.run(run(url, args.pairs, args.accounts, args.concurrency))
                print(f"{name:>18}: {rate:8.0f} reserve+settle pairs/s   p50 {p50:6.2f} ms   p99 {p99:6.2f} ms")
                if url == single.url:
                    per_call, size = asyncio.run(server_cost(url, keys, key_id))
                    print(f"{'':>18}  Redis CPU {per_call:.1f} µs per script call (so about "
                          f"{1e6 / (2 * per_call):,.0f} pairs/s per Redis core); {size} bytes per account (no ledger)")
        finally:
            cluster.stop()
            single.stop()


if __name__ == "__main__":
    main()

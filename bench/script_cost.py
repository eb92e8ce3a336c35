"""What the reserve and settle scripts cost redis-server per metered request: `--pairs` reserve + settle
pairs through `gateway.metering.Meter` against a private redis-server, after `--warmup` pairs (so that
the holds hash is past 512 entries and a real hash table, as on a busy account). Prints the Redis
commands per pair and EVALSHA time from `INFO commandstats`; with `--callgrind` (valgrind installed)
the server runs under callgrind and the figure to compare is the instruction count inside EVALSHA per
pair, which a busy machine does not blur. Compare two checkouts with `--lua OTHER/lua`.

    python bench/script_cost.py [--lua DIR] [--limits] [--aged] [--callgrind] [--pairs 500] [--warmup 600]

`--limits` uses the bench's plan with four limits (bench.py PLANS_LIMITED); `--aged` gives the account
a closed cycle's snapshot, which makes Redis keep its hash as a hash table (a new account's hash is a
ziplist, where every field read or written is a scan).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis as sync_redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench import PLANS, PLANS_LIMITED  # noqa: E402
from gateway.config import load_config  # noqa: E402
from gateway.embedded import free_port, redis_server_binary  # noqa: E402
from gateway.keys import KeySchema  # noqa: E402
from gateway.limits import applicable, encode  # noqa: E402
from gateway.metering import Meter, ReserveSpec, quote  # noqa: E402
from gateway.redis_client import connect_redis  # noqa: E402
from gateway.scripts import ScriptRunner, load_scripts  # noqa: E402
from gateway.store import Store  # noqa: E402

PROVIDERS = """upstreams:
  bench: {dialect: openai, base_url: "http://127.0.0.1:9/v1", api_key: k, auth: bearer}
models:
  bench-json: {upstream: bench, input: 0.25, cached_input: 0.025, output: 2.0, max_output_tokens: 16384}
"""


def start_server(folder: Path, port: int, callgrind: Path | None, ziplist: int | None) -> subprocess.Popen[bytes]:
    command = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(folder), "--stream-node-max-bytes", "16384"]
    if ziplist is not None:
        command += ["--hash-max-ziplist-entries", str(ziplist)]
    if callgrind:
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={callgrind}",
                   "--toggle-collect=evalGenericCommand*", *command]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = sync_redis.Redis(port=port)
    for _ in range(600):
        try:
            client.ping()
            return server
        except sync_redis.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError("redis-server did not start")


def dump(server: subprocess.Popen[bytes]) -> None:
    """Write callgrind's counts so far to a new numbered file and start counting from zero."""
    subprocess.run(["callgrind_control", "-d", str(server.pid)], stdout=subprocess.DEVNULL, check=True)


async def run(args: argparse.Namespace, folder: Path) -> None:
    port = free_port()
    out = folder / "callgrind.out" if args.callgrind else None
    server = start_server(folder, port, out, args.ziplist_entries)
    client = connect_redis(f"redis://127.0.0.1:{port}/0", 60.0)
    try:
        (folder / "plans.yaml").write_text(PLANS_LIMITED if args.limits else PLANS)
        (folder / "providers.yaml").write_text(PROVIDERS)
        config = load_config(folder)
        runner = ScriptRunner(client, load_scripts(args.lua))
        await runner.register_all()
        schema = KeySchema()
        store = Store(client, schema, runner)
        account = await store.create_account(config, "bench", "bench")
        await store.grant(account, 10**11)
        key = await store.create_key(account)
        keys = schema.for_account(account)
        if args.aged:  # longer than hash-max-ziplist-value (64 bytes)
            await client.hset(keys.account, "close:0", " ".join(["1796136150000"] * 8) + " bench")
        route = config.route("bench-json")
        assert route is not None
        raw = await client.hgetall(keys.account)
        limits = encode(applicable(config.plans["bench"].limits, route.upstream))
        spec = ReserveSpec(130, 31, 50, 10, limits, (int(raw["cycle_start_ms"]), int(raw["cycle_end_ms"])),
                           int(raw["cycle_allowance"]), "bench", int(raw["cycle_allowance"]))
        q = quote(config.rates("bench", route), 30, 100)
        meter = Meter(runner, 60_000)

        async def pair(rid: str) -> None:
            held = await meter.reserve(keys, key.id, rid, "bench", q, spec)
            await meter.settle(keys, rid, key.id, held.hold // 2, {"model": "bench-json"}, limits, 80, 20)

        for i in range(args.warmup):
            await pair(f"warm_{i}")
        await client.execute_command("CONFIG", "RESETSTAT")
        if out:
            dump(server)
        for i in range(args.pairs):
            await pair(f"req_{i}")
        stats = await client.info("commandstats")
        if out:
            dump(server)
    finally:
        await client.aclose()
        server.terminate()
        server.wait()
    n = args.pairs
    evalsha = stats["cmdstat_evalsha"]
    print(f"EVALSHA {evalsha['usec'] / n:.1f} us per pair (wall clock: blurred by a busy machine)")
    print("commands per pair:", ", ".join(f"{name.removeprefix('cmdstat_')} {v['calls'] / n:.2f}" for name, v in
                                          sorted(stats.items(), key=lambda kv: -kv[1]["calls"])
                                          if name != "cmdstat_config"))
    if out:
        last = max(folder.glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:]))
        totals = next(line for line in last.read_text().splitlines() if line.startswith("totals:"))
        print(f"instructions inside EVALSHA: {int(totals.split()[1]) / n:,.0f} per pair")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--lua", type=Path, default=ROOT / "lua", help="the folder of scripts to measure")
    parser.add_argument("--limits", action="store_true")
    parser.add_argument("--aged", action="store_true")
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--pairs", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=600)
    parser.add_argument("--ziplist-entries", type=int, default=None,
                        help="redis-server's hash-max-ziplist-entries (default 512): hashes this small are scanned")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="script-cost-"))
    try:
        asyncio.run(run(args, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Server-side time of the reserve script (Redis `INFO commandstats`, usec per EVALSHA call), for one
folder of Lua scripts: a key without a budget, a key with both budgets, each without and with a
plan's request and token windows. Compare two checkouts with `--lua OTHER/lua`.

    python bench/reserve_script.py [--lua DIR] [--calls 10000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import redis

from gateway.embedded import EmbeddedRedis, free_port
from gateway.limits import encode, rate_limits
from gateway.scripts import load_scripts

WINDOWS = encode(list(rate_limits({"requests_per_minute": 10**9, "tokens_per_minute": 10**12}, "a")))


def measure(client: redis.Redis, sha: str, calls: int, budget: bool, rows: str) -> float:
    tag = f"b{int(budget)}r{int(bool(rows))}"
    acct, key = f"gw:{{{tag}}}:acct", f"gw:{{{tag}}}:key:k1"
    client.hset(acct, mapping={"plan": "free", "status": "active", "allow": 0, "extra": 10**15, "held": 0,
                               "cycle_start_ms": 0, "cycle_end_ms": 2**52, "agen": 0})
    client.hset(key, mapping={"status": "active", "expires_ms": 0,
                              **({"budget_cycle": 10**14, "budget_life": 10**14} if budget else {})})
    keys = [acct, key, f"gw:{{{tag}}}:holds", f"gw:{{{tag}}}:hexp", f"gw:{{{tag}}}:lim"]
    client.config_resetstat()
    for i in range(calls):
        client.evalsha(sha, 5, *keys, f"req_{i}", "free", 5000, 600, 65000, 0, "k1", 2000, 1010, 0, 0, rows,
                       0, 2**52, 0, "free", 0)
    stats = client.info("commandstats")["cmdstat_evalsha"]
    return float(stats["usec_per_call"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lua", type=Path, default=None, help="the scripts' folder (default: this checkout's)")
    parser.add_argument("--calls", type=int, default=10_000)
    args = parser.parse_args()
    script = load_scripts(args.lua)["reserve"]
    with tempfile.TemporaryDirectory() as folder:
        server = EmbeddedRedis(Path(folder), port=free_port(), persist=False)
        server.start()
        try:
            client = redis.Redis.from_url(server.url)
            sha = client.script_load(script.source)
            for budget in (False, True):
                for rows in ("", WINDOWS):
                    usec = measure(client, sha, args.calls, budget, rows)
                    print(f"budget={'yes' if budget else 'no ':<3} windows={'yes' if rows else 'no ':<3} "
                          f"{usec:6.2f} us per reserve ({args.calls} calls)")
            client.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()

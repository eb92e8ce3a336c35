"""Gateway overhead benchmark: the upstream called directly, through a bare aiohttp pass-through,
and through the gateway with one and with two workers (auth + reserve + settle against a real
redis-server), at c=1/16/64, JSON answers and streams.

Per row: requests/s, p50/p99 latency, the p50 the hop adds over the direct call, CPU per request of
the serving process tree (from /proc: utime + stime; for the gateway its master, workers and the
redis-server it uses), and the ratios to the bare pass-through measured in the same round.

- Upstream: `--upstream nginx` (default) answers canned OpenAI answers from its config (JSON, and SSE
  with a usage chunk): it costs microseconds, so the proxies' own cost shows. `--upstream emulator`
  uses the gateway's Python provider emulator instead (the old bench; it masks a lot).
- Client: wrk (one thread) with bench/load.lua, pinned with `taskset -c <last core>` (`--client-cpu`);
  the servers float over the other cores (pass `--server-cpus 0` to pin them too). Without wrk it
  falls back to an aiohttp client in this process (noisier: Python is slower than what it measures).
- Noise: `--rounds N` runs the whole matrix N times, interleaved, and reports each row's median.
- `--quick`: 2 s per row (+1 s warm-up), one round, about 1.5 min; the default is 3 s per row, 2 rounds
  (about 4 min). RESULTS.md was measured with `--rounds 3 --seconds 3`.

Usage: python bench/bench.py [--quick] [--rounds N] [--seconds S] [--concurrency 1,16,64]
                             [--upstream nginx|emulator] [--uvloop] [--targets direct,bare,gw1,gw2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from upstream import start_nginx  # noqa: E402

from gateway.embedded import EmbeddedRedis, free_port  # noqa: E402

ADMIN = "bench-admin-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PLANS = """default_plan: bench
plans:
  bench:
    monthly_credits: 1000000
    credit_usd: 1.0
    models: ["bench-*"]
"""
PLANS_LIMITED = PLANS + """    limits:
      requests_per_minute: 100000000
      concurrent_requests: 100000
      max_cost_usd_per_cycle: 1000000
      spend_windows: {5h: 1000000}
"""
PROVIDERS = """upstreams:
  bench:
    dialect: openai
    base_url: ${BENCH_JSON_BASE}
    api_key: bench-upstream-key
    auth: bearer
    timeout_seconds: 60
  bench-sse:
    dialect: openai
    base_url: ${BENCH_SSE_BASE}
    api_key: bench-upstream-key
    auth: bearer
    timeout_seconds: 60
models:
  bench-json: {upstream: bench, input: 0.25, cached_input: 0.025, output: 2.0, max_output_tokens: 16384}
  bench-stream: {upstream: bench-sse, input: 0.25, cached_input: 0.025, output: 2.0, max_output_tokens: 16384}
"""


@dataclass
class Row:
    mode: str
    concurrency: int
    target: str
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms: float | None
    errors: int = 0
    added_p50_ms: float = 0.0
    cpu_x_bare: float | None = None
    rps_x_bare: float | None = None


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    return total


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        out = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout.split()
        todo += [int(c) for c in out]
    return found


async def wait_up(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            try:
                async with session.get(url) as resp:
                    if resp.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def body_of(stream: bool) -> str:
    return json.dumps({"model": "bench-stream" if stream else "bench-json", "max_tokens": 16, "stream": stream,
                       "messages": [{"role": "user", "content": "benchmark request"}]})


def run_wrk(url: str, key: str, body: str, concurrency: int, seconds: float, client_cpu: int | None
            ) -> tuple[int, float, float, float, int]:
    """(requests, seconds, p50 ms, p99 ms, errors) of one wrk run."""
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency", "-s",
           str(ROOT / "bench" / "load.lua"), url]
    if client_cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(client_cpu), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BENCH_BODY": body, "BENCH_KEY": key},
                         check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("BENCH "))
    r = json.loads(line[6:])
    return r["requests"], r["duration_us"] / 1e6, r["p50_us"] / 1000, r["p99_us"] / 1000, r["errors"] + r["non2xx"]


async def run_aiohttp(url: str, key: str, body: str, concurrency: int, seconds: float
                      ) -> tuple[int, float, float, float, int]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                errors += resp.status != 200
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    ordered = sorted(latencies)
    return (len(ordered), time.perf_counter() - started, ordered[len(ordered) // 2] * 1000,
            ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, errors)


async def measure(url: str, key: str, stream: bool, concurrency: int, seconds: float, pids: list[int] | None,
                  args: argparse.Namespace) -> tuple[int, float, float, float, int, float | None]:
    body = body_of(stream)
    use_wrk = shutil.which("wrk") is not None and not args.aiohttp_client
    if use_wrk:  # warm-up: connections, caches, scripts
        await asyncio.to_thread(run_wrk, url, key, body, concurrency, 1, args.client_cpu)
    else:
        await run_aiohttp(url, key, body, concurrency, 0.5)
    cpu0 = cpu_seconds(pids) if pids else 0.0
    if use_wrk:
        n, elapsed, p50, p99, errors = await asyncio.to_thread(run_wrk, url, key, body, concurrency, seconds,
                                                               args.client_cpu)
    else:
        n, elapsed, p50, p99, errors = await run_aiohttp(url, key, body, concurrency, seconds)
    cpu = (cpu_seconds(pids) - cpu0) * 1000 / max(n, 1) if pids else None
    return n, elapsed, p50, p99, errors, cpu


def summarise(rounds: list[list[Row]]) -> list[Row]:
    """Each row's median over the rounds, with the ratios to the bare pass-through and direct p50."""
    out: list[Row] = []
    for i, first in enumerate(rounds[0]):
        same = [r[i] for r in rounds]
        cpus = [r.cpu_ms for r in same if r.cpu_ms is not None]
        out.append(Row(first.mode, first.concurrency, first.target, statistics.median(r.rps for r in same),
                       statistics.median(r.p50_ms for r in same), statistics.median(r.p99_ms for r in same),
                       statistics.median(cpus) if cpus else None, sum(r.errors for r in same)))
    for row in out:
        peers = {r.target: r for r in out if r.mode == row.mode and r.concurrency == row.concurrency}
        direct, bare = peers.get("direct"), peers.get("bare")
        if direct is not None:
            row.added_p50_ms = row.p50_ms - direct.p50_ms
        if bare is not None and row.cpu_ms is not None and bare.cpu_ms:
            row.cpu_x_bare = row.cpu_ms / bare.cpu_ms
        if bare is not None and bare.rps:
            row.rps_x_bare = row.rps / bare.rps
    return out


def render(rows: list[Row]) -> str:
    lines = ["| mode | c | target | req/s | p50 ms | p99 ms | +p50 ms | CPU ms/req | CPU x bare | req/s x bare |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cpu = f"{r.cpu_ms:.3f}" if r.cpu_ms is not None else "-"
        cx = f"{r.cpu_x_bare:.2f}" if r.cpu_x_bare is not None else "-"
        rx = f"{r.rps_x_bare:.2f}" if r.rps_x_bare is not None else "-"
        err = f" ({r.errors} errors)" if r.errors else ""
        lines.append(f"| {r.mode} | {r.concurrency} | {r.target}{err} | {r.rps:,.0f} | {r.p50_ms:.2f} | "
                     f"{r.p99_ms:.2f} | {r.added_p50_ms:+.2f} | {cpu} | {cx} | {rx} |")
    return "\n".join(lines)


def verdict(rows: list[Row]) -> str:
    """The issue's targets, read off the table."""
    get = {(r.mode, r.concurrency, r.target): r for r in rows}
    lines = []
    for mode in ("json", "stream"):
        for c in (16, 64):
            r = get.get((mode, c, "gw1"))
            if r is not None and r.cpu_x_bare is not None:
                lines.append(f"- CPU/req gw1 {mode} c={c}: {r.cpu_x_bare:.2f}x bare (target ≤ 2.0, stretch 1.6): "
                             f"{'met' if r.cpu_x_bare <= 2.0 else 'NOT met'}")
    for mode in ("json", "stream"):
        gw, bare = get.get((mode, 1, "gw1")), get.get((mode, 1, "bare"))
        if gw is not None:
            extra = f" (bare: {bare.added_p50_ms:+.2f} ms)" if bare is not None else ""
            lines.append(f"- +p50 gw1 {mode} c=1 over direct: {gw.added_p50_ms:+.2f} ms{extra} (target ≤ 0.5 ms): "
                         f"{'met' if gw.added_p50_ms <= 0.5 else 'NOT met'}")
    for mode in ("json", "stream"):
        for c in (16, 64):
            one, two = get.get((mode, c, "gw1")), get.get((mode, c, "gw2"))
            if one is not None and two is not None and one.rps:
                ratio = two.rps / one.rps
                lines.append(f"- req/s gw2 / gw1 {mode} c={c}: {ratio:.2f}x (target ≥ 1.6): "
                             f"{'met' if ratio >= 1.6 else 'NOT met'}")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2 s per row, one round (about 1.5 min)")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--modes", default="json,stream")
    parser.add_argument("--targets", default="direct,bare,gw1,gw2")
    parser.add_argument("--upstream", choices=("nginx", "emulator"), default="nginx")
    parser.add_argument("--uvloop", action="store_true", help="run the gateway and the pass-through on uvloop "
                        "(bench/serve_uvloop.py) even if `gateway serve` does not choose it")
    parser.add_argument("--limits", action="store_true", help="a plan with four (never reached) limits")
    parser.add_argument("--client-cpu", type=int, default=(os.cpu_count() or 1) - 1,
                        help="the core wrk is pinned to (-1: not pinned)")
    parser.add_argument("--server-cpus", default=None, help="taskset list for the servers (default: not pinned)")
    parser.add_argument("--aiohttp-client", action="store_true", help="use the in-process client even with wrk")
    parser.add_argument("--label", default="", help="a name for this run in bench/results/")
    args = parser.parse_args()
    if args.client_cpu < 0:
        args.client_cpu = None
    seconds = args.seconds or (2.0 if args.quick else 3.0)
    rounds = args.rounds or (1 if args.quick else 2)
    levels = [int(c) for c in args.concurrency.split(",")]
    modes = args.modes.split(",")
    wanted = args.targets.split(",")

    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    redis = EmbeddedRedis(tmp / "redis", port=free_port(), persist=False)
    redis.start()
    up_port, pass_port, gw1_port, gw2_port = free_port(), free_port(), free_port(), free_port()
    py = sys.executable
    pin = ["taskset", "-c", args.server_cpus] if args.server_cpus and shutil.which("taskset") else []
    procs: dict[str, subprocess.Popen[bytes]] = {}
    if args.upstream == "nginx":
        procs["upstream"] = start_nginx(tmp / "nginx", up_port)
        root = f"http://127.0.0.1:{up_port}"
        json_base, sse_base = f"{root}/json/v1", f"{root}/sse/v1"
        direct_json, direct_sse = f"{json_base}/chat/completions", f"{sse_base}/chat/completions"
        up_check = f"{root}/"
    else:
        procs["upstream"] = subprocess.Popen([py, "-m", "gateway", "emulator", "--port", str(up_port)], cwd=ROOT,
                                             stderr=subprocess.DEVNULL)
        root = f"http://127.0.0.1:{up_port}"
        json_base = sse_base = f"{root}/v1"
        direct_json = direct_sse = f"{root}/v1/chat/completions"
        up_check = f"{root}/v1/models"
    config = tmp / "config"
    config.mkdir()
    (config / "plans.yaml").write_text(PLANS_LIMITED if args.limits else PLANS)
    (config / "providers.yaml").write_text(PROVIDERS)
    env = {**os.environ, "BENCH_JSON_BASE": json_base, "BENCH_SSE_BASE": sse_base, "GATEWAY_ADMIN_KEY": ADMIN,
           "GATEWAY_CONFIG_DIR": str(config), "GATEWAY_DATA_DIR": str(tmp / "data"), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(ROOT)}
    loop_flag = ["--uvloop"] if args.uvloop else []
    procs["bare"] = subprocess.Popen([*pin, py, "bench/passthrough.py", str(pass_port), root, *loop_flag],
                                     cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    serve = [py, "bench/serve_uvloop.py"] if args.uvloop else [py, "-m", "gateway"]
    logs = {}
    for name, port, workers in (("gw1", gw1_port, 1), ("gw2", gw2_port, 2)):
        if name not in wanted:
            continue
        logs[name] = (tmp / f"{name}.log").open("wb")  # the access log is written, as in production
        procs[name] = subprocess.Popen([*pin, *serve, "serve", "--port", str(port), "--redis-url", redis.url,
                                        "--workers", str(workers)], cwd=ROOT, env=env, stderr=logs[name],
                                       stdout=subprocess.DEVNULL)
    redis_pid = redis._proc.pid if redis._proc is not None else None
    try:
        await wait_up(up_check)
        await wait_up(f"http://127.0.0.1:{pass_port}/nothing")
        gw_ports = {"gw1": gw1_port, "gw2": gw2_port}
        for name in logs:
            await wait_up(f"http://127.0.0.1:{gw_ports[name]}/health")
        admin_port = gw1_port if "gw1" in logs else gw2_port
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
            base = f"http://127.0.0.1:{admin_port}/admin/accounts"
            account = await (await admin.post(base, json={"name": "bench", "plan": "bench"})).json()
            await admin.post(f"{base}/{account['id']}/credits", json={"credits": 100_000_000})
            key = (await (await admin.post(f"{base}/{account['id']}/keys", json={})).json())["key"]
        all_rounds: list[list[Row]] = []
        for round_no in range(rounds):
            rows: list[Row] = []
            for mode in modes:
                stream = mode == "stream"
                urls = {"direct": direct_sse if stream else direct_json,
                        "bare": f"http://127.0.0.1:{pass_port}" + (
                            (direct_sse if stream else direct_json)[len(root):]),
                        "gw1": f"http://127.0.0.1:{gw1_port}/v1/chat/completions",
                        "gw2": f"http://127.0.0.1:{gw2_port}/v1/chat/completions"}
                for level in levels:
                    for target in wanted:
                        proc = procs["upstream"] if target == "direct" else procs[target]
                        pids = tree(proc.pid)
                        if target.startswith("gw") and redis_pid is not None:
                            pids.append(redis_pid)
                        n, elapsed, p50, p99, errors, cpu = await measure(urls[target], key, stream, level, seconds,
                                                                          pids, args)
                        rows.append(Row(mode, level, target, n / elapsed, p50, p99, cpu, errors))
                        note = f"  {errors} errors" if errors else ""
                        print(f"round {round_no + 1}/{rounds} {mode:<6} c={level:<3} {target:<6} "
                              f"{n / elapsed:>8.0f} req/s  p50 {p50:6.2f} ms  CPU {cpu or 0:6.3f} ms/req{note}",
                              file=sys.stderr)
            all_rounds.append(rows)
        table = summarise(all_rounds)
        head = (f"{time.strftime('%Y-%m-%d %H:%M')}, upstream {args.upstream}, loop "
                f"{'uvloop' if args.uvloop else 'as gateway serve chooses'}, {seconds:g} s per row, "
                f"median of {rounds} round(s), wrk pinned to CPU {args.client_cpu}, servers "
                f"{'on CPUs ' + args.server_cpus if args.server_cpus else 'unpinned'}; direct's CPU is the upstream's")
        print("\n" + head + "\n\n" + render(table) + "\n\n" + verdict(table))
        out = ROOT / "bench" / "results"
        out.mkdir(exist_ok=True)
        name = f"{args.label or 'latest'}.json"
        (out / name).write_text(json.dumps({"head": head, "rows": [asdict(r) for r in table],
                                            "rounds": [[asdict(r) for r in rr] for rr in all_rounds]}, indent=1))
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())

"""Redis Cluster and Sentinel as deployments: the same gateway on a real 3-primary cluster (conservation
across two gateway apps, exact rate limits, the reaper, a cycle rollover, exports, listings, stats,
alerts and webhooks), a slot moved mid-traffic, the sharded indexes and the job leases."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cluster import LocalCluster, slot_of
from conftest import LOOP_LAG_TOLERANT, ROOT, Harness, make_settings, no_limits
from redis import exceptions as redis_errors

from gateway.app import create_app, reap_once
from gateway.embedded import free_port, redis_server_binary
from gateway.jobs import Lease, ask_buckets, due_buckets
from gateway.keys import INDEX_BUCKETS, KeySchema, bucket_of
from gateway.metering import quote
from gateway.reaper import INDEX_HORIZON_MS
from gateway.redis_client import connect_redis, is_cluster, parse_redis_url
from gateway.scripts import REDIS_DOWN
from gateway.state import GATEWAY, Gateway

pytestmark = pytest.mark.cluster

PLANS = """
default_plan: free
plans:
  free: {monthly_credits: 0, credit_usd: 1, models: ["demo-*"]}
  rpm: {monthly_credits: 100, models: ["demo-*"], limits: {requests_per_minute: 20}}
  monthly: {monthly_credits: 0.002, models: ["demo-*"]}
  alerting:
    monthly_credits: 0.001
    models: ["demo-*"]
    alerts: {webhook_url: "${ALERT_URL:-http://127.0.0.1:9/none}", webhook_secret: "whsec-test"}
"""
BODY = {"model": "demo-mini", "max_tokens": 12, "messages": [{"role": "user", "content": "hi"}]}
DAY = 86_400_000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    running = LocalCluster(tmp_path_factory.mktemp("cluster"))
    running.start()
    yield running
    running.stop()


@pytest.fixture
def plans_yaml() -> str:
    return PLANS


async def _start(config_dir: Path, url: str, **overrides: Any) -> TestClient[Any, Any]:
    server = TestServer(create_app(make_settings(config_dir, url, **{**LOOP_LAG_TOLERANT, **overrides})))
    client: TestClient[Any, Any] = TestClient(server)
    await client.start_server()
    return client


@pytest.fixture
async def on_cluster(cluster: LocalCluster, config_dir: Path, emulator: TestServer) -> AsyncIterator[Harness]:
    """The harness gateway, on the cluster (flushed first)."""
    cluster.flush()
    client = await _start(config_dir, cluster.url)
    h = Harness(client, cluster.client(), emulator)  # type: ignore[arg-type]
    yield h
    await h.close()
    await client.close()


async def _fire(session: aiohttp.ClientSession, url: str, key: str, stream: bool = False) -> int:
    async with session.post(url, json={**BODY, "stream": stream}, headers={"Authorization": f"Bearer {key}"}) as resp:
        await resp.read()
        return resp.status


async def _settled(*gateways: Gateway) -> None:
    """Every request finished and every queued settlement landed, in every app."""
    for gw in gateways:
        await gw.quiesce()
        while gw.retries.queued:
            gw.retries.wake.set()
            await asyncio.sleep(0.05)  # the retry loop's own pace: nothing to await on it


def _served_once_each(h: Harness, account: str, statuses: list[int]) -> None:
    """Nothing lost, nothing charged twice: one usage event per request served, never more than held."""
    usage = [e for e in h.ledger(account) if e["type"] == "usage"]
    assert len(usage) == statuses.count(200), (len(usage), statuses.count(200))
    assert len({e["rid"] for e in usage}) == len(usage)
    assert all(int(e["cost"]) <= int(e["hold"]) and int(e["uncollected"]) == 0 for e in usage)


# ---------------------------------------------------------------- the key schema on a cluster


def test_every_index_bucket_has_a_slot_of_its_own() -> None:
    schema = KeySchema()
    for keys in (schema.accounts, schema.holders, schema.webhooks):
        assert len({slot_of(keys(b)) for b in range(INDEX_BUCKETS)}) == INDEX_BUCKETS
    # a bucket's leases, cursors and markers live in the bucket's slot
    assert slot_of(schema.lease(7, "reap")) == slot_of(schema.holders(7)) == slot_of(schema.job_done(7, "trim"))
    assert bucket_of("acct_0123456789abcdef") == bucket_of("acct_0123456789abcdef") < INDEX_BUCKETS


@pytest.fixture
def partial_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A cluster of its own, for a test that stops a node: its nodes go on serving the slots they own."""
    running = LocalCluster(tmp_path / "partial", options=("--cluster-require-full-coverage", "no"))
    running.start()
    yield running
    running.stop()


def _connections(cluster: LocalCluster) -> dict[int, int]:
    found = {}
    for port in cluster.ports:
        with cluster.node(port) as node:
            found[port] = int(node.info("stats")["total_connections_received"])
    return found


async def test_a_pass_asks_every_node_once_and_goes_on_without_a_node_that_is_down(
        partial_cluster: LocalCluster) -> None:
    schema, now = KeySchema(), 1_000_000
    sync = partial_cluster.client()
    node_of = {b: int(sync.get_node_from_key(schema.webhooks(b)).port) for b in range(INDEX_BUCKETS)}
    due = [b for b in range(INDEX_BUCKETS) if b % 2 == 0 and b % 5]
    for b in range(INDEX_BUCKETS):
        if b % 5:  # every fifth bucket empty, the odd ones with work due only later
            sync.zadd(schema.webhooks(b), {f"delivery-{b}": now - 1 if b % 2 == 0 else now + 60_000})
    sync.close()
    redis = connect_redis(partial_cluster.url, 0.5)
    try:
        await redis.initialize()
        before = _connections(partial_cluster)
        assert await due_buckets(redis, schema.webhooks, now) == due
        # one pipeline per node on one connection each, not one pooled connection per bucket in flight
        opened = {port: after - before[port] - 1 for port, after in _connections(partial_cluster).items()}
        assert all(count <= 1 for count in opened.values()), opened  # (-1: the INFO call's own)
        depths = await ask_buckets(redis, lambda b: ("ZCARD", schema.webhooks(b)))
        assert depths == [1 if b % 5 else 0 for b in range(INDEX_BUCKETS)]

        lost = partial_cluster.ports[2]
        partial_cluster.procs[2].kill()
        partial_cluster.procs[2].wait()
        assert await due_buckets(redis, schema.webhooks, now) == [b for b in due if node_of[b] != lost]
        answers = await ask_buckets(redis, lambda b: ("ZCARD", schema.webhooks(b)))
        for b, answer in enumerate(answers):
            assert isinstance(answer, REDIS_DOWN) if node_of[b] == lost else answer == (1 if b % 5 else 0)

        for proc in partial_cluster.procs[:2]:
            proc.kill()
            proc.wait()
        with pytest.raises(Exception) as nothing_answers:  # whatever redis-py makes of it, checked below
            await due_buckets(redis, schema.webhooks, now)
        assert isinstance(nothing_answers.value, (*REDIS_DOWN, redis_errors.RedisClusterException))
    finally:
        await redis.aclose()


def test_redis_urls_name_a_server_a_cluster_or_a_sentinel_service() -> None:
    assert parse_redis_url("redis://localhost:6379/0").kind == "standalone"
    cluster = parse_redis_url("rediss+cluster://user:pw@10.0.0.1:7000,10.0.0.2,[::1]:7002?x=1")
    assert (cluster.kind, cluster.hosts, cluster.tls) == ("cluster", (("10.0.0.1", 7000), ("10.0.0.2", 6379),
                                                                       ("::1", 7002)), True)
    assert (cluster.username, cluster.password) == ("user", "pw")
    sentinel = parse_redis_url("redis+sentinel://s1:26379,s2/mymaster?db=2&password=data")
    assert (sentinel.kind, sentinel.service, sentinel.hosts) == ("sentinel", "mymaster", (("s1", 26379),
                                                                                          ("s2", 26379)))
    assert sentinel.options == {"db": "2", "password": "data"}
    for bad in ("redis+sentinel://s1:26379", "redis+cluster://", "memcached://x", "redis+cluster://h:port"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)


# ---------------------------------------------------------------- metering on a cluster


async def test_500_concurrent_requests_across_two_gateway_apps_conserve_credits(
        on_cluster: Harness, cluster: LocalCluster, config_dir: Path) -> None:
    other = await _start(config_dir, cluster.url)
    assert is_cluster(on_cluster.gw.redis)
    account, key = await on_cluster.account(credits="0.002")  # about 200 answers, not 500
    urls = [str(on_cluster.client.make_url("/v1/chat/completions")), str(other.make_url("/v1/chat/completions"))]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        statuses = list(await asyncio.gather(*(_fire(session, urls[i % 2], key, stream=i % 3 == 0)
                                               for i in range(500))))
    assert set(statuses) <= {200, 402}, set(statuses)
    assert statuses.count(200) > 0 and statuses.count(402) > 0
    await on_cluster.assert_conserved(account, other.app[GATEWAY])
    _served_once_each(on_cluster, account, statuses)
    await other.close()


async def test_200_concurrent_requests_on_a_20_rpm_plan_pass_exactly_20(on_cluster: Harness) -> None:
    account, key = await on_cluster.account(plan="rpm")
    url = str(on_cluster.client.make_url("/v1/chat/completions"))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        statuses = list(await asyncio.gather(*(_fire(session, url, key) for _ in range(200))))
    assert statuses.count(200) == 20 and statuses.count(429) == 180
    await on_cluster.assert_conserved(account)


async def test_the_reaper_of_another_app_returns_a_crashed_hold_once_and_then_forgets_the_account(
        on_cluster: Harness, cluster: LocalCluster, config_dir: Path) -> None:
    account, key = await on_cluster.account(credits=1)
    gw = on_cluster.gw
    assert gw.meter is not None and gw.auth is not None
    principal = await gw.auth.authenticate(key)
    q = quote(gw.config.rates("free", gw.config.route("demo-mini")), 10, 10)  # type: ignore[arg-type]
    await gw.meter.reserve(gw.schema.for_account(account), principal.key_id, "req_lost", "free", q, no_limits(q))
    holders = gw.schema.holders(bucket_of(account))
    assert on_cluster.redis.zscore(holders, account) is not None  # indexed before the hold was taken
    other = await _start(config_dir, cluster.url)
    reaper = other.app[GATEWAY]
    assert reaper.meter is not None
    assert await reap_once(reaper) == 0  # not due yet
    reaper.meter.clock_offset_ms = int(gw.settings.hold_lease_seconds * 1000) + INDEX_HORIZON_MS
    # while another process holds the bucket's lease, this one leaves the bucket alone
    lease = Lease(on_cluster.gw.redis, gw.schema.lease(bucket_of(account), "reap"))
    assert await lease.acquire()
    assert await reap_once(reaper) == 0
    await lease.release()
    assert await reap_once(reaper) == 1
    assert await reap_once(reaper) == 0
    assert (await on_cluster.assert_conserved(account))["charged"] == 0
    assert on_cluster.redis.zscore(holders, account) is not None  # the reaped hold's tombstone is left
    reaper.meter.clock_offset_ms += int(gw.settings.hold_tombstone_seconds * 1000)
    await reap_once(reaper)
    assert on_cluster.redis.zscore(holders, account) is None  # no hold, no tombstone: forgotten
    await other.close()


async def test_the_allowance_rolls_over_at_the_cycle_end(on_cluster: Harness) -> None:
    account, key = await on_cluster.account(plan="monthly")
    url = str(on_cluster.client.make_url("/v1/chat/completions"))
    async with aiohttp.ClientSession() as session:
        assert await _fire(session, url, key) == 200
        before = await on_cluster.assert_conserved(account)
        assert on_cluster.gw.meter is not None and on_cluster.gw.store is not None
        on_cluster.gw.meter.clock_offset_ms += 32 * DAY
        on_cluster.gw.store.clock_offset_ms += 32 * DAY
        assert await _fire(session, url, key) == 200
    after = await on_cluster.assert_conserved(account)
    assert after["expired"] == 2000 - before["charged"]  # the unused allowance of the old cycle
    assert after["cycle_used"] == after["charged"] - before["charged"] > 0
    assert after["allow"] == 2000 - after["cycle_used"]


async def _export(config_dir: Path, url: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "usage", "export", "--config-dir", str(config_dir), "--redis-url", url,
        *args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_listing_stats_and_exports_walk_every_account(on_cluster: Harness, cluster: LocalCluster,
                                                            config_dir: Path) -> None:
    made = [await on_cluster.account(credits=1) for _ in range(7)]
    url = str(on_cluster.client.make_url("/v1/chat/completions"))
    async with aiohttp.ClientSession() as session:
        for _, key in made:
            for _ in range(2):
                assert await _fire(session, url, key) == 200
    await on_cluster.gw.quiesce()
    listed, after = [], ""
    while True:
        status, page = await on_cluster.admin("GET", f"/admin/accounts?limit=3&after={after}")
        assert status == 200
        listed += [a["id"] for a in page["data"]]
        if not page["has_more"]:
            break
        after = listed[-1]
    assert listed == sorted(account for account, _ in made)
    status, stats = await on_cluster.admin("GET", "/admin/stats")
    assert stats["accounts"] == 7 and stats["requests_lifetime"] == 14
    events = [json.loads(line) for line in (await _export(config_dir, cluster.url, "--resume", "billing")).splitlines()]
    assert len(events) == 14 and [e["account_id"] for e in events] == sorted(e["account_id"] for e in events)
    assert await _export(config_dir, cluster.url, "--resume", "billing") == ""  # the cursors moved on
    first = made[0][0]
    assert on_cluster.redis.hget(KeySchema().for_account(first).exports, "billing") is not None


async def test_alerts_fire_and_webhooks_are_delivered(cluster: LocalCluster, config_dir: Path, emulator: TestServer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[dict[str, Any]] = []
    delivered = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        if {a["threshold"] for a in received if a["kind"] == "allowance"} >= {"80", "90"}:
            delivered.set()
        return web.Response(status=200)

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    hook_server = TestServer(receiver)
    await hook_server.start_server()
    monkeypatch.setenv("ALERT_URL", str(hook_server.make_url("/hook")))
    cluster.flush()
    client = await _start(config_dir, cluster.url, webhook_poll_seconds=0.02)
    h = Harness(client, cluster.client(), emulator)  # type: ignore[arg-type]
    account, key = await h.account(plan="alerting")
    big = {**BODY, "max_tokens": 200, "messages": [{"role": "user", "content": "go [[emu out=200]]"}]}
    for _ in range(12):
        async with client.post("/v1/chat/completions", json=big, headers={"Authorization": f"Bearer {key}"}) as r:
            await r.read()
    await h.gw.quiesce()
    await asyncio.wait_for(delivered.wait(), 10)
    fired = {json.loads(v)["id"] for v in h.redis.hgetall(KeySchema().for_account(account).alerts).values()}
    assert {"allowance"} <= {a["kind"] for a in received} and {a["id"] for a in received} <= fired
    await h.close()
    await client.close()
    await hook_server.close()


# ---------------------------------------------------------------- a slot moves mid-traffic


async def test_a_slot_moved_mid_traffic_loses_nothing_and_charges_nothing_twice(
        on_cluster: Harness, cluster: LocalCluster, config_dir: Path) -> None:
    other = await _start(config_dir, cluster.url)
    account, key = await on_cluster.account(credits="0.05")
    slot = slot_of(KeySchema().for_account(account).account)
    source = cluster.owner(slot)
    target = next(port for port in cluster.ports if port != source)
    urls = [str(on_cluster.client.make_url("/v1/chat/completions")), str(other.make_url("/v1/chat/completions"))]
    statuses: list[int] = []
    moving = True
    during: list[int] = []  # the statuses of requests answered while the slot was split

    async def traffic(worker: int) -> None:
        async with aiohttp.ClientSession() as session:
            while moving or len(statuses) < 100:
                status = await _fire(session, urls[worker % 2], key, stream=worker % 3 == 0)
                statuses.append(status)
                if split.is_set() and moving:
                    during.append(status)

    split = asyncio.Event()
    loop = asyncio.get_running_loop()

    def move() -> int:
        cluster.start_moving(slot, target)
        loop.call_soon_threadsafe(split.set)
        moved = cluster.migrate_keys(slot, source, target, batch=1, pause=0.1)  # traffic meets a split slot
        cluster.finish_moving(slot, target)
        return moved

    workers = [asyncio.create_task(traffic(i)) for i in range(12)]
    while len(statuses) < 30:
        await asyncio.sleep(0.01)  # some traffic before the move (it runs in this loop)
    moved = await asyncio.to_thread(move)
    moving = False
    await asyncio.gather(*workers)
    assert moved >= 5 and cluster.owner(slot) == target
    assert set(statuses) <= {200, 402, 503}, set(statuses)
    assert len(during) >= 10, during  # traffic did meet the slot half moved
    print(f"slot move: {moved} keys; while split {len(during)} answers: "
          f"{ {s: during.count(s) for s in set(during)} }; all: { {s: statuses.count(s) for s in set(statuses)} }")
    async with aiohttp.ClientSession() as session:  # after the move: the clients follow the slot
        for url in urls:
            assert await _fire(session, url, key) == 200
            statuses.append(200)
    await _settled(on_cluster.gw, other.app[GATEWAY])
    await on_cluster.assert_conserved(account, other.app[GATEWAY])
    _served_once_each(on_cluster, account, statuses)
    await other.close()


# ---------------------------------------------------------------- sentinel


async def test_a_sentinel_url_reaches_the_primary_it_names(tmp_path: Path) -> None:
    data_port, sentinel_port = free_port(), free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {data_port} 1\n")
    common = ["--save", "", "--appendonly", "no", "--dir", str(tmp_path), "--loglevel", "warning"]
    procs = [subprocess.Popen([redis_server_binary(), "--port", str(data_port), "--bind", "127.0.0.1", *common],  # noqa: S603
                              stdout=subprocess.DEVNULL),
             subprocess.Popen([redis_server_binary(), str(conf), "--sentinel", *common],  # noqa: S603
                              stdout=subprocess.DEVNULL)]
    client = connect_redis(f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster?db=0", 1.0)
    try:
        for _ in range(200):
            try:
                assert await client.set("gw:probe", "1")
                break
            except Exception:  # the sentinel and the primary are still starting (separate processes)
                await asyncio.sleep(0.05)
        assert await client.get("gw:probe") == "1"
        assert client.connection_pool.service_name == "mymaster"
    finally:
        await client.aclose()
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


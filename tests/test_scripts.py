"""The Lua scripts: registered once, headers honest, key counts right, keys hash-tagged (invariant 4),
NOSCRIPT and a restarted Redis handled, expired holds reaped exactly once (invariant 3)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
from conftest import SETUP_EVENTS, Harness, make_settings, no_limits

from gateway.app import connect_redis, create_app, reap_once
from gateway.config import load_config
from gateway.embedded import EmbeddedRedis
from gateway.errors import StoreUnavailable
from gateway.jobs import Lease
from gateway.keys import AccountKeys, KeySchema, bucket_of
from gateway.limits import Limit, encode
from gateway.metering import LimitReached, Meter, Quote, quote
from gateway.reaper import _forget_if_unchanged
from gateway.scripts import ScriptRunner, load_scripts, lua_dir
from gateway.store import Store
from gateway.views import iso

SCRIPTS = sorted(lua_dir().glob("*.lua"))
LIBS = sorted((lua_dir() / "lib").glob("*.lua"))


def test_every_lua_file_is_loaded_with_its_declared_key_count() -> None:
    scripts = load_scripts()
    assert {s.name for s in scripts.values()} == {p.stem.rsplit("-", 1)[0] for p in SCRIPTS}
    assert {"reserve", "settle", "release", "reap", "grant"} <= set(scripts)
    for path in SCRIPTS:
        script = scripts[path.stem.rsplit("-", 1)[0]]
        used = {int(n) for n in re.findall(r"KEYS\[(\d+)\]", path.read_text())}
        assert used == set(range(1, script.num_keys + 1)), path.name


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_each_script_states_keys_argv_and_returns_and_reads_time_from_redis(path: Path) -> None:
    text = path.read_text()
    header = "".join(line for line in text.splitlines() if line.startswith("--"))
    assert "KEYS[1]" in header and "ARGV[1]" in header and "Returns" in header
    assert len(text.splitlines()) <= 60
    # time only from Redis TIME (lib/clock.lua), shifted by the (test-only) offset: never a caller's clock
    if "now" in text:
        assert "redis.call('TIME')" in text or "now_ms(ARGV[" in text
    assert "os.time" not in text and "os.clock" not in text


@pytest.mark.parametrize("path", LIBS, ids=lambda p: p.name)
def test_library_files_are_short_local_helpers(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("-- lib/") and "Returns" in text and len(text.splitlines()) <= 60
    # nothing global: every helper is a local function, so a script sees only what it calls
    assert not re.search(r"^function ", text, re.MULTILINE)
    assert "KEYS[" not in text and "os.time" not in text


def test_every_account_key_carries_the_account_hash_tag() -> None:
    keys = KeySchema("gw:").for_account("acct_abc")
    names = [keys.account, keys.holds, keys.hold_expiry, keys.ledger, keys.key_ids, keys.api_key("key_1")]
    for name in names:
        assert "{acct_abc}" in name
        assert name.count("{") == 1


async def test_scripts_only_touch_keys_of_the_calling_account(harness: Harness) -> None:
    """Record the keys every script call receives during requests: all carry the account's tag."""
    account, key = await harness.account(credits=1)
    runner = harness.gw.meter.runner  # type: ignore[union-attr]
    seen: list[tuple[str, list[str]]] = []
    original = runner.run

    async def recording(name: str, keys: list[str], args: list[Any]) -> list[Any]:
        seen.append((name, list(keys)))
        return await original(name, keys, args)

    runner.run = recording  # type: ignore[method-assign]
    body = {"model": "demo-mini", "messages": [{"role": "user", "content": "hi"}]}
    for extra in ({}, {"stream": True}, {"messages": [{"role": "user", "content": "[[emu fail=500]]"}]}):
        resp = await harness.client.post("/v1/chat/completions", json={**body, **extra},
                                         headers={"Authorization": f"Bearer {key}"})
        await resp.read()
    await harness.gw.quiesce()
    assert {name for name, _ in seen} == {"reserve", "settle", "release"}
    for _name, keys in seen:
        assert all(f"{{{account}}}" in k for k in keys), keys
    # the scripts name no key of their own: everything they touch comes through KEYS
    for path in SCRIPTS:
        assert not re.search(r"redis\.call\('[A-Z]+', '", path.read_text()), path.name


async def test_a_flushed_script_cache_is_reloaded_transparently(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    harness.redis.script_flush()
    resp = await harness.client.post("/v1/chat/completions", json={
        "model": "demo-mini", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200
    assert (await harness.assert_conserved(account))["charged"] > 0


async def test_requests_work_after_redis_restarts(own_redis: EmbeddedRedis, config_dir: Path, emulator: Any,
                                                  aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(make_settings(config_dir, own_redis.url)))
    h = Harness(client, sync_redis.Redis.from_url(own_redis.url), emulator)
    account, key = await h.account(credits=1)
    body = {"model": "demo-mini", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {key}"}
    assert (await client.post("/v1/chat/completions", json=body, headers=headers)).status == 200
    await h.gw.quiesce()
    own_redis.restart()  # data comes back from the append-only file
    h.redis = sync_redis.Redis.from_url(own_redis.url)
    h.redis.script_flush()  # Redis 6 replays SCRIPT LOAD from the AOF; make sure the cache is empty
    assert not h.redis.script_exists(load_scripts()["reserve"].sha)[0]
    assert (await client.post("/v1/chat/completions", json=body, headers=headers)).status == 200
    state = await h.assert_conserved(account)
    assert state["requests"] == 2
    await h.close()


async def test_reaper_returns_expired_holds_exactly_once(redis_url: str, config_dir: Path) -> None:
    """A gateway that crashed after reserving: the reaper of any process returns the hold, once."""
    schema = KeySchema()
    client = connect_redis(redis_url, 1.0)
    runner = ScriptRunner(client, load_scripts())
    config = load_config(config_dir)
    store = Store(client, schema, runner)
    account = await store.create_account(config, "crash", "free")
    await store.grant(account, 1_000_000)
    new_key = await store.create_key(account)
    crashed = Meter(runner, lease_ms=60_000)
    keys = schema.for_account(account)
    q = quote(config.rates("free", config.route("demo-mini")), 100, 100)  # type: ignore[arg-type]
    reservation = await crashed.reserve(keys, new_key.id, "req_crashed", "free", q, no_limits(q))
    assert reservation.hold > 0
    # before the lease ends nothing is reaped
    assert await crashed.reap(keys) == (0, 0)
    # a process whose scripts see the clock 61 s later (test-only offset) finds the lease expired
    later = Meter(runner, lease_ms=60_000, clock_offset_ms=61_000)
    assert await later.reap(keys) == (1, reservation.hold)
    assert await later.reap(keys) == (0, 0)  # idempotent: a second reaper finds nothing
    # the process comes back and settles: the hold is gone, but the request is still charged, once,
    # out of credits no other hold claims
    late = await crashed.settle(keys, "req_crashed", new_key.id, 50, {"outcome": "late"})
    assert (late.settled, late.charged) == (True, 50)
    again = await crashed.settle(keys, "req_crashed", new_key.id, 50, {"outcome": "late"})
    assert (again.settled, again.charged) == (False, 0)
    raw = await client.hgetall(keys.account)
    assert int(raw["held"]) == 0 and int(raw["charged"]) == 50
    ended = [f for _id, f in await client.xrange(keys.ledger) if f["type"] not in SETUP_EVENTS]
    assert [e["type"] for e in ended] == ["reaped", "usage"] and ended[1]["reaped"] == "1"
    await client.aclose()


async def test_reaper_task_finds_every_account_holding_credits_through_the_index(harness: Harness) -> None:
    account, key = await harness.account(credits=1)
    gw = harness.gw
    assert gw.meter is not None
    principal = await gw.auth.authenticate(key)  # type: ignore[union-attr]
    q = quote(gw.config.rates("free", gw.config.route("demo-mini")), 10, 10)  # type: ignore[arg-type]
    await gw.meter.reserve(gw.schema.for_account(account), principal.key_id, "req_lost", "free", q, no_limits(q))
    assert harness.holds(account)
    # indexed before the hold was taken, whoever called the reserve script (here: a test, not the proxy)
    assert harness.redis.zscore(gw.schema.holders(bucket_of(account)), account) is not None
    gw.meter.clock_offset_ms = int(gw.settings.hold_lease_seconds * 1000) + 1000
    # a bucket whose read times out (a loaded loop) is left for the next pass: a few passes at most
    reaped = [await reap_once(gw) for _ in range(3)]
    gw.meter.clock_offset_ms = 0
    assert sum(reaped) == 1 and reaped.count(1) == 1  # returned exactly once
    assert (await harness.assert_conserved(account))["charged"] == 0


async def test_a_failed_index_write_refuses_the_hold(harness: Harness) -> None:
    """No hold without its index entry: the guard runs first, and when it fails the script does not run."""
    account, key = await harness.account(credits=1)
    gw = harness.gw
    assert gw.meter is not None and gw.auth is not None
    principal = await gw.auth.authenticate(key)
    holders = gw.schema.holders(bucket_of(account))
    harness.redis.set(holders, "not a sorted set")  # the index write now fails (WRONGTYPE)
    q = quote(gw.config.rates("free", gw.config.route("demo-mini")), 10, 10)  # type: ignore[arg-type]
    with pytest.raises(sync_redis.ResponseError):
        await gw.meter.reserve(gw.schema.for_account(account), principal.key_id, "req_x", "free", q, no_limits(q))
    assert harness.holds(account) == {} and harness.state(account)["held"] == 0


async def test_the_reaper_forgets_an_account_only_if_no_gateway_indexed_it_meanwhile(harness: Harness) -> None:
    key = harness.gw.schema.holders(3)
    harness.redis.zadd(key, {"acct_a": 5, "acct_b": 5})
    harness.redis.zadd(key, {"acct_a": 10**13}, gt=True)  # a gateway indexed acct_a after the reaper read 5
    assert await _forget_if_unchanged(harness.gw.redis, key, "acct_a", 5.0) is False
    assert await _forget_if_unchanged(harness.gw.redis, key, "acct_b", 5.0) is True
    assert {m.decode() for m in harness.redis.zrange(key, 0, -1)} == {"acct_a"}


async def test_a_job_lease_has_one_holder_and_is_taken_over_once_it_ends(harness: Harness) -> None:
    key = harness.gw.schema.lease(5, "reap")
    first, second = Lease(harness.gw.redis, key, 5000), Lease(harness.gw.redis, key, 5000)
    assert await first.acquire() and not await second.acquire()
    assert await first.renew() and 0 < harness.redis.pttl(key) <= 5000
    harness.redis.delete(key)  # as if it expired: its holder stopped renewing (it died)
    assert await second.acquire()
    assert not await first.renew()  # no longer ours: never extended ...
    await first.release()
    assert harness.redis.get(key) == second.token.encode()  # ... nor deleted
    await second.release()
    assert not harness.redis.exists(key)


async def _reserve_directly(harness: Harness, request_id: str) -> tuple[str, Any, Any, Meter]:
    """Create an account and hold a small request for it through the app's own meter."""
    account, key = await harness.account(credits=1)
    gw = harness.gw
    assert gw.meter is not None and gw.auth is not None
    principal = await gw.auth.authenticate(key)
    keys = gw.schema.for_account(account)
    q = quote(gw.config.rates("free", gw.config.route("demo-mini")), 10, 10)  # type: ignore[arg-type]
    await gw.meter.reserve(keys, principal.key_id, request_id, "free", q, no_limits(q))
    return account, principal, q, gw.meter


async def test_settling_twice_has_no_effect_the_second_time(harness: Harness) -> None:
    account, principal, _q, meter = await _reserve_directly(harness, "req_twice")
    keys = harness.gw.schema.for_account(account)
    first = await meter.settle(keys, "req_twice", principal.key_id, 5, {"outcome": "ok"})
    second = await meter.settle(keys, "req_twice", principal.key_id, 5, {"outcome": "ok"})
    assert first.settled is True and first.charged == 5
    assert second.settled is False and second.charged == 0
    assert await meter.release(keys, "req_twice", "late") is False
    state = await harness.assert_conserved(account)
    assert state["charged"] == 5


async def test_a_retried_reserve_returns_the_hold_it_already_took(harness: Harness) -> None:
    account, principal, q, meter = await _reserve_directly(harness, "req_dup")
    keys = harness.gw.schema.for_account(account)
    held = harness.state(account)["held"]
    again = await meter.reserve(keys, principal.key_id, "req_dup", "free", q, no_limits(q))
    assert again.hold == held and harness.state(account)["held"] == held  # nothing held twice
    await meter.release(keys, "req_dup", "test")
    with pytest.raises(StoreUnavailable):  # an ended request id is never reserved again
        await meter.reserve(keys, principal.key_id, "req_dup", "free", q, no_limits(q))
    await harness.assert_conserved(account)


def _script_now(harness: Harness) -> int:
    """The moment the meter's scripts see now: Redis TIME plus the meter's clock offset (ms)."""
    seconds, micros = harness.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000 + harness.gw.meter.clock_offset_ms  # type: ignore[union-attr]


async def _direct(harness: Harness, micro: int = 1_000_000) -> tuple[str, str, AccountKeys, Meter, Quote]:
    """An account granted `micro` micro-credits, its key id, its Redis keys, the app's meter and a small quote."""
    gw = harness.gw
    assert gw.meter is not None and gw.store is not None and gw.auth is not None
    account = await gw.store.create_account(gw.config, "direct", "free")
    await gw.store.grant(account, micro)
    key = await gw.store.create_key(account)
    q = quote(gw.config.rates("free", gw.config.route("demo-mini")), 10, 10)  # type: ignore[arg-type]
    return account, key.id, gw.schema.for_account(account), gw.meter, q


async def test_last_used_at_follows_requests_to_the_second(harness: Harness) -> None:
    """The reserve rewrites a key's last_used_ms only once it is a second old (not on every request of a
    busy key): requests further apart still move it, forwards and, after a clock moved back, backwards."""
    account, key = await harness.account(credits=1)
    principal = await harness.gw.auth.authenticate(key)  # type: ignore[union-attr]
    record = harness.gw.schema.for_account(account).api_key(principal.key_id)
    body = {"model": "demo-mini", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {key}"}

    async def request() -> int:
        before = _script_now(harness)
        assert (await harness.client.post("/v1/chat/completions", json=body, headers=headers)).status == 200
        last = int(harness.redis.hget(record, "last_used_ms") or 0)
        assert before - 1000 < last <= _script_now(harness)  # to the second
        return last

    first = await request()
    harness.shift_clock(5_000)
    assert await request() >= first + 5_000
    harness.shift_clock(-65_000)  # a minute before the first request: the field follows
    moved_back = await request()
    assert moved_back < first
    status, keys = await harness.admin("GET", f"/admin/accounts/{account}/keys")
    assert status == 200 and keys["data"][0]["last_used_at"] == iso(moved_back)


async def test_window_buckets_count_and_leave_the_window_when_their_list_is_not_rewritten(harness: Harness) -> None:
    """A settle into a bucket that already counted something leaves the window's bucket list alone; the
    window still counts every request in it, refuses past its cap with the time until it frees, and its
    bucket leaves the window (and Redis) once the window has moved past it."""
    _account, key_id, keys, meter, q = await _direct(harness)
    row = Limit("requests_per_minute", "n", 3, "k", 60_000, 10_000)  # 10-s buckets: no call straddles one
    spec = replace(no_limits(q), limits=encode([row]))
    meter.clock_offset_ms = 0
    now = _script_now(harness)
    meter.clock_offset_ms = (now // 10_000 + 1) * 10_000 + 5_000 - now  # 5 s into a bucket
    bucket = (now + meter.clock_offset_ms) // 10_000
    name = f"k:{key_id}:requests_per_minute"
    for i in range(3):
        await meter.reserve(keys, key_id, f"req_w{i}", "free", q, spec)
        await meter.settle(keys, f"req_w{i}", key_id, 1, {}, spec.limits)
        assert harness.redis.hget(keys.limits, f"b:{name}") == str(bucket).encode()
    assert harness.redis.hget(keys.limits, f"w:{name}:{bucket}") == b"3"
    with pytest.raises(LimitReached) as refused:
        await meter.reserve(keys, key_id, "req_w3", "free", q, spec)
    assert (refused.value.used, refused.value.cap) == (3, 3)
    assert 50_000 < refused.value.frees_in_ms <= 55_000  # the bucket leaves the window 55 s after now
    meter.clock_offset_ms += 60_000  # the window has moved past the bucket
    await meter.reserve(keys, key_id, "req_w4", "free", q, spec)
    await meter.settle(keys, "req_w4", key_id, 1, {}, spec.limits)
    fields = {k.decode(): v.decode() for k, v in harness.redis.hgetall(keys.limits).items()}
    assert {k: v for k, v in fields.items() if k.startswith(("w:", "b:"))} == {
        f"w:{name}:{bucket + 6}": "1", f"b:{name}": str(bucket + 6)}


async def test_balances_and_counters_past_1e14_micro_credits_stay_exact(harness: Harness) -> None:
    """Lua's own number-to-text conversion keeps 14 digits: every amount the scripts write stays exact
    up to 2^53 micro-credits (the balance, the hold, the charge, the counters and the ledger event)."""
    granted = 9_000_000_000_000_007
    account, key_id, keys, meter, _q = await _direct(harness, granted)
    worst, cost = 123_456_789_012_347, 123_456_789_012_345
    q = Quote(10, 10, 3, worst, 3)
    reservation = await meter.reserve(keys, key_id, "req_big", "free", q, no_limits(q))
    assert reservation.hold == worst and reservation.available_after == granted - worst
    assert int(harness.redis.hget(keys.account, "held")) == worst  # type: ignore[arg-type]
    settled = await meter.settle(keys, "req_big", key_id, cost, {"outcome": "ok"}, tokens=10**15 + 1)
    assert (settled.charged, settled.available, settled.balance, settled.cycle_used) == (
        cost, granted - cost, granted - cost, cost)
    raw = {k.decode(): v.decode() for k, v in harness.redis.hgetall(keys.account).items()}
    assert (raw["extra"], raw["held"], raw["charged"], raw["cycle_used"], raw["tokens"]) == (
        str(granted - cost), "0", str(cost), str(cost), str(10**15 + 1))
    assert harness.ledger(account)[-1]["cost"] == str(cost)
    await harness.assert_conserved(account)


async def test_holds_in_the_previous_scripts_formats_still_end_exactly(harness: Harness) -> None:
    """Holds live in Redis across a deploy: a record the previous scripts wrote (with parts, or a bare
    amount from before holds had parts) is settled and released by these scripts as it was taken."""
    account, key_id, keys, meter, _q = await _direct(harness, 1_000)
    harness.redis.hincrby(keys.account, "held", 500)
    harness.redis.hset(keys.holds, mapping={"req_parts": "300 0 0 0 20 0", "req_bare": "200"})
    settled = await meter.settle(keys, "req_parts", key_id, 250, {"outcome": "ok"})
    assert (settled.charged, settled.available) == (250, 1_000 - 250 - 200)
    assert await meter.release(keys, "req_bare", "test") is True
    state = await harness.assert_conserved(account)
    assert (state["extra"], state["charged"]) == (750, 250)
    assert harness.redis.hget(keys.holds, "req_parts") == b"~s" and harness.redis.hget(keys.holds, "req_bare") == b"~x"


async def test_one_reap_call_returns_every_expired_hold_of_the_account(harness: Harness) -> None:
    """The reaper ends all the expired holds it finds in one call against the account's balance, written
    back once: every hold comes back, and nothing else moves."""
    account, key_id, keys, meter, q = await _direct(harness)
    holds = [(await meter.reserve(keys, key_id, f"req_lost{i}", "free", q, no_limits(q))).hold for i in range(3)]
    assert harness.state(account)["held"] == sum(holds)
    later = Meter(meter.runner, lease_ms=meter.lease_ms, clock_offset_ms=meter.lease_ms + 1_000)
    assert await later.reap(keys) == (3, sum(holds))
    state = await harness.assert_conserved(account)
    assert (state["extra"], state["charged"]) == (1_000_000, 0)
    assert [e["type"] for e in harness.ledger(account)[-3:]] == ["reaped"] * 3


async def test_a_settle_given_amounts_as_non_canonical_text_still_counts_them_exactly(harness: Harness) -> None:
    """The settle hands the caller's own text to HINCRBY only when Redis reads it as an integer as it
    is ('52', not '52.0' or '052'): any other spelling of a whole number is counted as its value."""
    account, key_id, keys, meter, q = await _direct(harness)
    await meter.reserve(keys, key_id, "req_text", "free", q, no_limits(q))
    reply = await meter.runner.run("settle", [keys.account, keys.holds, keys.hold_expiry, keys.ledger, keys.limits],
                                   ["req_text", "52.0", 0, key_id, "{}", "", "010", 0, 3_600_000])
    assert reply[:2] == [0, 52]
    raw = harness.redis.hgetall(keys.account)
    assert (raw[b"charged"], raw[b"cycle_used"], raw[b"tokens"], raw[b"cycle_tokens"]) == (b"52", b"52", b"10", b"10")
    assert harness.ledger(account)[-1]["cost"] == "52"
    await harness.assert_conserved(account)

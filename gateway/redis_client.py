"""Connecting to Redis: standalone, Redis Cluster or Sentinel, from one URL, always failing fast.

- `redis://host:port/0`, `rediss://…`, `unix:///path.sock`: one server (redis-py's own URL syntax).
- `redis+cluster://[user:password@]host:port,host:port[?…]` (`rediss+cluster://` with TLS): a Redis
  Cluster; the hosts are startup nodes, the client learns the rest from them and follows MOVED/ASK.
- `redis+sentinel://[user:password@]host:port,host:port/service_name[?db=0&password=…]`: the primary
  of `service_name` as the Sentinels name it, found again after a failover. `password` in the query is
  the data nodes' password (the userinfo one is the Sentinels' password when both are given).

Every client has short socket timeouts and one immediate retry on a broken connection only: a
Redis that is away becomes a 503 within a second (invariant 6), never a hang.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import hiredis
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis._parsers.base import BaseParser
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

MAX_CONNECTIONS = 512


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What a Redis URL names: its kind, its hosts and the options of the URL."""

    kind: str  # "standalone", "cluster" or "sentinel"
    url: str  # the URL as given (standalone: passed to redis-py unchanged)
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""  # sentinel: the monitored primary's name
    username: str | None = None
    password: str | None = None
    tls: bool = False
    options: dict[str, str] = field(default_factory=dict)  # the query string, one value per name


def _hosts(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    found = []
    for part in netloc.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):  # [ipv6]:port
            host, _, port = part[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
        if not host:
            raise ValueError(f"a host in {netloc!r} has no name")
        try:
            found.append((host, int(port) if port else default_port))
        except ValueError:
            raise ValueError(f"the port of {part!r} is not a number") from None
    if not found:
        raise ValueError("the URL names no host")
    return tuple(found)


def parse_redis_url(url: str) -> RedisTarget:
    """Read a Redis URL (see the module docstring); raises ValueError naming what is wrong."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError("a Redis URL looks like redis://host:port, redis+cluster://h:p,h:p or "
                         "redis+sentinel://h:p,h:p/service")
    if scheme in ("redis", "rediss", "unix"):
        return RedisTarget("standalone", url)
    if scheme not in ("redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel"):
        raise ValueError(f"unknown Redis URL scheme {scheme!r}")
    # urlsplit refuses several hosts in one netloc: take the userinfo and host list apart by hand
    netloc, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    if "?" in netloc:
        netloc, _, query = netloc.partition("?")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if colon else None)
    options = {name: values[-1] for name, values in parse_qs(query).items()}
    tls = scheme.startswith("rediss")
    if scheme.endswith("+cluster"):
        return RedisTarget("cluster", url, _hosts(hostlist, 6379), "", username, password, tls, options)
    service = unquote(path.strip("/"))
    if not service:
        raise ValueError("a redis+sentinel:// URL names the service after the hosts: "
                         "redis+sentinel://host:26379,host2:26379/mymaster")
    return RedisTarget("sentinel", url, _hosts(hostlist, 26379), service, username, password, tls, options)


class _SentinelPrimary(aioredis.Redis):
    """The primary's client, which also closes its connections to the Sentinels when closed."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        pool: Any = self.connection_pool  # a SentinelConnectionPool (master_for made it)
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()


def _fail_fast(timeout: float) -> dict[str, Any]:
    """Short timeouts, and a single immediate retry only on a broken connection (a pooled connection
    left over from before a Redis restart or failover), never on a timeout."""
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout, "decode_responses": True,
            "retry": Retry(NoBackoff(), 1, supported_errors=(redis_errors.ConnectionError,)),
            "health_check_interval": 0}


def connect_redis(url: str, timeout: float) -> Any:
    """A client for `url` (standalone, cluster or sentinel) that fails fast. Nothing is sent yet."""
    target = parse_redis_url(url)
    common = _fail_fast(timeout)
    if target.kind == "standalone":
        client = PipelinedRedis.from_url(url, retry_on_timeout=False, max_connections=MAX_CONNECTIONS, **common)
        assert isinstance(client, PipelinedRedis)
        client.auto = AutoPipeline.from_url(url, timeout)
        return client
    if target.kind == "cluster":
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
            username=target.username, password=target.password, ssl=target.tls,
            max_connections=MAX_CONNECTIONS, require_full_coverage=False,
            # MOVED patches the slot map in place; redis-py's periodic full re-read (every 5th MOVED by
            # default) closes every node connection while other requests are using them
            reinitialize_steps=0,
            # `retry` here is the cluster's: one retry after a connection error, timeout or CLUSTERDOWN,
            # with the slot map read again (a failover); MOVED / ASK are followed within a call
            **common)
    data_password = target.options.get("password", target.password)
    sentinel_auth = {"password": target.password, "username": target.username} if target.password else {}
    sentinel_kwargs = {**sentinel_auth, "socket_timeout": timeout, "socket_connect_timeout": timeout}
    sentinel = Sentinel(list(target.hosts), sentinel_kwargs=sentinel_kwargs,  # type: ignore[no-untyped-call]
                        ssl=target.tls, **({"username": target.username} if target.username else {}))
    return sentinel.master_for(target.service, redis_class=_SentinelPrimary, password=data_password,
                               db=int(target.options.get("db", 0)), max_connections=MAX_CONNECTIONS,
                               retry_on_timeout=False, **common)


def is_cluster(client: Any) -> bool:
    """Whether `client` talks to a Redis Cluster (commands then go to the node owning each key's slot)."""
    return isinstance(client, RedisCluster)


class _Connection(asyncio.Protocol):
    """One connection of an AutoPipeline: its commands not yet written, and the futures of the
    commands written, in order. When it fails, it fails all of them and is never used again (a
    connection's late callbacks touch only its own state, never its successor's)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(encoding="utf-8", errors="surrogateescape")
        # each command's future and the loop time by which its reply is due
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.batch: list[bytes] = []
        self.flush_scheduled = False
        self.lost = False
        self.watchdog: asyncio.TimerHandle | None = None

    @property
    def usable(self) -> bool:
        return not self.lost and self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's is no subclass)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if not waiting:  # a reply nobody waits for: the stream is out of step
                self.fail(redis_errors.ConnectionError("unexpected reply from Redis"))
                return
            future = waiting.popleft()[0]
            if future.done():  # its caller was cancelled or timed out
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(BaseParser.parse_error(str(reply)))  # type: ignore[no-untyped-call]
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(redis_errors.ConnectionError("Connection to Redis lost"))

    def send(self, packed: bytes, future: asyncio.Future[Any]) -> None:
        """Queue a packed command for this tick's write; its reply is due within `timeout`."""
        due = self.loop.time() + self.timeout
        self.batch.append(packed)
        self.waiting.append((future, due))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)
        if self.watchdog is None:
            self.watchdog = self.loop.call_at(due, self._check)

    def _check(self) -> None:
        """The connection's one timer (not one per command: replies come in order, so only the
        oldest unanswered command's deadline matters): a command whose caller still waits past its
        deadline fails the connection, as a per-command timer would."""
        self.watchdog = None
        if self.lost:
            return
        now = self.loop.time()
        for future, due in self.waiting:
            if due > now:
                self.watchdog = self.loop.call_at(due, self._check)
                return
            if not future.done():
                self.fail(redis_errors.TimeoutError("Timeout reading from Redis"))
                return

    def flush(self) -> None:
        self.flush_scheduled = False
        batch, self.batch = self.batch, []
        if self.lost or self.transport is None:
            return  # its futures have failed already
        self.transport.write(b"".join(batch))

    def fail(self, error: Exception) -> None:
        """Fail every command in flight and drop the connection (its replies would be out of step)."""
        self.lost = True
        waiting, self.waiting, self.batch = self.waiting, collections.deque(), []
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        if self.transport is not None:
            self.transport.abort()
        for future, _due in waiting:
            if not future.done():
                future.set_exception(error)


class AutoPipeline:
    """A connection to a standalone Redis on which every command issued in the same event-loop
    tick is written in one batch (as ioredis's auto-pipelining does): the hot path's script calls
    cost one `write` per tick for all requests in flight, with hiredis packing and parsing, and no
    connection pool, lock or task per command.

    Fails fast like the pooled client: the connect and every reply have `timeout`; a reply that does
    not come in time drops the connection (the other replies of its batch are lost too, their
    callers get `TimeoutError`) and the next command connects again. A connection found closed
    before a command is written is replaced first; one that breaks after it was written is
    reported, not retried (the caller decides: the scripts are idempotent per request id).
    """

    def __init__(self, host: str = "localhost", port: int = 6379, *, path: str | None = None,
                 username: str | None = None, password: str | None = None, db: int = 0,
                 timeout: float = 1.0) -> None:
        self.host, self.port, self.path = host, port, path
        self.username, self.password, self.db, self.timeout = username, password, db, timeout
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._closed = False

    @classmethod
    def from_url(cls, url: str, timeout: float) -> AutoPipeline | None:
        """For a redis:// or unix:// URL; None for anything else (TLS, cluster, sentinel)."""
        if not url.lower().startswith(("redis://", "unix://")):
            return None
        kw = parse_url(url)
        return cls(str(kw.get("host", "localhost")), int(kw.get("port", 6379)), path=kw.get("path"),
                   username=kw.get("username"), password=kw.get("password"), db=int(kw.get("db", 0) or 0),
                   timeout=timeout)

    async def execute(self, *args: str | int | bytes) -> Any:
        """Send one command (in the current tick's batch) and wait for its reply."""
        conn = self._conn
        if conn is None or not conn.usable:
            conn = await self._connect()
        future: asyncio.Future[Any] = conn.loop.create_future()
        conn.send(hiredis.pack_command(args), future)  # type: ignore[arg-type]
        return await future

    async def _connect(self) -> _Connection:
        if self._closed:
            raise redis_errors.ConnectionError("The Redis client is closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            self._conn = await asyncio.shield(connecting)
            return self._conn
        finally:
            if connecting.done():
                self._connecting = None

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(loop, self.timeout)
        try:
            async with asyncio.timeout(self.timeout):
                if self.path:
                    transport, _ = await loop.create_unix_connection(lambda: conn, self.path)
                else:
                    transport, _ = await loop.create_connection(lambda: conn, self.host, self.port)
                    sock = transport.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.transport = transport  # uvloop calls connection_made later
        except TimeoutError:
            raise redis_errors.TimeoutError("Timeout connecting to Redis") from None
        except OSError as exc:
            raise redis_errors.ConnectionError(f"Error connecting to Redis: {exc}") from None
        hello: list[tuple[str | int, ...]] = []
        if self.password is not None:
            hello.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        if self.db:
            hello.append(("SELECT", self.db))
        for command in hello:
            future: asyncio.Future[Any] = loop.create_future()
            conn.send(hiredis.pack_command(command), future)  # type: ignore[arg-type]
            try:
                async with asyncio.timeout(self.timeout):
                    await future
            except TimeoutError:
                conn.fail(redis_errors.TimeoutError("Timeout reading from Redis"))
                raise redis_errors.TimeoutError("Timeout reading from Redis") from None
            except redis_errors.RedisError:
                conn.fail(redis_errors.ConnectionError("Redis refused the connection's setup"))
                raise
        return conn

    async def aclose(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.fail(redis_errors.ConnectionError("The Redis client is closed"))


class PipelinedRedis(aioredis.Redis):
    """The standalone client, plus an `AutoPipeline` for the hot path's script calls (see
    `gateway.scripts.ScriptRunner`); everything else goes through redis-py's pool as before."""

    auto: AutoPipeline | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        if self.auto is not None:
            await self.auto.aclose()
        await super().aclose(close_connection_pool)

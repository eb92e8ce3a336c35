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

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
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
        return aioredis.from_url(url, retry_on_timeout=False, max_connections=MAX_CONNECTIONS, **common)
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

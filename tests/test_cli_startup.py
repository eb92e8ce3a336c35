"""What a newcomer runs into at startup (found by a newcomer's run of the README): a second gateway on
the same data directory, busy ports, a Redis URL that is wrong or unreachable, a log format that is
not one, a reader that closes the pipe. Each is one line and an exit code, never a traceback, and a
second embedded Redis never splits the store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_cli import gateway

from gateway.embedded import EmbeddedRedis, EmbeddedRedisBusy


def _one_line_error(done: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert done.returncode == code, (done.returncode, done.stderr)
    assert words in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_one_embedded_redis_per_data_directory(tmp_path: Path) -> None:
    """A second server on the same append-only file would split the store (the first gateway keeps
    its connection, the second's exit removes the socket, later commands start a third): refused."""
    first = EmbeddedRedis(tmp_path / "data")
    first.start()
    try:
        with pytest.raises(EmbeddedRedisBusy) as busy:
            EmbeddedRedis(tmp_path / "data").start()
        assert "another process already runs the embedded Redis" in str(busy.value.code)
        assert (tmp_path / "data" / "redis.sock").exists() and first.running  # the first one is untouched
        first.restart()  # a restart keeps the directory's lock
        with pytest.raises(EmbeddedRedisBusy):
            EmbeddedRedis(tmp_path / "data").start()
    finally:
        first.stop()
    second = EmbeddedRedis(tmp_path / "data")  # once the first has stopped, the directory is free again
    second.start()
    second.stop()


def test_a_second_serve_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    holder = EmbeddedRedis(tmp_path / "data")  # what a running `gateway serve` holds
    holder.start()
    try:
        done = gateway("serve", "--port", str(_free_port()), "--data-dir", str(tmp_path / "data"),
                       "--config-dir", str(ROOT / "config"))
        _one_line_error(done, 1, "another process already runs the embedded Redis")
        assert holder.running and (tmp_path / "data" / "redis.sock").exists()
    finally:
        holder.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("option", ["--port", "--emulator-port"])
def test_a_busy_port_is_one_line_before_anything_starts(option: str, redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        ports = {"--port": busy if option == "--port" else str(_free_port()),
                 "--emulator-port": busy if option == "--emulator-port" else str(_free_port())}
        done = gateway("serve", "--with-emulator", *[x for kv in ports.items() for x in kv],
                       "--redis-url", redis_url, cwd=ROOT)
    _one_line_error(done, 2, f"cannot listen on 127.0.0.1:{busy} ({option})")
    assert "gateway listening" not in done.stderr  # nothing started (no demo sending calls to a stranger)


def test_a_redis_url_that_is_wrong_or_unreachable_is_one_line() -> None:
    _one_line_error(gateway("accounts", "list", env={"REDIS_URL": "redis://:secret-pass@127.0.0.1:1/0"}),
                    1, "Redis did not answer")
    done = gateway("accounts", "list", env={"REDIS_URL": "redis://:secret-pass@127.0.0.1:1/0"})
    assert "secret-pass" not in done.stderr + done.stdout
    _one_line_error(gateway("stats", env={"REDIS_URL": "notaurl"}), 2, "REDIS_URL")
    _one_line_error(gateway("serve", "--port", str(_free_port()), env={"REDIS_URL": "notaurl"}, cwd=ROOT), 2,
                    "REDIS_URL")


def test_a_log_format_that_is_not_one_is_refused(redis_url: str) -> None:
    done = gateway("serve", "--port", str(_free_port()), "--redis-url", redis_url, "--config-dir",
                   str(ROOT / "config"), env={"GATEWAY_LOG_FORMAT": "xml"})
    _one_line_error(done, 2, "GATEWAY_LOG_FORMAT must be text or json, got 'xml'")


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly() -> None:
    """`gateway check-config --json | head -c 10`: the reader left before the output was written."""
    script = ("import os, sys\n"
              "r, w = os.pipe(); os.close(r); os.dup2(w, 1)\n"
              "from gateway.cli import main\n"
              "sys.exit(main(['check-config', '--json', '--config-dir', sys.argv[1]]))\n")
    done = subprocess.run([sys.executable, "-c", script, str(ROOT / "config")], capture_output=True, text=True,  # noqa: S603
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60, check=False)
    assert done.returncode == 141 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr

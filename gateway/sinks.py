"""Where the shipper puts ledger events for good: rotated JSONL files, or CloudEvents batches over HTTP.

A sink's `deliver` returns only once every event it was given is durable (written and fsynced, or
answered 2xx); anything else raises, and the shipper retries the same batch. Events are CloudEvents
1.0 in structured JSON, the format of `gateway usage export --format cloudevents`.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp

from gateway.secret import Secret
from gateway.settings import Settings

BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"


class SinkError(Exception):
    """A delivery that did not land (the batch is retried)."""


class Sink(Protocol):
    """Durable storage for ledger events."""

    async def deliver(self, events: list[dict[str, Any]]) -> None:
        """Store every event durably, or raise."""

    async def close(self) -> None:
        """Release what the sink holds open."""


def _line(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":")) + "\n"


class FileSink:
    """JSONL files under `directory/YYYY-MM-DD/`, one per hour (or day) of writing and per process
    (`tag`, host and pid by default, so processes never share a file), a new part once one would pass
    `max_bytes`. A batch is appended and fsynced before `deliver` returns. A line torn by a crash
    (the batch was never acknowledged, so it is shipped again) is cut off when the file is next opened."""

    def __init__(self, directory: Path, rotate: str = "hour", max_bytes: int = 256 * 1024 * 1024,
                 tag: str | None = None, clock: Callable[[], float] = time.time) -> None:
        if rotate not in ("hour", "day"):
            raise ValueError(f"rotate must be 'hour' or 'day', not {rotate!r}")
        self.directory = directory
        self.rotate = rotate
        self.max_bytes = max_bytes
        self.tag = tag or f"{socket.gethostname()}-{os.getpid()}"
        self.clock = clock
        self._checked: set[Path] = set()  # files whose tail this sink has made whole

    def path_for(self, size: int) -> Path:
        """The file the next `size` bytes go to: this period's newest part with room for them."""
        now = datetime.fromtimestamp(self.clock(), UTC)
        period = now.strftime("%Y-%m-%dT%H" if self.rotate == "hour" else "%Y-%m-%d")
        folder = self.directory / now.strftime("%Y-%m-%d")
        part = 0
        while True:
            path = folder / f"ledger-{period}-{self.tag}{f'.{part}' if part else ''}.jsonl"
            try:
                used = path.stat().st_size
            except FileNotFoundError:
                return path
            if used == 0 or used + size <= self.max_bytes:
                return path
            part += 1

    async def deliver(self, events: list[dict[str, Any]]) -> None:
        if events:
            await asyncio.to_thread(self._append, "".join(_line(e) for e in events).encode())

    def _append(self, data: bytes) -> None:
        path = self.path_for(len(data))
        created = not path.exists()
        if created:
            _make_dirs(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            if path not in self._checked:
                _cut_torn_tail(fd)
                self._checked.add(path)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # the new file's name must survive a power cut too
            _fsync_dir(path.parent)

    async def close(self) -> None:
        return None


def _make_dirs(folder: Path) -> None:
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for made in missing:
        _fsync_dir(made.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cut_torn_tail(fd: int) -> None:
    """Truncate a file that does not end with a newline back to its last newline."""
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    keep, step = size, 4096
    while keep > 0:
        start = max(keep - step, 0)
        chunk = os.pread(fd, keep - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            os.ftruncate(fd, start + cut + 1)
            os.fsync(fd)
            return
        keep = start
    os.ftruncate(fd, 0)
    os.fsync(fd)


class HttpSink:
    """CloudEvents batches (`application/cloudevents-batch+json`, a JSON array) POSTed to `url`, e.g.
    OpenMeter's `/api/v1/events`; only a 2xx answer counts as delivered. Receivers deduplicate by `id`."""

    def __init__(self, url: str, token: Secret | None = None, timeout_seconds: float = 10.0) -> None:
        self.url = url
        self.token = token or Secret("")
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def deliver(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        headers = {"Content-Type": BATCH_CONTENT_TYPE}
        if self.token.reveal():
            headers["Authorization"] = f"Bearer {self.token.reveal()}"
        body = json.dumps(events, separators=(",", ":")).encode()
        async with self._session.post(self.url, data=body, headers=headers) as resp:
            await resp.read()
            if not 200 <= resp.status < 300:
                raise SinkError(f"the ledger sink answered {resp.status}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def make_sink(settings: Settings) -> Sink | None:
    """The sink GATEWAY_LEDGER_SINK names: `file` (under the data directory), `file:///a/dir`, a plain
    directory path, or an `http(s)://` URL; None when it is unset."""
    spec = settings.ledger_sink
    if not spec:
        return None
    if spec.startswith(("http://", "https://")):
        return HttpSink(spec, settings.ledger_sink_token)
    return FileSink(sink_directory(settings), settings.ledger_file_rotate, settings.ledger_file_max_bytes)


def sink_directory(settings: Settings) -> Path:
    """The directory of a file sink (`file`: `<data dir>/ledger`)."""
    spec = settings.ledger_sink or "file"
    if spec == "file":
        return settings.data_dir / "ledger"
    return Path(urlsplit(spec).path) if spec.startswith("file://") else Path(spec)

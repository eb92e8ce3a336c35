"""The typed application keys: everything long-lived lives in the app, nothing at module level."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gateway.auth import Authenticator
from gateway.config import Config
from gateway.dialects.base import Dialect
from gateway.keys import KeySchema
from gateway.metering import Meter
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.settlement import Leases, Retries
from gateway.store import Store
from gateway.supervision import EmbeddedStatus
from gateway.upstream_client import UpstreamClient


@dataclass
class Gateway:
    """The running gateway's resources, built by `create_app` and its cleanup contexts."""

    settings: Settings
    config: Config
    schema: KeySchema
    metrics: Metrics
    dialects: dict[str, Dialect]
    retries: Retries
    leases: Leases = field(default_factory=Leases)
    redis: Any = None
    meter: Meter | None = None
    store: Store | None = None
    auth: Authenticator | None = None
    session: aiohttp.ClientSession | None = None
    upstream: UpstreamClient | None = None  # the metered hot path's lean client
    pending: set[asyncio.Task[Any]] = field(default_factory=set)
    inflight: dict[asyncio.Task[Any], web.Request] = field(default_factory=dict)  # metered handlers running
    cycle_cache: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)  # (anchor, tz) -> cycle
    fired_alerts: set[tuple[str, str]] = field(default_factory=set)  # (account, alert field) known fired
    embedded: EmbeddedStatus | None = None  # the embedded redis-server, when this process owns it
    draining: bool = False  # shutting down: the listeners are closed, requests in flight finish

    def track(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Keep a settlement task alive until it finishes, even if its request is gone."""
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        return task

    @contextlib.contextmanager
    def serving(self, request: web.Request) -> Iterator[None]:
        """A metered request's handler runs (forwarding and settling in its own task: aiohttp does not
        cancel a handler whose client leaves, and a stop never cancels one before `stop_deadline_seconds`;
        at the end of the grace period `cut_clients` closes its connection instead)."""
        task = asyncio.current_task()
        if task is None:
            yield
            return
        self.inflight[task] = request
        try:
            yield
        finally:
            del self.inflight[task]

    def cut_clients(self) -> int:
        """The grace period is over: close the client connections of the metered requests still in
        flight. Their handlers go on as for a client that left: a stream is read on for its usage (up
        to `drain_seconds`) and every hold is settled or released. Returns how many were cut."""
        cut = 0
        for request in self.inflight.values():
            transport = request.transport
            if transport is not None and not transport.is_closing():
                transport.abort()
                cut += 1
        return cut

    async def pending_settlements(self) -> None:
        """Wait for settlements already started (at shutdown: their requests are gone)."""
        while self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)

    async def quiesce(self) -> None:
        """Wait until every metered request in flight and every settlement has finished."""
        while self.inflight or self.pending:
            await asyncio.gather(*self.inflight, *self.pending, return_exceptions=True)


@contextlib.asynccontextmanager
async def in_background(loop: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run a background loop (reaper, webhook deliverer, config watcher) for the block's duration,
    then cancel it and wait for it to end."""
    task = asyncio.create_task(loop)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def stopping() -> bool:
    """True in a background task that was asked to stop. A loop checks it on every turn: redis-py can
    swallow the cancellation of a command in flight (or turn it into a connection error), so the
    CancelledError a loop counts on may never arrive."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


GATEWAY = web.AppKey("gateway", Gateway)
REQUEST_ID = web.RequestKey("request_id", str)
REQUEST_DIALECT = web.RequestKey("dialect", Dialect)

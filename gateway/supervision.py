"""Keeping child processes alive: how often one may be restarted, and the loop that restarts the
embedded redis-server for the process that owns it (the app of a single-process gateway; the master
of several workers runs the same policy in its own loop, gateway.master).

A child that dies is restarted after a short backoff that doubles with each restart in the last
minute; one restart more than `per_minute` within a minute means it keeps dying, and the owner gives
up loudly (the master exits non-zero; the app's `/health` answers 503) so that an orchestrator acts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gateway.embedded import EmbeddedRedis

log = logging.getLogger("gateway.supervision")

_WINDOW = 60.0


class RestartBudget:
    """Restarts allowed for one kind of child: `next_delay()` is the wait before the next restart,
    or None when `per_minute` restarts already happened within the last minute."""

    def __init__(self, first_delay: float, per_minute: int, max_delay: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.first_delay = first_delay
        self.per_minute = per_minute
        self.max_delay = max_delay
        self._clock = clock
        self._recent: deque[float] = deque()

    def next_delay(self) -> float | None:
        now = self._clock()
        while self._recent and now - self._recent[0] >= _WINDOW:
            self._recent.popleft()
        if len(self._recent) >= self.per_minute:
            return None
        self._recent.append(now)
        return min(self.first_delay * 2.0 ** (len(self._recent) - 1), self.max_delay)


@dataclass
class EmbeddedStatus:
    """The embedded redis-server as the process that owns it sees it (for `/health`)."""

    state: str = "running"  # running | restarting | failed (not restarted again: the gateway needs a restart)
    restarts: int = 0


async def keep_running(embedded: EmbeddedRedis, budget: RestartBudget, status: EmbeddedStatus,
                       stopping: Callable[[], bool], poll_seconds: float = 0.1) -> None:
    """Restart `embedded` with its data directory (its append-only file) whenever it dies, within
    `budget`; past it, mark the status failed and stop trying."""
    while not stopping():
        await asyncio.sleep(poll_seconds)
        if embedded.running:
            continue
        delay = budget.next_delay()
        if delay is None:
            status.state = "failed"
            log.error("the embedded redis-server keeps dying (more than %d restarts in a minute): not restarted "
                      "again; /health answers 503 (see %s)", budget.per_minute, embedded.data_dir / "redis.log")
            return
        status.state = "restarting"
        log.warning("the embedded redis-server exited (status %s); restarting it in %.1f s",
                    embedded.exit_code, delay)
        await asyncio.sleep(delay)
        try:
            await asyncio.to_thread(embedded.start)
        except (RuntimeError, OSError) as exc:
            log.error("the embedded redis-server did not start again: %s", exc)
            continue
        status.restarts += 1
        status.state = "running"
        log.warning("the embedded redis-server is running again at %s", embedded.location)

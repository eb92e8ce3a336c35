"""The master process of `gateway serve --workers N`: it serves nothing itself.

- Starts N worker processes that share the port (SO_REUSEPORT), and restarts one that dies, after a
  short backoff; when they keep dying (more than `max_restarts_per_minute` restarts in a minute) it
  stops the others and exits non-zero.
- Owns the embedded redis-server (when there is no Redis URL) and restarts it, with its data, the
  same way; when it cannot be kept running the master stops the workers and exits non-zero.
- Owns the prometheus-client multiprocess directory: made private and empty at start, a dead worker's
  live gauges are dropped from it (`mark_process_dead`), removed at exit.
- SIGHUP is forwarded to every worker (configuration reload). SIGTERM (or SIGINT) is forwarded too:
  each worker stops accepting connections, lets requests in flight finish for up to
  `shutdown_grace_seconds` and settles them; the master waits for that, then stops Redis and exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from gateway.embedded import EmbeddedRedis
from gateway.settings import Settings
from gateway.supervision import RestartBudget

log = logging.getLogger("gateway.master")

_POLL = 0.1  # how often the master looks at its children when no worker has exited
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def make_metrics_dir() -> Path:
    """A private, empty directory for the workers' metric files; PROMETHEUS_MULTIPROC_DIR points at it
    so that the workers (spawned after this) import prometheus_client in multiprocess mode."""
    path = Path(tempfile.mkdtemp(prefix="gw-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)
    return path


@dataclass
class Master:
    """Supervise `count` workers made by `make_worker` (and `embedded`, when it owns one)."""

    settings: Settings
    count: int
    make_worker: Callable[[], BaseProcess]
    embedded: EmbeddedRedis | None = None
    workers: dict[int, BaseProcess] = field(default_factory=dict)  # by sentinel
    restarts_due: list[float] = field(default_factory=list)  # monotonic times
    redis_due: float | None = None
    signals: list[int] = field(default_factory=list)
    exit_code: int = 0

    def __post_init__(self) -> None:
        backoff, cap = self.settings.restart_backoff_seconds, self.settings.max_restarts_per_minute
        self.worker_budget = RestartBudget(backoff, cap)
        self.redis_budget = RestartBudget(backoff, cap)

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT or until giving up; returns the process exit code."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            for _ in range(self.count):
                self._start_worker()
            while self._turn():
                pass
            self._drain()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._kill_all()
        return self.exit_code

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signals.append(signum)

    def _start_worker(self) -> None:
        worker = self.make_worker()
        worker.start()
        self.workers[worker.sentinel] = worker
        log.info("worker %s started", worker.pid)

    def _turn(self) -> bool:
        """One look at signals and children; False once the master should stop."""
        for sentinel in wait(list(self.workers), timeout=_POLL):
            assert isinstance(sentinel, int)
            self._worker_exited(self.workers.pop(sentinel))
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGHUP:
                self._forward(signal.SIGHUP)
            else:
                log.info("%s: draining the workers (up to %.0f s for requests in flight)",
                         signal.Signals(signum).name, self.settings.shutdown_grace_seconds)
                return False
        if self.exit_code:
            return False
        now = time.monotonic()
        for due in [d for d in self.restarts_due if d <= now]:
            self.restarts_due.remove(due)
            self._start_worker()
        return self._watch_redis(now)

    def _worker_exited(self, worker: BaseProcess) -> None:
        worker.join()
        if self.settings.metrics_dir is not None and worker.pid is not None:
            mark_process_dead(worker.pid, str(self.settings.metrics_dir))  # type: ignore[no-untyped-call]
        delay = self.worker_budget.next_delay()
        if delay is None:
            log.error("worker %s exited (status %s) and workers keep dying (more than %d restarts in a minute): "
                      "stopping the gateway", worker.pid, worker.exitcode, self.settings.max_restarts_per_minute)
            self.exit_code = 1
            return
        log.warning("worker %s exited (status %s); starting another in %.1f s", worker.pid, worker.exitcode, delay)
        self.restarts_due.append(time.monotonic() + delay)

    def _watch_redis(self, now: float) -> bool:
        embedded = self.embedded
        if embedded is None or embedded.running:
            return True
        if self.redis_due is None:
            delay = self.redis_budget.next_delay()
            if delay is None:
                log.error("the embedded redis-server keeps dying (more than %d restarts in a minute): stopping "
                          "the gateway (see %s)", self.settings.max_restarts_per_minute,
                          embedded.data_dir / "redis.log")
                self.exit_code = 1
                return False
            log.warning("the embedded redis-server exited (status %s); restarting it in %.1f s",
                        embedded.exit_code, delay)
            self.redis_due = now + delay
        elif now >= self.redis_due:
            self.redis_due = None
            try:
                embedded.start()
            except (RuntimeError, OSError) as exc:
                log.error("the embedded redis-server did not start again: %s", exc)
            else:
                log.warning("the embedded redis-server is running again at %s", embedded.location)
        return True

    def _forward(self, signum: int) -> None:
        for worker in self.workers.values():
            if worker.pid is not None and worker.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signum)

    def _drain(self) -> None:
        """SIGTERM every worker and wait while they finish their requests and settle them: the grace
        period, then a stream cut at its end may read on for its usage (`drain_seconds`) and queued
        settlements are retried (`settle_drain_seconds`). A worker still there after all that is killed."""
        self._forward(signal.SIGTERM)
        s = self.settings
        deadline = time.monotonic() + s.stop_deadline_seconds
        while self.workers and time.monotonic() < deadline:
            for sentinel in wait(list(self.workers), timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
                assert isinstance(sentinel, int)
                worker = self.workers.pop(sentinel)
                worker.join()
                if worker.exitcode:
                    log.warning("worker %s exited with status %s while draining", worker.pid, worker.exitcode)
            if self.signals and self.signals.pop(0) == signal.SIGHUP:
                self._forward(signal.SIGHUP)
            self._watch_redis(time.monotonic())  # the workers still settle: keep their Redis up
        for worker in self.workers.values():
            log.error("worker %s did not finish draining in time: killed", worker.pid)
            self.exit_code = 1

    def _kill_all(self) -> None:
        for worker in self.workers.values():
            if worker.is_alive():
                worker.kill()
            worker.join(5)
        self.workers.clear()


def cleanup_metrics_dir(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
        if os.environ.get(MULTIPROC_ENV) == str(path):
            del os.environ[MULTIPROC_ENV]

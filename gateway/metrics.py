"""Prometheus metrics, in a registry owned by one app (no global state).

With several worker processes (`gateway serve --workers N`) every worker also writes its values to
prometheus-client's multiprocess files in a directory the master made (`Settings.metrics_dir`, also
PROMETHEUS_MULTIPROC_DIR, which must be set before prometheus_client is imported: the master sets it
before it spawns the workers), and a scrape of any worker renders the sum over every worker, living
or dead (counters and histograms), and over the living ones (gauges).

Labels only ever carry configured names (route patterns, upstream names, dialects) and status
codes: never a key, never a raw model string from a request (that would be unbounded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

from gateway import __version__

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 60)

M = TypeVar("M", Counter, Gauge, Histogram)


class Labelled(Generic[M]):
    """A labelled metric whose children are bound once per label tuple: `labels(...)` on the hot path is
    then one dict lookup (prometheus-client validates and locks on every call of its own)."""

    __slots__ = ("_children", "metric")

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def labels(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class Metrics:
    """Every metric the gateway exports; `multiprocess_dir` (the master's) makes a scrape the whole gateway's."""

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        if multiprocess_dir is not None and not getattr(values.ValueClass, "_multiprocess", False):
            raise RuntimeError("multiprocess metrics need PROMETHEUS_MULTIPROC_DIR set before prometheus_client "
                               "is imported")
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Labelled(Counter("gateway_requests_total",
                                         "Requests answered, by dialect, model route and status",
                                         ["dialect", "model", "status"], registry=r))
        self.tokens = Labelled(Counter("gateway_tokens_total", "Billed tokens by model route and kind",
                                       ["model", "kind"], registry=r))
        self.credits = Labelled(Counter("gateway_credits_charged_total", "Credits charged by model route",
                                        ["model"], registry=r))
        self.usd = Labelled(Counter("gateway_usd_charged_total",
                                    "Provider list cost (USD) of settled requests, by model route", ["model"],
                                    registry=r))
        self.upstream_seconds = Labelled(Histogram("gateway_upstream_seconds", "Upstream time to response headers",
                                                   ["upstream"], buckets=_LATENCY_BUCKETS, registry=r))
        self.upstream_errors = Labelled(Counter("gateway_upstream_errors_total",
                                                "Upstream calls that failed, by upstream and cause "
                                                "(connect, timeout, redirect, protocol, status_4xx, status_5xx)",
                                                ["upstream", "cause"], registry=r))
        self.ttft = Labelled(Histogram("gateway_time_to_first_token_seconds",
                                       "Streams: time from the request to its first content bytes sent",
                                       ["dialect", "model"], buckets=_TTFT_BUCKETS, registry=r))
        self.in_flight = Labelled(Gauge("gateway_requests_in_flight", "Metered requests being forwarded",
                                        ["dialect"], multiprocess_mode="livesum", registry=r))
        self.webhook_queue = Gauge("gateway_webhook_queue_depth", "Webhook deliveries queued (all processes)",
                                   multiprocess_mode="livemax", registry=r)
        self.webhook_deliveries = Labelled(Counter("gateway_webhook_deliveries_total",
                                                   "Webhook delivery attempts, by result (delivered, failed: "
                                                   "retried later, gave_up: dropped after the last attempt)",
                                                   ["result"], registry=r))
        self.overhead_seconds = Histogram("gateway_overhead_seconds",
                                          "Time spent in the gateway itself (auth, reserve, settle)",
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self.open_holds = Gauge("gateway_open_holds", "Reservations held by requests in flight",
                                multiprocess_mode="livesum", registry=r)
        self.redis_errors = Counter("gateway_redis_errors_total", "Requests failed closed: Redis unreachable",
                                    registry=r)
        self.lowered = Labelled(Counter("gateway_output_cap_lowered_total", "Requests whose output cap was lowered",
                                        ["model"], registry=r))
        self.reaped = Counter("gateway_reaped_holds_total", "Expired holds returned by the reaper", registry=r)
        self.limited = Labelled(Counter("gateway_limited_total", "Requests refused by a plan or key limit",
                                        ["limit"], registry=r))
        self.config_reloads = Counter("gateway_config_reloads_total", "Configuration reloads, by result",
                                      ["result"], registry=r)
        self.estimated = Labelled(Counter("gateway_estimated_settlements_total",
                                          "Settlements charged from an estimate (no usage reported)", ["model"],
                                          registry=r))
        self.settle_retries = Counter("gateway_settlement_retries_total",
                                      "Settlements and cancellations queued in the process because Redis failed",
                                      ["op"], registry=r)
        self.settle_abandoned = Counter("gateway_settlements_abandoned_total",
                                        "Queued settlements or cancellations given up at shutdown", ["op"],
                                        registry=r)
        self.uncollected = Counter("gateway_uncollected_credits_total",
                                   "Credits served but not collectable (the balance could not pay)", registry=r)
        self.connections_refused = Counter("gateway_connections_refused_total",
                                           "Connections closed at once: the client address had too many open",
                                           registry=r)
        self.lease_renewals = Counter("gateway_lease_renewals_total", "Hold leases renewed for requests in flight",
                                      registry=r)
        self.build_info = Gauge("gateway_build_info", "The gateway's version (always 1)", ["version"],
                                multiprocess_mode="livemax", registry=r)
        self.build_info.labels(__version__).set(1)

    def render(self) -> bytes:
        """The exposition text: this app's registry, or with multiprocess files every worker's."""
        if self.multiprocess_dir is None:
            return bytes(generate_latest(self.registry))
        combined = CollectorRegistry(auto_describe=True)
        MultiProcessCollector(combined, path=str(self.multiprocess_dir))  # type: ignore[no-untyped-call]
        return bytes(generate_latest(combined))

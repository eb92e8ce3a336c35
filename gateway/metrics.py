"""Prometheus metrics, in a registry owned by one app (no global state).

Labels only ever carry configured names (route patterns, upstream names, dialects) and status
codes: never a key, never a raw model string from a request (that would be unbounded).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("gateway_requests_total", "Requests answered, by dialect, model route and status",
                                ["dialect", "model", "status"], registry=r)
        self.tokens = Counter("gateway_tokens_total", "Billed tokens by model route and kind",
                              ["model", "kind"], registry=r)
        self.credits = Counter("gateway_credits_charged_total", "Credits charged by model route",
                               ["model"], registry=r)
        self.upstream_seconds = Histogram("gateway_upstream_seconds", "Upstream time to response headers",
                                          ["upstream"], buckets=_LATENCY_BUCKETS, registry=r)
        self.overhead_seconds = Histogram("gateway_overhead_seconds",
                                          "Time spent in the gateway itself (auth, reserve, settle)",
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self.open_holds = Gauge("gateway_open_holds", "Reservations held by this process", registry=r)
        self.redis_errors = Counter("gateway_redis_errors_total", "Requests failed closed: Redis unreachable",
                                    registry=r)
        self.lowered = Counter("gateway_output_cap_lowered_total", "Requests whose output cap was lowered",
                               ["model"], registry=r)
        self.reaped = Counter("gateway_reaped_holds_total", "Expired holds returned by the reaper", registry=r)
        self.limited = Counter("gateway_limited_total", "Requests refused by a plan or key limit", ["limit"],
                               registry=r)
        self.config_reloads = Counter("gateway_config_reloads_total", "Configuration reloads, by result",
                                      ["result"], registry=r)
        self.estimated = Counter("gateway_estimated_settlements_total",
                                 "Settlements charged from an estimate (no usage reported)", ["model"], registry=r)
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

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))

"""
C{GET /metrics}: the balancer's counters in the Prometheus text format,
written by prometheus_client.

Nothing is counted for Prometheus on the hot path: a custom collector
reads the counters the balancer keeps anyway (L{txbalancer.backend.Backend},
its L{txbalancer.stats.ResponseStats}, the pools, the listeners) when a
scrape comes.  Each balancer has a C{CollectorRegistry} of its own, not the
process-wide default, so two balancers in one process do not clash.

Every metric (labels: C{pool}, C{backend} = C{host:port}, ...):

    txbalancer_backend_requests_total{code}    responses by status class
                                               (code="2xx", ...)
    txbalancer_backend_attempts_total          requests sent (or tried)
    txbalancer_backend_failures_total          connect failures, broken
                                               responses, timeouts
    txbalancer_backend_response_seconds        histogram: request sent ->
                                               response head
    txbalancer_backend_in_flight               requests in flight
    txbalancer_backend_up                      1 if up, else 0
    txbalancer_backend_state{state}            1 for its current state
    txbalancer_backend_weight                  its weight now
    txbalancer_backend_health_checks_total{result}   pass, fail, draining
    txbalancer_backend_ejections_total         passive ejections
    txbalancer_backend_ejected                 1 while ejected
    txbalancer_pool_in_flight                  requests in flight (queued too)
    txbalancer_pool_queue_length               requests waiting for room
    txbalancer_pool_retries_total              attempts after the first
    txbalancer_listener_connections{listener}  open client connections
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from txbalancer.admin.server import JSONResource
from txbalancer.stats import BUCKETS

__all__ = ["BalancerCollector", "MetricsResource", "registryFor"]

STATES = ("up", "down", "draining", "disabled")


class BalancerCollector:
    """
    A prometheus_client collector of one balancer's live counters.
    """

    def __init__(self, balancer: Any) -> None:
        self.balancer = balancer

    def describe(self) -> list[Metric]:
        # Nothing to check against other collectors: the registry is ours.
        return []

    def collect(self) -> Iterator[Metric]:
        b = ["pool", "backend"]
        requests = CounterMetricFamily(
            "txbalancer_backend_requests",
            "Responses from the backend, by status class.",
            labels=b + ["code"],
        )
        attempts = CounterMetricFamily(
            "txbalancer_backend_attempts",
            "Requests sent (or tried: a refused connect counts) to the backend.",
            labels=b,
        )
        failures = CounterMetricFamily(
            "txbalancer_backend_failures",
            "Connect failures, broken responses and timeouts of the backend.",
            labels=b,
        )
        latency = HistogramMetricFamily(
            "txbalancer_backend_response_seconds",
            "Seconds from sending a request to the backend to its response head.",
            labels=b,
        )
        inFlight = GaugeMetricFamily(
            "txbalancer_backend_in_flight", "Requests in flight to the backend.",
            labels=b,
        )
        up = GaugeMetricFamily(
            "txbalancer_backend_up",
            "1 if the backend is up (healthy, not drained or disabled), else 0.",
            labels=b,
        )
        state = GaugeMetricFamily(
            "txbalancer_backend_state",
            "1 for the backend's current state (up, down, draining, disabled).",
            labels=b + ["state"],
        )
        weight = GaugeMetricFamily(
            "txbalancer_backend_weight", "The backend's weight now (slow start ramps it).",
            labels=b,
        )
        checks = CounterMetricFamily(
            "txbalancer_backend_health_checks",
            "Active health checks of the backend, by result.",
            labels=b + ["result"],
        )
        ejections = CounterMetricFamily(
            "txbalancer_backend_ejections",
            "Times passive outlier detection ejected the backend.",
            labels=b,
        )
        ejected = GaugeMetricFamily(
            "txbalancer_backend_ejected", "1 while the backend is ejected.",
            labels=b,
        )
        tcpConnections = CounterMetricFamily(
            "txbalancer_backend_connections",
            "TCP-mode client connections relayed to the backend.",
            labels=b,
        )
        bytesIn = CounterMetricFamily(
            "txbalancer_backend_received_bytes",
            "TCP-mode bytes received from the backend.",
            labels=b,
        )
        bytesOut = CounterMetricFamily(
            "txbalancer_backend_sent_bytes",
            "TCP-mode bytes sent to the backend.",
            labels=b,
        )
        poolInFlight = GaugeMetricFamily(
            "txbalancer_pool_in_flight",
            "Requests in flight in the pool, waiting ones included.",
            labels=["pool"],
        )
        queue = GaugeMetricFamily(
            "txbalancer_pool_queue_length",
            "Requests waiting for a backend under its max_conns.",
            labels=["pool"],
        )
        retries = CounterMetricFamily(
            "txbalancer_pool_retries",
            "Attempts after a request's first (another backend, or a fresh connection).",
            labels=["pool"],
        )
        connections = GaugeMetricFamily(
            "txbalancer_listener_connections",
            "Open client connections of the listener.",
            labels=["listener"],
        )
        balancer = self.balancer
        for name, runtime in balancer.pools.items():
            checker = runtime.checker
            outliers = runtime.outliers
            for backend in runtime.pool.backends:
                labels = [name, backend.address]
                stats = backend.stats
                for code, n in stats.byClass().items():
                    requests.add_metric(labels + [code], n)
                attempts.add_metric(labels, backend.requests)
                failures.add_metric(labels, backend.failures)
                cumulative = []
                total = 0
                for bound, n in zip(BUCKETS, stats.buckets):
                    total += n
                    cumulative.append((_le(bound), total))
                total += stats.buckets[-1]
                cumulative.append(("+Inf", total))
                latency.add_metric(labels, cumulative, sum_value=stats.total)
                inFlight.add_metric(labels, backend.active)
                current = backend.reported
                up.add_metric(labels, 1 if current == "up" else 0)
                for s in STATES:
                    state.add_metric(labels + [s], 1 if s == current else 0)
                weight.add_metric(labels, backend.weight)
                if backend in checker:
                    results = checker.status(backend).get("results") or {}
                    for result, n in results.items():
                        checks.add_metric(labels + [result], n)
                ejections.add_metric(labels, backend.ejections)
                tcpConnections.add_metric(labels, backend.connections)
                bytesIn.add_metric(labels, backend.bytesIn)
                bytesOut.add_metric(labels, backend.bytesOut)
                ejected.add_metric(
                    labels,
                    1 if outliers is not None and outliers.isEjected(backend) else 0,
                )
            poolInFlight.add_metric([name], runtime.forwarder.inFlight)
            queue.add_metric([name], len(runtime.pool.waiting))
            retries.add_metric([name], runtime.forwarder.retries)
        for endpoint, factory in balancer.listening:
            connections.add_metric([endpoint], len(factory.connections))
        yield from (
            requests, attempts, failures, latency, inFlight, up, state, weight,
            checks, ejections, ejected, tcpConnections, bytesIn, bytesOut,
            poolInFlight, queue, retries, connections,
        )


def _le(bound: float) -> str:
    return repr(float(bound))


def registryFor(balancer: Any) -> CollectorRegistry:
    """
    A registry of C{balancer}'s own, holding its L{BalancerCollector}.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BalancerCollector(balancer))
    return registry


class MetricsResource(JSONResource):
    """
    The exposition, rendered in the reactor thread (the collector reads
    live state, which only the reactor thread may touch).
    """

    isLeaf = True

    def __init__(self, balancer: Any) -> None:
        JSONResource.__init__(self)
        self.registry = registryFor(balancer)

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return generate_latest(self.registry)

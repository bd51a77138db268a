"""
C{GET /status}: the state of every pool and backend as JSON.

The shape is DESIGN.md's::

    {"pools": {NAME: {"strategy": ..., "backends": [
        {"address": "127.0.0.1:3001", "state": "up" | "down" | "draining" | "disabled",
         "weight": N, "in_flight": N, "requests": N,
         "responses": {"2xx": N, "3xx": N, "4xx": N, "5xx": N},
         "latency_ms": {"p50": X, "p99": X}}, ...]}},
     "workers": N}

plus, per backend, its health checks (C{"health"}: last check, its result,
consecutive passes and failures, totals, when the state last changed) and
its ejections (C{"ejections"}); per pool, requests in flight, the queue,
retries, and the removed backends still finishing requests; and the balancer's clock and listeners.  Times are Unix seconds.
"""

from __future__ import annotations

from typing import Any

from txbalancer.admin.server import JSONResource, jsonError, jsonResponse

__all__ = ["StatusResource", "backendStatus", "balancerStatus", "poolStatus"]


def backendStatus(runtime: Any, backend: Any, now: float) -> dict[str, Any]:
    """
    One backend of C{runtime} (a L{txbalancer.balancer.PoolRuntime}).
    """
    stats = backend.stats
    result: dict[str, Any] = {
        "address": backend.address,
        "state": backend.reported,
        "weight": backend.weight,
        "in_flight": backend.active,
        "requests": backend.requests,
        "responses": stats.byClass(),
        "latency_ms": stats.latency(now),
        "scheme": backend.scheme,
        "backup": backend.backup,
        "max_conns": backend.maxConns,
        "failures": backend.failures,
        # TCP mode: connections relayed, and bytes each way.
        "connections": backend.connections,
        "bytes_in": backend.bytesIn,
        "bytes_out": backend.bytesOut,
    }
    checker = runtime.checker
    health: dict[str, Any] = {"checks": bool(checker.active), "state_changed": backend.stateSince}
    if backend in checker:
        h = checker.status(backend)
        health.update(
            {
                "state": h["state"],
                "last_check": h["lastCheck"],
                "last_result": h.get("lastResult"),
                "last_error": h["lastError"],
                "consecutive_passes": h["consecutivePasses"],
                "consecutive_failures": h["consecutiveFailures"],
                "results": h.get("results"),
            }
        )
    result["health"] = health
    ejections: dict[str, Any] = {"count": backend.ejections, "ejected": False,
                                 "ejected_until": None}
    outliers = runtime.outliers
    if outliers is not None:
        o = outliers.status(backend)
        ejections["ejected"] = o["ejected"]
        ejections["ejected_until"] = backend.ejectedUntil if o["ejected"] else None
        ejections["consecutive_failures"] = o["consecutiveRequestFailures"]
    result["ejections"] = ejections
    return result


def poolStatus(runtime: Any, now: float) -> dict[str, Any]:
    """
    One pool: its strategy and backends, then what is pool-wide.
    """
    pool = runtime.pool
    return {
        "strategy": runtime.config.strategy,
        "backends": [backendStatus(runtime, b, now) for b in pool.backends],
        "in_flight": runtime.forwarder.inFlight,
        "queue_length": len(pool.waiting),
        "retries": runtime.forwarder.retries,
        "panic": pool.panic,
        # Backends removed while requests were in flight to them, until
        # the last one finishes.
        "removing": [
            {"address": b.address, "in_flight": b.active} for b in pool.leaving
        ],
    }


def balancerStatus(balancer: Any) -> dict[str, Any]:
    """
    The whole of C{/status} for C{balancer}.
    """
    now = balancer.reactor.seconds()
    return {
        "pools": {
            name: poolStatus(runtime, now) for name, runtime in balancer.pools.items()
        },
        "workers": 1,
        "time": now,
        "listeners": [
            {"endpoint": endpoint, "connections": len(factory.connections)}
            for endpoint, factory in balancer.listening
        ],
    }


class StatusResource(JSONResource):
    isLeaf = True

    def __init__(self, balancer: Any) -> None:
        JSONResource.__init__(self)
        self.balancer = balancer

    def render_GET(self, request: Any) -> bytes:
        if request.postpath not in ([], [b""]):
            return jsonError(request, 404, "no such admin resource")
        return jsonResponse(request, 200, balancerStatus(self.balancer))

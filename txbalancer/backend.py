"""
A backend: where it is (its spec from the backends file) and how it is
doing right now (requests in flight, counters).

Pure: no reactor, no I/O.  The pool owns the Backend objects; the proxy
updates their live state as requests come and go.
"""

from __future__ import annotations

from typing import Any, Optional

from txbalancer.stats import ResponseStats


class Backend:
    """
    One upstream server and its live state.

    @ivar spec: the L{txbalancer.config.BackendSpec} it was built from.
    @ivar active: requests in flight to it right now.
    @ivar requests: requests sent to it since start.
    @ivar failures: connect failures and broken responses since start (in
        TCP mode: failed connects and relays the backend reset).
    @ivar connections: TCP-mode (and tunnel) connections relayed to it
        since start; C{active} counts those open now.
    @ivar bytesOut: bytes relayed to it (TCP mode and tunnels).
    @ivar bytesIn: bytes relayed from it (TCP mode and tunnels).
    @ivar available: whether the chooser may pick it now (see the pool).
    @ivar state: its health: C{"up"}, C{"down"} or C{"draining"}.
    @ivar disabled: the operator took it out (admin API): no traffic,
        whatever its health; L{reported} then says C{"disabled"}.
    @ivar stateSince: when its reported state last changed (the pool's
        clock), or L{None} without a clock.
    @ivar ejections: how many times passive outlier detection ejected it.
    @ivar ejectedUntil: when its last ejection ends (or ended).
    @ivar stats: its L{ResponseStats}: responses by class, latencies.
    """

    __slots__ = (
        "spec",
        "address",
        "host",
        "port",
        "scheme",
        "weight",
        "active",
        "requests",
        "failures",
        "available",
        "state",
        "backup",
        "priority",
        "maxConns",
        # -- tcp mode
        "connections",
        "bytesIn",
        "bytesOut",
        "disabled",
        "stateSince",
        "ejections",
        "ejectedUntil",
        "stats",
    )

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.address: str = spec.address
        self.host: str = spec.host
        self.port: int = spec.port
        self.scheme: str = spec.scheme
        self.weight: int = spec.weight
        self.active = 0
        self.requests = 0
        self.failures = 0
        self.available = True
        self.state = "up"
        self.backup: bool = spec.backup
        self.priority: int = spec.priority
        self.maxConns: int = spec.max_conns
        # -- tcp mode
        self.connections = 0
        self.bytesIn = 0
        self.bytesOut = 0
        self.disabled = False
        self.stateSince: Optional[float] = None
        self.ejections = 0
        self.ejectedUntil: Optional[float] = None
        self.stats = ResponseStats()

    def __repr__(self) -> str:
        return f"<Backend {self.scheme}://{self.address} weight={self.weight}>"

    @property
    def reported(self) -> str:
        """
        The state shown to people: C{"disabled"} when the operator took it
        out, else its health state.
        """
        return "disabled" if self.disabled else self.state

    def status(self) -> dict[str, Any]:
        """
        A plain dict of this backend's state, for logs and status pages.
        """
        return {
            "address": self.address,
            "scheme": self.scheme,
            "weight": self.weight,
            "available": self.available,
            "state": self.reported,
            "backup": self.backup,
            "priority": self.priority,
            "active": self.active,
            "requests": self.requests,
            "failures": self.failures,
            "connections": self.connections,
            "bytes_in": self.bytesIn,
            "bytes_out": self.bytesOut,
        }

"""
The health check of TCP mode: a backend is healthy when it accepts a TCP
connection within the check's timeout (then the connection is closed at
once, without a byte sent).

L{TCPConnectChecker} is a L{txbalancer.health.HealthChecker} whose probe is
a connect instead of C{GET path}: the same rise and fall, intervals,
jitter, state machine, drains and ejections.  The balancer uses it for the
pools that TCP-mode listeners send to, and for pools that send the PROXY
protocol (their backends may refuse a check without a header), unless
C{--health-path} is given (then those pools are checked over HTTP like any
other, without a PROXY header).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol

from txbalancer.health import HealthChecker
from txbalancer.proxyprotocol import encode

__all__ = ["TCPConnectChecker"]


class _Probe(Protocol):
    def __init__(self, header: bytes) -> None:
        self.header = header

    def connectionMade(self) -> None:
        if self.header:
            self.transport.write(self.header)
        self.transport.loseConnection()


class _ProbeFactory(Factory):
    noisy = False

    def __init__(self, header: bytes) -> None:
        self.header = header

    def buildProtocol(self, addr: Any) -> _Probe:
        return _Probe(self.header)


def _defaultEndpoint(reactor: Any, backend: Any, timeout: float) -> Any:
    try:
        ipaddress.ip_address(backend.host)
    except ValueError:
        return HostnameEndpoint(reactor, backend.host, backend.port, timeout=timeout)
    if ":" in backend.host:
        return TCP6ClientEndpoint(reactor, backend.host, backend.port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, backend.host, backend.port, timeout=timeout)


class TCPConnectChecker(HealthChecker):
    """
    Active checks by TCP connect; every other parameter as
    L{HealthChecker}'s (C{path}, C{host}, C{statusRange}, C{client} and
    C{tlsOptionsFor} are not used).

    @param endpointFor: C{endpointFor(reactor, backend, timeout)} gives the
        client endpoint probed; TCP to the backend's host and port by
        default.
    @param proxyProtocol: C{"v1"} or C{"v2"} for backends that expect a
        PROXY header: each probe sends one for an unknown origin (v1
        C{UNKNOWN}, v2 C{LOCAL}: "a check, not a client") before closing.
    """

    def __init__(
        self,
        backends: list,
        onChange: Callable[[Any, str, str], object],
        reactor: Any,
        *,
        endpointFor: Optional[Callable[[Any, Any, float], Any]] = None,
        proxyProtocol: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("client", None)
        HealthChecker.__init__(self, backends, onChange, reactor, **kwargs)
        self._endpointFor = endpointFor or _defaultEndpoint
        self._header = encode(proxyProtocol, None, None) if proxyProtocol else b""
        # Not an HTTP client: it only keeps the base class from building one.
        self._client = self

    def _request(self, backend: Any) -> Deferred[Any]:
        endpoint = self._endpointFor(self._reactor, backend, self.timeout)
        return endpoint.connect(_ProbeFactory(self._header))

    def _judge(self, connected: Any) -> Deferred[tuple[str, str]]:
        return succeed(("up", "TCP connect"))

"""
Listening with the balancer's TLS: an endpoint that serves TLS from a
L{txbalancer.tls.ServerTLS} on a TCP port.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

from txbalancer.tls.contexts import ServerTLS

__all__ = ["TLSServerEndpoint", "tlsServerEndpoint"]


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """
    Listens on TCP and wraps each connection in TLS from a L{ServerTLS}.
    """

    def __init__(self, reactor: Any, port: int, interface: str, serverTLS: ServerTLS,
                 backlog: int = 50) -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.serverTLS = serverTLS
        self.backlog = backlog

    def listen(self, factory: Any) -> Any:
        from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
        from twisted.protocols.tls import TLSMemoryBIOFactory

        cls = TCP6ServerEndpoint if ":" in self.interface else TCP4ServerEndpoint
        endpoint = cls(self.reactor, self.port, self.backlog, self.interface)
        return endpoint.listen(TLSMemoryBIOFactory(self.serverTLS, False, factory))

    def __repr__(self) -> str:
        return f"<TLSServerEndpoint {self.interface or '*'}:{self.port}>"


def tlsServerEndpoint(
    reactor: Any, port: int, interface: str, serverTLS: ServerTLS
) -> TLSServerEndpoint:
    """
    An L{IStreamServerEndpoint} serving TLS from C{serverTLS} on
    C{interface:port} (C{""} listens on every IPv4 address).
    """
    return TLSServerEndpoint(reactor, port, interface, serverTLS)

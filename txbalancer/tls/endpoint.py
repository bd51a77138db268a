"""
Listening with the balancer's TLS: an endpoint that serves TLS from a
L{txbalancer.tls.ServerTLS} on a TCP port, and the C{txbtls:} endpoint
string that builds one, for anyone who uses Twisted's C{serverFromString}
(a C{.tac} file, C{twistd web --listen}, C{twistd balancer --port})::

    txbtls:8443:cert=fullchain.pem:key=privkey.pem[:chain=chain.pem]
        [:interface=127.0.0.1][:backlog=50][:alpn=h2,http/1.1]

The certificate is read and checked when the string is parsed, so a bad
file stops the program at start-up with a L{txbalancer.tls.TLSConfigError}
naming it.  The plugin that makes Twisted find the prefix is
C{twisted/plugins/txbalancer_endpoints.py}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import (
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from zope.interface import implementer

from txbalancer.tls.config import TLSConfigError, tlsListenerFields
from txbalancer.tls.contexts import ServerTLS

__all__ = ["TLSEndpointParser", "TLSServerEndpoint", "tlsServerEndpoint"]


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


@implementer(IStreamServerEndpointStringParser)
class TLSEndpointParser:
    """
    The C{txbtls:} endpoint string: a L{TLSServerEndpoint} with a
    L{ServerTLS} of one certificate (TLS 1.2 and 1.3, Mozilla intermediate
    ciphers).  C{alpn} lists the protocols offered, most preferred first
    (C{http/1.1} by default; C{h2,http/1.1} for a server that speaks
    HTTP/2, as twisted.web's C{Site} does with h2 installed).
    """

    prefix = "txbtls"

    def parseStreamServer(
        self, reactor: Any, *args: str, **kwargs: str
    ) -> TLSServerEndpoint:
        fields = [self.prefix, *args, *(f"{k}={v}" for k, v in kwargs.items())]
        shown = repr(":".join(fields))
        backlog = kwargs.pop("backlog", "50")
        if not backlog.isdigit() or int(backlog) < 1:
            raise TLSConfigError(
                f"{self.prefix}: {shown}: backlog={backlog!r} is not a number"
            )
        alpn = [p.strip() for p in kwargs.pop("alpn", "http/1.1").split(",")]
        if not all(alpn) or not all(p.isascii() for p in alpn):
            raise TLSConfigError(
                f"{self.prefix}: {shown}: alpn= takes protocol names separated "
                "by commas, e.g. alpn=h2,http/1.1"
            )
        port, interface, spec = tlsListenerFields(
            args, kwargs, self.prefix, shown, extra=("backlog", "alpn")
        )
        serverTLS = ServerTLS([spec], alpn=[p.encode("ascii") for p in alpn])
        return TLSServerEndpoint(reactor, port, interface, serverTLS, int(backlog))

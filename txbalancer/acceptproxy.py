"""
Listeners that read a PROXY protocol header (v1 or v2) from the peers of
C{--accept-proxy-protocol}, and only from them.

L{AcceptProxyFactory} wraps a listener's factory (outside TLS: the header
comes first on the wire).  For a listed peer, the connection is a
L{ProxyHeaderReceiver}, Twisted's C{HAProxyProtocolWrapper} with Twisted's
own v1 and v2 parsers, changed in what a load balancer needs:

- the wrapped protocol is connected only once the header is read, so what
  it sees from its first moment (C{transport.getPeer()}, C{getHost()}) is
  the client the header names: X-Forwarded-For, ip-hash, the access log
  and the PROXY header sent on all use it;
- a header split over several reads is waited for (Twisted's wrapper
  closes a connection whose first read is shorter than a header);
- a listed peer that sends no header, a malformed one, or none within
  C{timeout} seconds is closed with a log line;
- half-close passes through (TCP mode relays it).

A peer not in the list is given the wrapped protocol unwrapped: a header it
sends is not believed.  HTTP answers it 400 (a header is not a request
line); TCP mode closes the connection with a log line
(L{txbalancer.tcpproxy.TCPProxyFactory}'s C{refuseProxyHeaders}).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import (
    HAProxyProtocolWrapper,
    HAProxyWrappingFactory,
)
from zope.interface import directlyProvides, implementer, providedBy

from txbalancer.headers import isTrusted

__all__ = ["AcceptProxyFactory", "ProxyHeaderReceiver"]

log = Logger()

# A v1 header is at most 107 bytes; a v2 header with its TLVs is bounded
# by its 16-bit length.
_V1_MAX = 107
_V2_PREFIX = V2Parser.PREFIX


@implementer(IHalfCloseableProtocol)
class ProxyHeaderReceiver(HAProxyProtocolWrapper):
    """
    One connection from a listed peer: read its PROXY header, then hand
    the connection to the wrapped protocol.

    States (C{_state}): C{"header"} (reading it), C{"passing"} (the wrapped
    protocol has the connection), C{"refused"}.
    """

    def __init__(self, factory: Any, wrappedProtocol: Any) -> None:
        HAProxyProtocolWrapper.__init__(self, factory, wrappedProtocol)
        self._state = "header"
        self._buffer = b""
        self._timeoutCall: Any = None

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._timeoutCall = self.factory.reactor.callLater(
            self.factory.timeout, self._timedOut
        )

    def _peer(self) -> str:
        return getattr(self.transport.getPeer(), "host", "?")

    def _refuse(self, why: str) -> None:
        self._state = "refused"
        self._cancelTimeout()
        log.warn("closed connection from {peer}: {why}", peer=self._peer(), why=why)
        self.transport.loseConnection()

    def _cancelTimeout(self) -> None:
        if self._timeoutCall is not None and self._timeoutCall.active():
            self._timeoutCall.cancel()
        self._timeoutCall = None

    def _timedOut(self) -> None:
        self._timeoutCall = None
        if self._state == "header":
            self._refuse(f"no PROXY header within {self.factory.timeout:g}s")

    def dataReceived(self, data: bytes) -> None:
        if self._state == "passing":
            self.wrappedProtocol.dataReceived(data)
            return
        if self._state != "header":
            return
        if self._parser is None:
            buf = self._buffer = self._buffer + data
            if buf[:12] == _V2_PREFIX[: len(buf[:12])] and len(buf) < 16:
                return  # maybe v2; wait for its fixed part
            if buf[:12] == _V2_PREFIX:
                if buf[12] & 0xF0 != 0x20:
                    self._refuse("PROXY v2 header of an unknown version")
                    return
                self._parser = V2Parser()
            elif buf[:6] == b"PROXY "[: len(buf[:6])] and len(buf) < 6:
                return  # maybe v1
            elif buf[:6] == b"PROXY ":
                self._parser = V1Parser()
            else:
                self._refuse("expected a PROXY protocol header, got none")
                return
            data, self._buffer = buf, b""
        try:
            info, remaining = self._parser.feed(data)
        except InvalidProxyHeader as e:
            self._refuse(f"malformed PROXY header ({type(e).__name__})")
            return
        if info is None:
            return
        self._proxyInfo = info
        self._parser = None
        self._state = "passing"
        self._cancelTimeout()
        self.wrappedProtocol.makeConnection(self)
        if remaining and self._state == "passing" and self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(remaining)

    # -- half-close, passed both ways

    def loseWriteConnection(self) -> None:
        self.transport.loseWriteConnection()

    def readConnectionLost(self) -> None:
        if self._state == "passing" and IHalfCloseableProtocol.providedBy(
            self.wrappedProtocol
        ):
            self.wrappedProtocol.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self._state == "passing" and IHalfCloseableProtocol.providedBy(
            self.wrappedProtocol
        ):
            self.wrappedProtocol.writeConnectionLost()

    def connectionLost(self, reason: Any) -> None:
        self._cancelTimeout()
        if self._state == "passing":
            HAProxyProtocolWrapper.connectionLost(self, reason)
        else:
            self.factory.unregisterProtocol(self)
            self.wrappedProtocol = None


class AcceptProxyFactory(HAProxyWrappingFactory):
    """
    Wraps C{wrappedFactory}: connections from C{trusted} peers start with a
    PROXY header; others are passed on as they are.

    @param trusted: networks (C{ipaddress} networks) allowed to send one.
    @param timeout: seconds a listed peer has to send its header.
    """

    protocol = ProxyHeaderReceiver
    noisy = False

    def __init__(
        self,
        wrappedFactory: Any,
        trusted: Sequence[Any],
        reactor: Any,
        timeout: float = 10.0,
    ) -> None:
        HAProxyWrappingFactory.__init__(self, wrappedFactory)
        self.trusted = tuple(trusted)
        self.reactor = reactor
        self.timeout = timeout

    def buildProtocol(self, addr: Any) -> Optional[Any]:
        host = getattr(addr, "host", None)
        if isinstance(host, str) and isTrusted(host, self.trusted):
            return HAProxyWrappingFactory.buildProtocol(self, addr)
        return self.wrappedFactory.buildProtocol(addr)

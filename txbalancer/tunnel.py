"""
Two connected transports spliced byte for byte in both directions: the
relay under TCP mode, and under an upgraded (WebSocket) HTTP connection.

A L{Tunnel} is given two transports, side C{A} and side C{B}, once both are
connected.  The protocols that own them hand it what they receive::

    tunnel = Tunnel(clientTransport, backendTransport, reactor,
                    idleTimeout=3600, onClose=done)
    # in side A's protocol (and the same for B):
    def dataReceived(self, data):       tunnel.dataReceived(A, data)
    def readConnectionLost(self):       tunnel.readConnectionLost(A)
    def connectionLost(self, reason):   tunnel.connectionLost(A, reason)

L{TunnelProtocol} is such a protocol, for a connection that is nothing but
one side of a tunnel (TCP mode's backend connections).  A front end that
becomes a tunnel part way (an HTTP server protocol after
C{101 Switching Protocols}) keeps its own protocol and forwards these three
calls; bytes it already read past the upgrade go in with C{dataReceived}.
Neither transport may have a producer registered when the tunnel is made
(the tunnel registers its own), and neither may be paused by anyone else.

What the tunnel guarantees:

- Backpressure: each side is registered as the push producer of the other
  side's transport, so when one peer reads slowly, the other side stops
  being read from (nothing piles up in memory).
- Half-close: a side whose peer stopped sending (C{readConnectionLost}, for
  protocols that provide C{IHalfCloseableProtocol}) has the other side's
  write half shut (C{loseWriteConnection}); when both have, both close.
- Either side closing closes the other: cleanly (after what is buffered is
  written, within C{CLOSE_GRACE} seconds) for a clean close, abruptly for
  a reset.
- An idle timeout: no byte either way for C{idleTimeout} seconds closes
  both.  One C{callLater} per tunnel, not reset per read: each read only
  notes the time, and the timer, when it fires, re-arms itself for the
  rest of the idle time if anything moved meanwhile.
- Counters: bytes each way (C{bytesAtoB}, C{bytesBtoA}), and, with
  C{backend=}, the backend's C{bytesOut} (towards it: side A to side B)
  and C{bytesIn} (from it) as they move.

C{onClose(tunnel, side, reason)} is called once, when the first side goes
(C{side} is C{A} or C{B}, or L{None} for the idle timeout and L{close}).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet import error
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

__all__ = ["A", "B", "Tunnel", "TunnelProtocol"]

log = Logger()

A = 0
B = 1

# Seconds a side closed cleanly has to finish writing what is buffered for
# it (a peer that stopped reading would hold it open forever) before it is
# aborted.
CLOSE_GRACE = 30.0


def canHalfClose(transport: Any) -> bool:
    """
    Whether C{transport} can shut its write half alone.  Asked of the class:
    a wrapper such as TLS forwards unknown attributes to the TCP transport
    under it, whose FIN would cut TLS short.
    """
    return callable(getattr(type(transport), "loseWriteConnection", None))


@implementer(IPushProducer)
class _Reader:
    """
    One side's reading, as a producer registered with the other side's
    transport: when that transport's buffer fills, this side is paused.
    """

    __slots__ = ("transport", "paused")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.paused = False

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        # The consumer's connection is going; the tunnel closes this side
        # when it hears of it (connectionLost).
        pass


class Tunnel:
    """
    Side C{A} and side C{B}, spliced.  See the module docstring.

    @ivar state: C{"open"}; C{"closing"} once one side has gone or a
        timeout struck (the other side is being closed); C{"closed"} once
        both have gone.
    @ivar readDone: per side, whether its peer has stopped sending.
    """

    def __init__(
        self,
        transportA: Any,
        transportB: Any,
        reactor: Any,
        idleTimeout: Optional[float] = 3600.0,
        onClose: Optional[Callable[["Tunnel", Optional[int], Any], object]] = None,
        backend: Any = None,
    ) -> None:
        self.transports = (transportA, transportB)
        self.reactor = reactor
        self.idleTimeout = idleTimeout
        self.onClose = onClose
        self.backend = backend
        self.state = "open"
        self.readDone = [False, False]
        self.gone = [False, False]
        self.bytesAtoB = 0
        self.bytesBtoA = 0
        self._readers = (_Reader(transportA), _Reader(transportB))
        self._lastActivity = reactor.seconds()
        self._idleCall: Any = None
        self._graceCall: Any = None
        # Writes to A are produced by reading B, and the other way round.
        transportA.registerProducer(self._readers[B], True)
        transportB.registerProducer(self._readers[A], True)
        if idleTimeout:
            self._idleCall = reactor.callLater(idleTimeout, self._checkIdle)

    # -- what the sides' protocols report

    def dataReceived(self, side: int, data: bytes) -> None:
        if self.state != "open":
            return
        self._lastActivity = self.reactor.seconds()
        backend = self.backend
        if side == A:
            self.bytesAtoB += len(data)
            if backend is not None:
                backend.bytesOut += len(data)
        else:
            self.bytesBtoA += len(data)
            if backend is not None:
                backend.bytesIn += len(data)
        self.transports[1 - side].write(data)

    def readConnectionLost(self, side: int) -> None:
        """
        C{side}'s peer will send no more (a FIN): pass it on.
        """
        if self.readDone[side] or self.state != "open":
            return
        self.readDone[side] = True
        other = self.transports[1 - side]
        if self.readDone[1 - side] or not canHalfClose(other):
            self._closeBoth(clean=True, side=None, reason=None)
        else:
            other.loseWriteConnection()

    def connectionLost(self, side: int, reason: Any = None) -> None:
        """
        C{side}'s connection is gone: close the other one (abruptly when
        this one was reset).
        """
        if self.gone[side]:
            return
        self.gone[side] = True
        clean = reason is None or bool(reason.check(error.ConnectionDone))
        if self.state == "open":
            self._closeBoth(clean=clean, side=side, reason=reason)
        if all(self.gone):
            self.state = "closed"
            if self._graceCall is not None and self._graceCall.active():
                self._graceCall.cancel()
            self._graceCall = None

    def close(self, abort: bool = False) -> None:
        """
        Close both sides (cleanly, or with C{abort} abruptly).
        """
        if self.state == "open":
            self._closeBoth(clean=not abort, side=None, reason=None)

    # -- inside

    def _closeBoth(self, clean: bool, side: Optional[int], reason: Any) -> None:
        self.state = "closing"
        if self._idleCall is not None and self._idleCall.active():
            self._idleCall.cancel()
        self._idleCall = None
        for s in (A, B):
            if self.gone[s]:
                continue
            transport = self.transports[s]
            transport.unregisterProducer()
            if clean:
                transport.loseConnection()
            else:
                transport.abortConnection()
        if clean and not all(self.gone):
            self._graceCall = self.reactor.callLater(CLOSE_GRACE, self._abortRest)
        onClose, self.onClose = self.onClose, None
        if onClose is not None:
            onClose(self, side, reason)

    def _abortRest(self) -> None:
        self._graceCall = None
        for s in (A, B):
            if not self.gone[s]:
                self.transports[s].abortConnection()

    def _checkIdle(self) -> None:
        self._idleCall = None
        if self.state != "open":
            return
        idle = self.reactor.seconds() - self._lastActivity
        if idle < self.idleTimeout:
            self._idleCall = self.reactor.callLater(
                self.idleTimeout - idle, self._checkIdle
            )
            return
        log.info(
            "tunnel idle for {seconds}s: closing both sides",
            seconds=self.idleTimeout,
        )
        # A clean close (FIN); what is still buffered gets CLOSE_GRACE
        # seconds to go out, then the rest is aborted.
        self._closeBoth(clean=True, side=None, reason=None)


@implementer(IHalfCloseableProtocol)
class TunnelProtocol(Protocol):
    """
    A connection that is one side of a tunnel and nothing else.  Bytes that
    arrive before the tunnel is set (L{attach}) are kept for it.
    """

    tunnel: Optional[Tunnel] = None
    side = B

    def __init__(self) -> None:
        self._early: list[bytes] = []
        self._earlyEOF = False
        self._earlyLoss: Any = None

    def attach(self, tunnel: Tunnel, side: int) -> None:
        self.tunnel = tunnel
        self.side = side
        early, self._early = self._early, []
        for data in early:
            tunnel.dataReceived(side, data)
        if self._earlyEOF:
            tunnel.readConnectionLost(side)
        if self._earlyLoss is not None:
            tunnel.connectionLost(side, self._earlyLoss)

    def dataReceived(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is None:
            self._early.append(data)
        else:
            tunnel.dataReceived(self.side, data)

    def readConnectionLost(self) -> None:
        if self.tunnel is None:
            self._earlyEOF = True
        else:
            self.tunnel.readConnectionLost(self.side)

    def writeConnectionLost(self) -> None:
        # We shut our write half (passing on a half-close): nothing to do.
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if self.tunnel is None:
            self._earlyLoss = reason
        else:
            self.tunnel.connectionLost(self.side, reason)

"""
How many client connections the balancer admits.

Two limits, both off by default:

    - C{--max-connections N}, over every listener: when N connections are
      open the listening ports stop reading (C{stopReading}), so new
      connections wait in the kernel's listen queue instead of being
      accepted, and the ports read again as soon as the count is below N.
      (Connections the port accepted in the same read as the Nth are
      served too: the count may pass N by one accept batch.)
    - C{--max-conns-per-ip N}: a connection from an address that already
      has N open is closed at once.  The refusals are logged at most once
      per C{logInterval} seconds, with how many there were, so a flood does
      not flood the log.

One L{ConnectionLimits} is shared by the HTTP factories of every listener
(L{txbalancer.downstream.HTTPServerFactory} asks it in C{buildProtocol} and
tells it when a connection closes).  It learns the listening ports through
L{TrackedEndpoint}, which wraps a listener's endpoint and hands over the
port its C{listen} returns: only the public C{IStreamServerEndpoint}
interface, no reaching into C{StreamServerEndpointService}.

No reactor here: time comes in as C{clock}.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

__all__ = ["ConnectionLimits", "RefusedConnection", "TrackedEndpoint"]

log = Logger()


class ConnectionLimits:
    """
    The count of open client connections, in all and per address, and the
    listening ports to pause at the global limit.

    @param maxConnections: open connections at most, 0 for no limit.
    @param maxPerPeer: open connections per client address at most, 0 for
        no limit.
    @param clock: returns the time in seconds (C{reactor.seconds}).
    @param logInterval: seconds between two log lines about refusals.

    @ivar open: the connections admitted and not yet closed.
    @ivar refused: how many connections were closed at once, in all.
    @ivar paused: whether the listening ports are paused.
    """

    def __init__(
        self,
        maxConnections: int = 0,
        maxPerPeer: int = 0,
        clock: Callable[[], float] = time.monotonic,
        logInterval: float = 10.0,
    ) -> None:
        self.maxConnections = maxConnections
        self.maxPerPeer = maxPerPeer
        self.clock = clock
        self.logInterval = logInterval
        self.open = 0
        self.refused = 0
        self.paused = False
        self.perPeer: dict[str, int] = {}
        self._ports: list[Any] = []
        self._unpausable: set[int] = set()
        self._lastRefusalLog = -float("inf")
        self._unlogged = 0
        self._lastPauseLog = -float("inf")

    @property
    def active(self) -> bool:
        """
        Whether any limit is set (else the factories need not ask).
        """
        return bool(self.maxConnections or self.maxPerPeer)

    # -- the listening ports

    def addPort(self, port: Any) -> Any:
        """
        C{port} (an C{IListeningPort}) is listening: pause it with the
        others at the global limit.

        @return: C{port}, so this can be a Deferred callback.
        """
        self._ports.append(port)
        if self.paused:
            self._pausePort(port)
        return port

    def forgetPorts(self) -> None:
        """
        The ports are closing (the balancer stops): never resume them.
        """
        self._ports = []

    def _pausePort(self, port: Any) -> None:
        stopReading = getattr(port, "stopReading", None)
        if stopReading is None:
            if id(port) not in self._unpausable:
                self._unpausable.add(id(port))
                log.warn(
                    "listener {port} cannot stop accepting: --max-connections "
                    "closes its connections over the limit instead",
                    port=port,
                )
            return
        stopReading()

    def _pause(self) -> None:
        self.paused = True
        now = self.clock()
        if now - self._lastPauseLog >= self.logInterval:
            self._lastPauseLog = now
            log.warn(
                "{n} client connections open (--max-connections): not "
                "accepting new ones until one closes",
                n=self.open,
            )
        for port in self._ports:
            self._pausePort(port)

    def _resume(self) -> None:
        self.paused = False
        for port in self._ports:
            if getattr(port, "connected", True) and not getattr(
                port, "disconnecting", False
            ):
                startReading = getattr(port, "startReading", None)
                if startReading is not None:
                    startReading()

    # -- connections

    def admit(self, host: str) -> bool:
        """
        A connection from C{host} was accepted: count it, or say it must be
        closed at once.

        @return: whether it is admitted (then L{release} it when it closes).
        """
        # A port accepts several connections per read, and pausing it does
        # not end the read: the ones accepted in the same batch as the one
        # that reached --max-connections are admitted all the same (the
        # kernel had queued them; refusing them would reset clients that
        # were willing to wait).  The port stays paused until the count is
        # below the limit again.
        maxConnections = self.maxConnections
        maxPerPeer = self.maxPerPeer
        if maxPerPeer and host:
            n = self.perPeer.get(host, 0)
            if n >= maxPerPeer:
                self._refuse(host, "--max-conns-per-ip %d" % (maxPerPeer,))
                return False
            self.perPeer[host] = n + 1
        self.open += 1
        if maxConnections and self.open >= maxConnections and not self.paused:
            self._pause()
        return True

    def release(self, host: str) -> None:
        """
        A connection from C{host} that L{admit} admitted has closed.
        """
        self.open -= 1
        if self.maxPerPeer and host:
            n = self.perPeer.get(host, 0) - 1
            if n > 0:
                self.perPeer[host] = n
            else:
                self.perPeer.pop(host, None)
        if self.paused and self.open < self.maxConnections:
            self._resume()

    def _refuse(self, host: str, limit: str) -> None:
        self.refused += 1
        self._unlogged += 1
        now = self.clock()
        if now - self._lastRefusalLog >= self.logInterval:
            log.warn(
                "closed {n} new client connection(s) at once (the last from "
                "{peer}): over {limit}",
                n=self._unlogged,
                peer=host or "?",
                limit=limit,
            )
            self._lastRefusalLog = now
            self._unlogged = 0


class RefusedConnection(Protocol):
    """
    The protocol of a connection over a limit: it is closed as soon as it
    is made, before anything is read from it.
    """

    def connectionMade(self) -> None:
        self.transport.abortConnection()


@implementer(IStreamServerEndpoint)
class TrackedEndpoint:
    """
    A server endpoint that hands the port it listens on to C{onPort} (say,
    L{ConnectionLimits.addPort}) before passing it on.
    """

    def __init__(self, endpoint: Any, onPort: Callable[[Any], Any]) -> None:
        self.endpoint = endpoint
        self.onPort = onPort

    def listen(self, factory: Any) -> Any:
        return self.endpoint.listen(factory).addCallback(self.onPort)

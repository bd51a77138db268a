"""
One worker process of C{--workers N}: C{python -m txbalancer.worker}.

The master spawns it with the AMP socket on fd 3 and the listening sockets
on fds 4, 5, ... (C{--listen FD:FAMILY,...}, in the order of the
configuration's listeners).  It waits for the master's L{Configure}, builds
a L{WorkerBalancer} from the configuration it gets (checks off: the master
pushes the backends' health), adopts the listening sockets and proxies.
It reports its counters every second.  On L{Drain}, SIGTERM, SIGINT, or
when the master goes away, it stops like one balancer process does (stop
accepting, finish the requests in flight) and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger, formatEvent
from twisted.protocols import amp

from txbalancer import workerstate as ws
from txbalancer.balancer import Balancer

log = Logger()

REPORT_INTERVAL = 1.0


class _AdoptedEndpoint:
    """
    A server endpoint over a socket that is already listening (inherited
    from the master): C{listen} adopts it, then closes this process's copy
    of the descriptor, so that the socket closes once the master and the
    workers all stopped listening.
    """

    def __init__(self, reactor: Any, fd: int, family: int) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family

    def listen(self, factory: Any) -> Any:
        port = self.reactor.adoptStreamPort(self.fd, self.family, factory)
        os.close(self.fd)
        return defer.succeed(port)


class WorkerBalancer(Balancer):
    """
    A L{Balancer} whose listeners are the sockets the master passed: the
    i-th listener of the configuration adopts the i-th of C{adopted} (its
    endpoint string is not parsed: a C{systemd:} one names the master's
    inherited descriptors).
    """

    def __init__(self, *args: Any, adopted: Any = (), **kwargs: Any) -> None:
        Balancer.__init__(self, *args, **kwargs)
        self.adopted = list(adopted)

    def endpointFor(self, listener: Any) -> Any:
        # Called for each listener in order, before its listenOn.
        fd, family = self.adopted[len(self.listeners)]
        return _AdoptedEndpoint(self.reactor, fd, family)


class ForwardingObserver:
    """
    The worker's log observer: each event goes to the master over AMP
    (L{workerstate.Log}) while the channel is up, else to standard error.
    """

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback
        self.channel: Any = None
        self._inside = False

    def __call__(self, event: dict[str, Any]) -> None:
        channel = self.channel
        if channel is None or self._inside:
            self.fallback(event)
            return
        self._inside = True
        try:
            text = formatEvent(event)
            failure = event.get("log_failure")
            if failure is not None:
                text += "\n" + failure.getTraceback()
            level = event.get("log_level")
            channel.callRemote(ws.Log, level=getattr(level, "name", "info"),
                               text=text[:_MAX_LOG_TEXT])
        except Exception:
            self.fallback(event)
        finally:
            self._inside = False


# An AMP value is at most 65535 bytes (of UTF-8).
_MAX_LOG_TEXT = 16000


class WorkerProtocol(amp.AMP):
    """
    The worker's end of the AMP channel: it answers the master's commands
    and reports its counters.
    """

    def __init__(self, reactor: Any, adopted: Any, logs: Optional[ForwardingObserver] = None
                 ) -> None:
        amp.AMP.__init__(self)
        self.logs = logs
        self.reactor = reactor
        self.adopted = adopted
        self.balancer: Optional[WorkerBalancer] = None
        self.workers = 1
        self.told: dict[Any, str] = {}
        self.sent: dict[Any, int] = {}
        self._reporting: Any = None
        self._stopping = False
        self._drained: Optional[defer.Deferred[None]] = None

    def connectionMade(self) -> None:
        amp.AMP.connectionMade(self)
        if self.logs is not None:
            self.logs.channel = self

    @ws.Configure.responder
    def configure(self, config: Any, state: Any, secret: bytes, index: int,
                  workers: int) -> dict[str, int]:
        self.workers = workers
        mine = ws.workerConfig(config, workers)
        if self.balancer is None:
            balancer = self.balancer = WorkerBalancer(
                config=mine,
                reactor=self.reactor,
                cookieSecret=secret or None,
                adopted=self.adopted,
            )
            for runtime in balancer.pools.values():
                ws.gateHealth(runtime.pool, self.told)
            balancer.listen()
            ws.applyState(balancer.pools, state, workers, self.told)
            balancer.startService()
            # SIGTERM or SIGINT to this process: drain, as on Drain.
            self.reactor.addSystemEventTrigger("before", "shutdown", self.drained)
            from twisted.internet.task import LoopingCall

            self._reporting = LoopingCall(self.report)
            self._reporting.clock = self.reactor
            self._reporting.start(REPORT_INTERVAL, now=False)
            log.info("worker {index} (pid {pid}) serving", index=index, pid=os.getpid())
        else:
            self.reconfigure(mine, state)
        return {"pid": os.getpid()}

    def reconfigure(self, config: Any, state: Any) -> None:
        """
        A reload in the master: take its new configuration (with the
        reload that applies a configuration in place, when this Balancer
        has it), the TLS certificates again, then its backend state.
        """
        balancer = self.balancer
        assert balancer is not None
        apply = getattr(balancer, "apply", None)
        if apply is not None:
            apply(config)
            for runtime in balancer.pools.values():
                if not hasattr(runtime.pool.setHealth, "original"):
                    ws.gateHealth(runtime.pool, self.told)
        for serverTLS in balancer.serverTLS:
            serverTLS.reload()
        ws.applyState(balancer.pools, state, self.workers, self.told)

    @ws.SetState.responder
    def setState(self, state: Any) -> dict[str, Any]:
        if self.balancer is not None:
            ws.applyState(self.balancer.pools, state, self.workers, self.told)
        return {}

    @ws.Reopen.responder
    def reopen(self) -> dict[str, Any]:
        if self.balancer is not None:
            self.balancer.reopenLogs()
        return {}

    @ws.Drain.responder
    def drain(self) -> dict[str, Any]:
        log.info("the master says: drain and exit")
        self.reactor.callLater(0, self._drainThenClose)
        return {}

    def report(self) -> None:
        if self.balancer is not None:
            self.callRemote(ws.Report, stats=ws.report(
                self.balancer.pools, self.sent, self.balancer.listening))

    def drained(self) -> "defer.Deferred[None]":
        """
        The graceful stop of this worker's balancer (started on the first
        call): stop accepting, let the requests in flight finish.
        """
        if self._drained is None:
            # Reports go on while draining (the master counts the requests
            # that finish, and would think a silent worker hung).
            balancer = self.balancer
            self._drained = (defer.maybeDeferred(balancer.stopService)
                             if balancer is not None else defer.succeed(None))
        return self._drained

    def _drainThenClose(self) -> None:
        # Close the channel once drained: what is still buffered for the
        # master (the last log lines) is written first; then connectionLost
        # stops the reactor.
        self._stopping = True
        self.drained().addBoth(lambda _: self.transport.loseConnection())

    def connectionLost(self, reason: Any) -> None:
        if self.logs is not None:
            self.logs.channel = None
        if self._reporting is not None and self._reporting.running:
            self._reporting.stop()
        amp.AMP.connectionLost(self, reason)
        if self.reactor.running and not self._stopping:
            log.info("the master's channel closed: draining and exiting")
        self._stopping = True
        self.drained().addBoth(lambda _: self._stopReactor())

    def _stopReactor(self) -> None:
        if self.reactor.running:
            self.reactor.stop()


def _listenArg(value: str) -> list[tuple[int, int]]:
    pairs = []
    for item in filter(None, value.split(",")):
        fd, family = item.split(":")
        pairs.append((int(fd), int(family)))
    return pairs


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m txbalancer.worker")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--amp-fd", type=int, default=3)
    parser.add_argument("--listen", type=_listenArg, default=[])
    args = parser.parse_args(argv)

    from twisted.internet import reactor
    from twisted.logger import formatEventAsClassicLogText, globalLogBeginner, FileLogObserver

    # The master handles SIGHUP and SIGUSR1 and tells the workers (a
    # signal to the whole process group must not kill them).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    system = f"worker {args.index} pid {os.getpid()}"

    def tagged(event: dict[str, Any]) -> Optional[str]:
        event = dict(event, log_system=system)
        return formatEventAsClassicLogText(event)

    logs = ForwardingObserver(FileLogObserver(sys.stderr, tagged))
    globalLogBeginner.beginLoggingTo([logs], redirectStandardIO=False)
    factory = Factory.forProtocol(lambda: WorkerProtocol(reactor, args.listen, logs))
    reactor.adoptStreamConnection(args.amp_fd, socket.AF_UNIX, factory)
    os.close(args.amp_fd)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

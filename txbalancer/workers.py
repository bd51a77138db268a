"""
C{--workers N}: the master (L{MasterBalancer}) and the worker processes it
keeps running (L{WorkerSlot}).

The twistd process is the master.  It binds the listening sockets but
never accepts on them, runs the health checks and the admin server, and
spawns N C{python -m txbalancer.worker} children, each given the listening
sockets and one end of a socket pair for AMP (see
L{txbalancer.workerstate} for what they say).  The workers accept and
proxy.

    - Backend state (health, drains, disables, backends added or removed
      by the admin API or a reload) is pushed to every worker when it
      changes (the master compares a snapshot every L{STATE_INTERVAL}).
    - A reload (SIGHUP, C{POST /reload}) runs in the master, which then
      sends every worker the new configuration; SIGUSR1 is passed on.
    - Counters come back every second and are summed into the master's
      own backends, which is what C{/status} and C{/metrics} read.
    - A worker that exits is started again after 1 s, 2 s, 4 s ... (at
      most L{MAX_BACKOFF}; back to 1 s once one ran L{STABLE} seconds);
      one that sends no report for L{SILENCE} seconds is killed first.
      The listening sockets stay open in the master all along.
    - SIGTERM: the master closes its copies of the listening sockets,
      tells every worker to drain, waits for them to exit (at most
      C{drain-timeout} plus L{GRACE} seconds, then SIGKILL), then stops
      its checks and admin server and exits 0.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Optional

from twisted.internet import defer, error
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import InvalidLogLevelError, LogLevel, Logger
from twisted.protocols import amp

from txbalancer import workerstate as ws
from txbalancer.balancer import Balancer

__all__ = ["MasterBalancer", "WorkerSlot", "resolveWorkers"]

log = Logger()

STATE_INTERVAL = 0.2
MAX_BACKOFF = 30.0
STABLE = 10.0
GRACE = 5.0
# A ready worker that sent no report for this long is hung: killed (and
# so started again).
SILENCE = 15.0


def resolveWorkers(n: int) -> int:
    """
    The number of workers C{--workers} asks for: C{n}, or (C{auto}, 0)
    one per core.
    """
    return n if n > 0 else (os.cpu_count() or 1)


class _HeldEndpoint:
    """
    A server endpoint that binds, then stops reading: the master holds the
    listening socket open for its workers and never accepts on it.
    """

    def __init__(self, endpoint: Any, held: list[Any]) -> None:
        self.endpoint = endpoint
        self.held = held

    def listen(self, factory: Any) -> Any:
        def bound(port: Any) -> Any:
            port.stopReading()
            self.held.append(port)
            return port

        return self.endpoint.listen(factory).addCallback(bound)


class MasterChannel(amp.AMP):
    """
    The master's end of one worker's AMP channel.
    """

    def __init__(self, slot: "WorkerSlot") -> None:
        amp.AMP.__init__(self)
        self.slot = slot

    def connectionMade(self) -> None:
        amp.AMP.connectionMade(self)
        self.slot.channelMade(self)

    @ws.Log.responder
    def logged(self, level: str, text: str) -> dict[str, Any]:
        try:
            logLevel = LogLevel.levelWithName(level)
        except InvalidLogLevelError:
            logLevel = LogLevel.info
        log.emit(logLevel, "{text}", text=text,
                 log_system=f"worker {self.slot.index} pid {self.slot.pid}")
        return {}

    @ws.Report.responder
    def reported(self, stats: Any) -> dict[str, Any]:
        self.slot.reported(stats)
        return {}


class _WorkerProcess(ProcessProtocol):
    def __init__(self, slot: "WorkerSlot") -> None:
        self.slot = slot

    def processEnded(self, reason: Any) -> None:
        self.slot.ended(reason)


class WorkerSlot:
    """
    Worker number C{index}: its process while it runs, started again with
    backoff when it ends.

    @ivar pid: the running process's pid, or L{None}.
    @ivar restarts: how many times it was started again.
    @ivar ready: whether the running process took its configuration.
    """

    def __init__(self, master: "MasterBalancer", index: int) -> None:
        self.master = master
        self.index = index
        self.reactor = master.reactor
        self.process: Any = None
        self.pid: Optional[int] = None
        self.channel: Optional[MasterChannel] = None
        self.ready = False
        self.restarts = 0
        self.failures = 0
        self.startedAt = 0.0
        self.pending: Any = None  # the delayed restart
        self.lastReport = 0.0
        self.stopping = False
        self._exited: Optional[defer.Deferred[None]] = None
        self.requests = 0

    def start(self) -> None:
        self.pending = None
        master = self.master
        parentEnd, childEnd = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        childFDs: dict[int, Any] = {0: "w", 1: 1, 2: 2, 3: childEnd.fileno()}
        listen = []
        for i, port in enumerate(master.held):
            fd = 4 + i
            childFDs[fd] = port.fileno()
            listen.append(f"{fd}:{port.socket.family}")
        args = [sys.executable, "-m", "txbalancer.worker", "--index", str(self.index),
                "--amp-fd", "3", "--listen", ",".join(listen)]
        try:
            self.process = self.reactor.spawnProcess(
                _WorkerProcess(self), sys.executable, args, env=dict(os.environ),
                childFDs=childFDs,
            )
        finally:
            childEnd.close()
        self.pid = self.process.pid
        self.startedAt = self.reactor.seconds()
        self._exited = defer.Deferred()
        factory = Factory.forProtocol(lambda: MasterChannel(self))
        self.reactor.adoptStreamConnection(parentEnd.fileno(), socket.AF_UNIX, factory)
        parentEnd.close()
        log.info("worker {index} started (pid {pid})", index=self.index, pid=self.pid)

    def channelMade(self, channel: MasterChannel) -> None:
        self.channel = channel
        self.ready = False
        master = self.master
        d = channel.callRemote(
            ws.Configure,
            config=master.config,
            state=master.lastState,
            secret=master.cookieSecret,
            index=self.index,
            workers=len(master.slots),
        )

        def configured(answer: Any) -> None:
            if self.channel is channel:
                self.ready = True
                self.lastReport = self.reactor.seconds()
                state = ws.snapshot(master.pools)
                if state != master.lastState:
                    self.send(ws.SetState, state=state)

        def failed(f: Any) -> None:
            log.failure("worker {index}: configuring failed", f, index=self.index)
            self.kill()

        d.addCallbacks(configured, failed)

    def send(self, command: Any, **kwargs: Any) -> Any:
        """
        C{command} to the running process if it is ready; errors logged.
        """
        if not self.ready or self.channel is None:
            return defer.succeed(None)
        d = self.channel.callRemote(command, **kwargs)
        d.addErrback(lambda f: f.trap(error.ConnectionDone, error.ConnectionLost,
                                      amp.ProtocolSwitched) and None)
        d.addErrback(lambda f: log.failure("worker {index}: {command}", f,
                                           index=self.index, command=command.__name__))
        return d

    def reported(self, stats: Any) -> None:
        self.lastReport = self.reactor.seconds()
        self.master.totals.record(self, self.master.pools, stats, self.reactor.seconds())
        self.requests = sum(
            b["requests"] + b["connections"]
            for p in stats["pools"].values() for b in p["backends"].values()
        )

    def ended(self, reason: Any) -> None:
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        self.process = None
        self.channel = None
        self.ready = False
        self.master.totals.forget(self, self.master.pools)
        if self._exited is not None:
            ended, self._exited = self._exited, None
            ended.callback(None)
        if self.stopping:
            log.info("worker {index} (pid {pid}) exited ({code})", index=self.index,
                     pid=self.pid, code=code if sig is None else f"signal {sig}")
            self.pid = None
            return
        lived = self.reactor.seconds() - self.startedAt
        if lived >= STABLE:
            self.failures = 0
        delay = min(2.0 ** self.failures, MAX_BACKOFF)
        self.failures += 1
        log.warn(
            "worker {index} (pid {pid}) died ({why}) after {lived:.1f}s; starting "
            "it again in {delay:g}s",
            index=self.index, pid=self.pid, lived=lived, delay=delay,
            why=f"exit status {code}" if sig is None else f"signal {sig}",
        )
        self.pid = None
        self.restarts += 1
        self.pending = self.reactor.callLater(delay, self.start)

    def watch(self, now: float) -> None:
        """
        Kill the process if it is ready but silent for L{SILENCE} seconds
        (its reactor is stuck): it is then started again like a crash.
        """
        if (self.ready and not self.stopping and self.process is not None
                and now - self.lastReport > SILENCE):
            log.warn("worker {index} (pid {pid}) sent nothing for {s:g}s: killing it",
                     index=self.index, pid=self.pid, s=now - self.lastReport)
            self.ready = False
            self.kill()

    def kill(self, sig: str = "KILL") -> None:
        if self.process is not None:
            try:
                self.process.signalProcess(sig)
            except error.ProcessExitedAlready:
                pass

    def stop(self, timeout: float) -> "defer.Deferred[None]":
        """
        Drain and exit: the Deferred fires when the process is gone (after
        SIGKILL if it takes longer than C{timeout}).
        """
        self.stopping = True
        if self.pending is not None and self.pending.active():
            self.pending.cancel()
        self.pending = None
        if self.process is None or self._exited is None:
            return defer.succeed(None)
        ended = self._exited
        if self.channel is not None:
            self.channel.callRemote(ws.Drain).addErrback(lambda f: None)
        else:
            self.kill("TERM")
        killer = self.reactor.callLater(timeout, self.kill)
        ended.addBoth(lambda r: killer.cancel() if killer.active() else None)
        return ended

    def status(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": self.pid,
            "ready": self.ready,
            "restarts": self.restarts,
            "requests": self.requests,
        }


class MasterBalancer(Balancer):
    """
    The balancer of the master process of C{--workers N}: the same
    configuration, pools, health checks and admin server as one balancer
    process, but its listening sockets are held for N workers that accept
    and proxy.

    @ivar slots: the L{WorkerSlot}s.
    @ivar held: the listening ports, bound and not read.
    @ivar totals: the L{workerstate.Totals} of the workers' reports.
    """

    def __init__(self, *args: Any, workers: int = 2, **kwargs: Any) -> None:
        if kwargs.get("cookieSecret") is None:
            config = kwargs.get("config")
            if config is None or not config.stickySecretFile:
                # One secret for every worker, so each honours the others'
                # sticky cookies.
                kwargs["cookieSecret"] = os.urandom(32)
        Balancer.__init__(self, *args, **kwargs)
        self.cookieSecret: bytes = kwargs.get("cookieSecret") or b""
        self.held: list[Any] = []
        self.slots = [WorkerSlot(self, i) for i in range(workers)]
        self.totals = ws.Totals()
        self.lastState: dict[str, Any] = {}
        self._watching = LoopingCall(self.pushState)
        self._watching.clock = self.reactor
        self.factories.append(_Workers(self))

    @property
    def workerCount(self) -> int:
        return len(self.slots)

    def connectionCounts(self) -> list[tuple[str, int]]:
        """
        The open client connections of each listener: the workers' (the
        master accepts none).
        """
        counts = self.totals.connections(len(self.listening))
        return [(endpoint, n) for (endpoint, _), n in zip(self.listening, counts)]

    def workerStatus(self) -> list[dict[str, Any]]:
        return [slot.status() for slot in self.slots]

    def listenOn(self, endpoint: Any, factory: Any) -> Any:
        return Balancer.listenOn(self, _HeldEndpoint(endpoint, self.held), factory)

    def startService(self) -> None:
        Balancer.startService(self)
        self.lastState = ws.snapshot(self.pools)
        for slot in self.slots:
            slot.start()
        self._watching.start(STATE_INTERVAL, now=False)
        log.info("master (pid {pid}): {n} workers", pid=os.getpid(), n=len(self.slots))

    def pushState(self) -> None:
        """
        Send every worker the backend state if it changed; kill a worker
        that went silent.
        """
        state = ws.snapshot(self.pools)
        if state != self.lastState:
            self.lastState = state
            for slot in self.slots:
                slot.send(ws.SetState, state=state)
        now = self.reactor.seconds()
        for slot in self.slots:
            slot.watch(now)

    def reload(self) -> Any:
        """
        Reload as one process does, then send every worker the
        configuration and the backend state.
        """
        def push(result: Any) -> Any:
            self.lastState = ws.snapshot(self.pools)
            for slot in self.slots:
                slot.send(ws.Configure, config=self.config, state=self.lastState,
                          secret=self.cookieSecret, index=slot.index,
                          workers=len(self.slots))
            return result

        # As one process: a broken file raises (nothing changed, nothing
        # pushed); a reload that returns a Deferred pushes when it fires.
        result = Balancer.reload(self)
        if isinstance(result, defer.Deferred):
            return result.addCallback(push)
        return push(result)

    def reopenLogs(self) -> None:
        Balancer.reopenLogs(self)
        for slot in self.slots:
            slot.send(ws.Reopen)

    def stopService(self) -> Any:
        """
        A graceful stop in one balancer's order: stop listening (the
        master's copies of the sockets), drain (the workers: each drains
        and exits), then the admin server and the checks.
        """
        if self._watching.running:
            self._watching.stop()
        log.info("stopping: draining {n} workers", n=len(self.slots))
        return Balancer.stopService(self)


class _Workers:
    """
    The workers as one of the master's drained things: a graceful stop's
    drain tells each to drain and exit, and waits for all.
    """

    def __init__(self, master: MasterBalancer) -> None:
        self.master = master

    def drain(self, timeout: float) -> Any:
        return defer.gatherResults(
            [slot.stop(timeout + GRACE) for slot in self.master.slots]
        )

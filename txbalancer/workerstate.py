"""
What the master and its workers say to each other (C{--workers N}): the AMP
commands, the backend state the master pushes and how a worker applies it,
and the counters a worker reports and how the master sums them.

Master to worker::

    Configure   the configuration (the master's frozen BalancerConfig), the
                backend state, the sticky-cookie secret, the worker's index
                and the number of workers: the first message, and again on
                every reload
    SetState    the backend state, whenever it changes: per pool, every
                backend's spec (address, weight, max_conns, backup), health
                (up, down, draining) and whether the operator disabled it
    Reopen      SIGUSR1: reopen the access log
    Drain       stop gracefully (stop accepting, finish the requests in
                flight, exit 0)

Worker to master::

    Log         a log event of the worker, formatted
    Report      every second: per backend the counters since start
                (requests, failures, in flight, responses by class, the
                latency histogram) and the response times since the last
                report; per pool requests in flight and retries

The values travel pickled (L{Blob}, split over as many AMP values as
needed): the channel is a socket pair between the master and the children
it spawned, running the same code.

A worker applies the state with L{applyState}: it adds, updates and
removes backends so its pools match the master's, and takes their health
from the master (its own checks are off, see L{workerConfig}).  Passive
ejection stays in each worker: a backend a worker ejected stays down in
that worker until its ejection ends, whatever the master says.

The master sums reports with L{Totals}: counters add up the increments of
each worker process (a worker that dies keeps what it counted; its
replacement starts from zero), in-flight gauges are the sum of the live
workers' last reports.

Pure but for AMP's types: no reactor, no I/O.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from typing import Any

from twisted.protocols import amp

from txbalancer.stats import WINDOW_SIZE

__all__ = [
    "Blob",
    "Configure",
    "Drain",
    "Log",
    "Reopen",
    "Report",
    "SetState",
    "Totals",
    "applyState",
    "gateHealth",
    "report",
    "snapshot",
    "workerConfig",
]

# An AMP value holds at most 65535 bytes.
_CHUNK = 60000


class Blob(amp.Argument):
    """
    Any picklable value, split over C{NAME}, C{NAME.1}, C{NAME.2}... so
    that it may be larger than one AMP value.
    """

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        data = pickle.dumps(
            self.retrieve(objects, amp._wireNameToPythonIdentifier(name), proto),
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        chunks = [data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK)] or [b""]
        strings[name] = b"%d:" % len(chunks) + chunks[0]
        for i, chunk in enumerate(chunks[1:], 1):
            strings[name + b".%d" % i] = chunk

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        count, _, first = self.retrieve(strings, name, proto).partition(b":")
        parts = [first]
        for i in range(1, int(count)):
            parts.append(self.retrieve(strings, name + b".%d" % i, proto))
        objects[amp._wireNameToPythonIdentifier(name)] = pickle.loads(b"".join(parts))


class Configure(amp.Command):
    arguments = [
        (b"config", Blob()),
        (b"state", Blob()),
        (b"secret", amp.String()),
        (b"index", amp.Integer()),
        (b"workers", amp.Integer()),
    ]
    response = [(b"pid", amp.Integer())]


class SetState(amp.Command):
    arguments = [(b"state", Blob())]
    response: list[Any] = []


class Reopen(amp.Command):
    arguments: list[Any] = []
    response: list[Any] = []


class Drain(amp.Command):
    arguments: list[Any] = []
    response: list[Any] = []


class Log(amp.Command):
    """
    Worker to master: one log event of the worker, formatted, for the
    master's log (so a daemonized twistd's log has its workers' lines).
    """

    arguments = [(b"level", amp.Unicode()), (b"text", amp.Unicode())]
    response: list[Any] = []
    requiresAnswer = False


class Report(amp.Command):
    arguments = [(b"stats", Blob())]
    response: list[Any] = []
    requiresAnswer = False


# -- the worker's configuration


def workerConfig(config: Any, workers: int) -> Any:
    """
    The configuration a worker runs: the master's, with health checks off
    (the master checks and pushes the results), no admin server (the
    master serves it), one process, its pools' backends as given (the
    master reads the files and asks DNS, and pushes what it found), and the
    limits split: C{ceil(max_conns / workers)} per backend and
    C{ceil(max_connections / workers)} client connections per worker.
    """
    pools = tuple(
        dataclasses.replace(
            pool, noHealthChecks=True, source="inline",
            backends=tuple(shareSpec(s, workers) for s in pool.backends),
        )
        for pool in config.pools
    )
    maxConnections = config.maxConnections
    if maxConnections and workers > 1:
        maxConnections = math.ceil(maxConnections / workers)
    return config.replace(
        pools=pools, admin=None, adminToken=None, adminTokenFile=None, workers=1,
        maxConnections=maxConnections,
    )


def shareSpec(spec: Any, workers: int) -> Any:
    """
    C{spec} with this worker's share of its C{max_conns}.
    """
    if spec.max_conns and workers > 1:
        return dataclasses.replace(spec, max_conns=math.ceil(spec.max_conns / workers))
    return spec


# -- state: master to worker


def snapshot(pools: Any) -> dict[str, list[tuple[Any, str, bool]]]:
    """
    The backend state of C{pools} (name to L{txbalancer.balancer.PoolRuntime}):
    per pool, C{(spec, health, disabled)} of every backend, in order.
    """
    return {
        name: [(b.spec, b.state, b.disabled) for b in runtime.pool.backends]
        for name, runtime in pools.items()
    }


def gateHealth(pool: Any, told: dict[Any, str]) -> None:
    """
    Make C{pool}'s health follow the master: its own health machinery (in
    a worker, only passive ejection) may take a backend down, but may bring
    it back only to what the master last said (C{told}: spec key to
    health).
    """
    setHealth = pool.setHealth

    def gated(backend: Any, state: str, reason: str = "") -> None:
        master = told.get(backend.spec.key, "up")
        if state == "up" and master != "up":
            state = master
        setHealth(backend, state, reason)

    gated.original = setHealth  # type: ignore[attr-defined]
    pool.setHealth = gated


def applyState(pools: Any, state: dict[str, Any], workers: int,
               told: dict[Any, str]) -> list[Any]:
    """
    Make the backends of C{pools} what the master's C{state} says: add the
    new ones, update changed specs in place, remove the ones it no longer
    has (their requests in flight finish), and take each one's health and
    disabled flag.  A backend this worker ejected stays down until its
    ejection ends.  Pools the state does not name are left alone (a
    configuration change brings them).

    @param told: updated with the health the master gave each backend.
    @return: the Deferreds of the removals.
    """
    removals = []
    for name, backends in state.items():
        runtime = pools.get(name)
        if runtime is None:
            continue
        pool = runtime.pool
        setHealth = getattr(pool.setHealth, "original", pool.setHealth)
        byKey = {b.spec.key: b for b in pool.backends}
        wanted = set()
        for spec, health, disabled in backends:
            spec = shareSpec(spec, workers)
            key = spec.key
            wanted.add(key)
            told[key] = health
            backend = byKey.get(key)
            if backend is None:
                backend = runtime.addBackend(spec)
            elif backend.spec != spec:
                pool.update(backend, spec)
            outliers = runtime.outliers
            if (health == "up" and outliers is not None
                    and outliers.status(backend)["ejected"]):
                health = "down"
            setHealth(backend, health, "the master says so")
            if disabled:
                pool.disable(backend)
            else:
                pool.enable(backend)
        for key, backend in byKey.items():
            if key not in wanted:
                told.pop(key, None)
                removals.append(runtime.removeBackend(backend))
    return removals


# -- counters: worker to master

_COUNTERS = ("requests", "failures", "connections", "bytesIn", "bytesOut", "ejections")


def report(pools: Any, sent: dict[Any, int], listening: Any = ()) -> dict[str, Any]:
    """
    What a worker reports: per pool, requests in flight and retries, and
    per backend (in use or leaving) its counters, in flight, responses by
    class, histogram and the response times recorded since the last report;
    the open client connections of each listener.

    @param sent: per Backend, how many responses the last report covered;
        updated.
    @param listening: the balancer's C{(endpoint, factory)} listeners.
    """
    result: dict[str, Any] = {}
    for name, runtime in pools.items():
        pool = runtime.pool
        backends: dict[Any, Any] = {}
        for backend in list(pool.backends) + list(pool.leaving):
            stats = backend.stats
            count = stats.count
            fresh = min(count - sent.get(backend, 0), WINDOW_SIZE)
            sent[backend] = count
            backends[backend.spec.key] = {
                **{c: getattr(backend, c) for c in _COUNTERS},
                "active": backend.active,
                "classes": list(stats.classes),
                "buckets": list(stats.buckets),
                "total": stats.total,
                "recent": stats.latest(fresh),
            }
        result[name] = {
            "in_flight": runtime.forwarder.inFlight,
            "retries": runtime.forwarder.retries,
            "queued": len(pool.waiting),
            "backends": backends,
        }
    return {
        "pools": result,
        "listeners": [len(factory.connections) for _, factory in listening],
    }


class Totals:
    """
    The master's sum of its workers' reports, written into its own
    backends (which serve nothing themselves) so that C{/status} and
    C{/metrics} show the totals.

    @ivar last: per worker slot, its process's last report.
    """

    def __init__(self) -> None:
        self.last: dict[Any, dict[str, Any]] = {}

    def record(self, slot: Any, pools: Any, stats: dict[str, Any], now: float) -> None:
        """
        Add the increments of C{slot}'s new report C{stats} to C{pools}.
        """
        previous = self.last.get(slot, {}).get("pools", {})
        self.last[slot] = stats
        for name, pstats in stats["pools"].items():
            runtime = pools.get(name)
            if runtime is None:
                continue
            before = previous.get(name, {})
            runtime.forwarder.retries += _delta(pstats["retries"], before.get("retries", 0))
            byKey = _backends(runtime)
            for key, b in pstats["backends"].items():
                backend = byKey.get(key)
                if backend is None:
                    continue
                old = before.get("backends", {}).get(key)
                for c in _COUNTERS:
                    setattr(backend, c, getattr(backend, c)
                            + _delta(b[c], old[c] if old else 0))
                s = backend.stats
                if old is not None and sum(b["buckets"]) < sum(old["buckets"]):
                    old = None  # a new Backend in that worker: counted from 0
                for i, n in enumerate(b["classes"]):
                    s.classes[i] += n - (old["classes"][i] if old else 0)
                for i, n in enumerate(b["buckets"]):
                    s.buckets[i] += n - (old["buckets"][i] if old else 0)
                s.total += b["total"] - (old["total"] if old else 0.0)
                s.addRecent(b["recent"], now)
        self.gauges(pools)

    def connections(self, n: int) -> list[int]:
        """
        The open client connections of each of C{n} listeners, summed over
        the live workers.
        """
        totals = [0] * n
        for stats in self.last.values():
            for i, count in enumerate(stats.get("listeners", ())[:n]):
                totals[i] += count
        return totals

    def forget(self, slot: Any, pools: Any) -> None:
        """
        C{slot}'s process ended: what it counted stays, its requests in
        flight are over.
        """
        self.last.pop(slot, None)
        self.gauges(pools)

    def gauges(self, pools: Any) -> None:
        """
        Requests in flight and queued: the sum of the live workers' last reports.  A
        backend the master removed is gone once no worker has requests in
        flight to it.
        """
        for name, runtime in pools.items():
            inFlight = queued = 0
            active: dict[Any, int] = {}
            for stats in self.last.values():
                pstats = stats["pools"].get(name)
                if pstats is None:
                    continue
                inFlight += pstats["in_flight"]
                queued += pstats.get("queued", 0)
                for key, b in pstats["backends"].items():
                    active[key] = active.get(key, 0) + b["active"]
            runtime.forwarder.inFlight = inFlight
            runtime.queuedElsewhere = queued
            pool = runtime.pool
            for key, backend in _backends(runtime).items():
                backend.active = active.get(key, 0)
                if not backend.active and backend in pool.leaving:
                    pool.leaving.pop(backend).callback(None)


def _delta(now: int, before: int) -> int:
    # A counter that went down belongs to a new Backend object (removed and
    # added again in that worker): it counted from 0.
    return now - before if now >= before else now


def _backends(runtime: Any) -> dict[Any, Any]:
    pool = runtime.pool
    return {b.spec.key: b for b in list(pool.leaving) + list(pool.backends)}

"""
Backends from DNS SRV records (C{srv:_http._tcp.web.service.consul}).

L{SRVDiscovery} looks the name up with twisted.names, hands the backends
of the answer to a callback (the balancer applies them through the same
diff as a reload), and looks the name up again when the answer's TTL runs
out.  What a record becomes (L{specsFromAnswer}):

    - a backend C{target:port}, the target's address taken from the
      answer's additional A/AAAA records when they are there (Consul and
      Kubernetes send them), else the target name itself;
    - its weight is the SRV weight (0 counts as 1, at most 1000);
    - its priority level is the rank of its SRV priority among those of
      the answer: the lowest SRV priority is level 0 (the primaries), the
      next one level 1 (used only when every primary is down), and so on.

A failed lookup (a timeout, a refusal, no such name, an answer without
records) keeps the last good set, is logged, and is tried again a few
seconds later.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Optional, Sequence

from twisted.logger import Logger
from twisted.names import dns

from txbalancer.config import BackendSpec

__all__ = ["SRVDiscovery", "makeResolver", "specsFromAnswer"]

log = Logger()

_WEIGHT_MAX = 1000


def _name(value: Any) -> str:
    text = value.name.decode("ascii") if hasattr(value, "name") else str(value)
    return text.rstrip(".").lower()


def specsFromAnswer(
    name: str, answers: Sequence[Any], additional: Sequence[Any] = ()
) -> tuple[BackendSpec, ...]:
    """
    The backends of the SRV records of C{name} among C{answers} (resource
    records, C{twisted.names.dns.RRHeader}), ordered by level, then by
    address: servers rotate the order of their records, and the same set
    must compare equal; a target of C{.} (the service is not offered) is
    skipped.
    """
    wanted = name.rstrip(".").lower()
    addresses: dict[str, str] = {}
    for rr in additional:
        if rr.type in (dns.A, dns.AAAA):
            addresses.setdefault(_name(rr.name), rr.payload.dottedQuad()
                                 if rr.type == dns.A else _ipv6(rr.payload))
    records = [
        rr.payload
        for rr in answers
        if rr.type == dns.SRV and _name(rr.name) == wanted
    ]
    records = [r for r in records if _name(r.target)]
    levels = sorted({r.priority for r in records})
    specs: list[BackendSpec] = []
    seen: set[Any] = set()
    for record in sorted(
        records, key=lambda r: (r.priority, _name(r.target), r.port)
    ):
        target = _name(record.target)
        host = addresses.get(target, target)
        spec = BackendSpec(
            host=host,
            port=record.port,
            weight=min(max(record.weight, 1), _WEIGHT_MAX),
            priority=min(levels.index(record.priority), 100),
            filename=f"srv:{name}",
        )
        if spec.key not in seen:
            seen.add(spec.key)
            specs.append(spec)
    return tuple(sorted(specs, key=lambda s: (s.priority, s.key)))


def _ipv6(payload: Any) -> str:
    return str(ipaddress.IPv6Address(payload.address))


def makeResolver(dnsServer: Optional[str], reactor: Any) -> Any:
    """
    The resolver of C{srv:} backends: the DNS server C{HOST:PORT} given,
    or the system's (C{/etc/resolv.conf}, through twisted.names).
    """
    from twisted.names import client

    if dnsServer:
        from txbalancer.settings import splitDnsServer

        return client.Resolver(servers=[splitDnsServer(dnsServer)], reactor=reactor)
    return client.createResolver()


class SRVDiscovery:
    """
    Follows the SRV records of one name.

    @param name: the name looked up (without the C{srv:} prefix).
    @param resolver: an C{IResolver} (C{lookupService}).
    @param clock: an C{IReactorTime}.
    @param onChange: C{onChange(specs)}, called with the backends of each
        answer that differs from the last one applied.
    @param minTTL: the soonest a name is looked up again, whatever its TTL.
    @param maxTTL: the latest a name is looked up again, whatever its TTL.
    @param retry: seconds before a failed lookup is tried again.
    @param timeout: the timeouts of one lookup's tries, in seconds.

    @ivar specs: the last good set of backends, or L{None} before the first.
    @ivar nextLookup: seconds until the next lookup (for status and tests).
    """

    def __init__(
        self,
        name: str,
        resolver: Any,
        clock: Any,
        onChange: Callable[[tuple[BackendSpec, ...]], object],
        *,
        minTTL: float = 1.0,
        maxTTL: float = 300.0,
        retry: float = 5.0,
        timeout: Sequence[int] = (2, 3),
    ) -> None:
        self.name = name
        self.resolver = resolver
        self.clock = clock
        self.onChange = onChange
        self.minTTL = minTTL
        self.maxTTL = maxTTL
        self.retry = retry
        self.timeout = tuple(timeout)
        self.specs: Optional[tuple[BackendSpec, ...]] = None
        self.nextLookup: Optional[float] = None
        self._call: Any = None
        self._pending: Any = None
        self._running = False

    def start(self) -> None:
        """
        Look the name up now, then whenever its TTL runs out.
        """
        self._running = True
        self._lookup()

    def stop(self) -> None:
        """
        No more lookups; one in flight is cancelled.
        """
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()

    def _lookup(self) -> None:
        self._call = None
        if not self._running:
            return
        d = self._pending = self.resolver.lookupService(self.name, timeout=self.timeout)
        d.addCallbacks(self._answered, self._failed)
        d.addErrback(lambda f: log.failure("SRV lookup of {name}", f, name=self.name))

    def _answered(self, result: Any) -> None:
        if self._pending is None:
            return
        self._pending = None
        answers, authority, additional = result
        specs = specsFromAnswer(self.name, answers, additional)
        if not specs:
            self._keep("the answer has no SRV records")
            return
        ttls = [rr.ttl for rr in answers if rr.type == dns.SRV]
        ttl = min(max(min(ttls, default=self.minTTL), self.minTTL), self.maxTTL)
        if specs != self.specs:
            log.info(
                "srv:{name}: {n} backends: {backends} (looked up again in {ttl}s)",
                name=self.name,
                n=len(specs),
                backends=", ".join(
                    f"{s.address} weight={s.weight} priority={s.priority}"
                    for s in specs
                ),
                ttl=ttl,
            )
            self.specs = specs
            self.onChange(specs)
        self._schedule(ttl)

    def _failed(self, failure: Any) -> None:
        if self._pending is None:
            return  # cancelled by stop()
        self._pending = None
        reason = failure.getErrorMessage() or failure.type.__name__
        self._keep(f"{failure.type.__name__}: {reason}")

    def _keep(self, reason: str) -> None:
        log.warn(
            "srv:{name}: lookup failed ({reason}); keeping the last good set "
            "({n} backends), trying again in {retry}s",
            name=self.name,
            reason=reason,
            n=len(self.specs or ()),
            retry=self.retry,
        )
        self._schedule(self.retry)

    def _schedule(self, seconds: float) -> None:
        if self._running:
            self.nextLookup = seconds
            self._call = self.clock.callLater(seconds, self._lookup)

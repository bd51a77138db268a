"""
Strategies that pick a backend for a request.

Every strategy is a small class with the same interface
(L{txbalancer.interfaces.IStrategy}; each takes C{random=} and C{clock=}
keywords and ignores what it does not need):
C{choose(candidates, key)} picks one of C{candidates}, C{observe(backend,
seconds)} hears how long a finished attempt waited for response headers,
and C{forget(backend)} drops what it kept about a backend that left the
pool.

C{candidates} are the backends the request may go to right now (available,
not yet tried by this request), in the pool's order.  A strategy reads only
C{weight} (the effective weight: an int today, a float that ramps up during
slow start later), C{active} (requests in flight) and C{address} (the
C{host:port} identity, stable across processes) of each candidate.

Strategies are pure: no reactor, no I/O.  Randomness comes in as a
C{random.Random} and time as a C{clock()} returning seconds, so tests replay
exact sequences.  Every constructor takes both as keyword arguments and
ignores what it does not need, so the caller can build any of them the same
way::

    chooser = STRATEGIES[name](random=random.Random(), clock=reactor.seconds)
"""

from __future__ import annotations

import math
import random as _random
import time
from collections.abc import Sequence
from hashlib import blake2b
from typing import TYPE_CHECKING, Callable

from zope.interface import implementer

from txbalancer.interfaces import IStrategy

if TYPE_CHECKING:
    from txbalancer.backend import Backend


def _lighter(a: Backend, b: Backend) -> bool:
    """
    Whether C{a} has fewer requests in flight per unit of weight than C{b}
    (cross-multiplied, so integer weights compare exactly).
    """
    return a.active * b.weight < b.active * a.weight


def _weightedIndex(
    rng: _random.Random, candidates: Sequence[Backend], skip: int = -1
) -> int:
    """
    The index of a candidate drawn with probability proportional to its
    weight, never C{skip}.
    """
    total = 0.0
    for i, backend in enumerate(candidates):
        if i != skip:
            total += backend.weight
    r = rng.random() * total
    last = -1
    for i, backend in enumerate(candidates):
        if i == skip:
            continue
        last = i
        r -= backend.weight
        if r < 0:
            return i
    return last  # only reached through float rounding at the very top


@implementer(IStrategy)
class RoundRobin:
    """
    Smooth weighted round robin, as nginx does it: every pick adds each
    candidate's weight to its running score, the highest score wins and pays
    back the total.  Weights 5, 1, 1 give C{a a b a c a a}: the heavy
    backend's turns are spread out, never bunched.
    """

    name = "round-robin"
    description = "smooth weighted round robin: each backend in turn, by weight"

    def __init__(
        self,
        *,
        random: _random.Random | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._current: dict[int, float] = {}

    def choose(
        self, candidates: Sequence[Backend], key: str | None = None
    ) -> Backend | None:
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        current = self._current
        total: float = 0
        best = None
        bestScore: float = 0
        for backend in candidates:
            weight = backend.weight
            total += weight
            score = current.get(id(backend), 0) + weight
            current[id(backend)] = score
            if best is None or score > bestScore:
                best = backend
                bestScore = score
        current[id(best)] = bestScore - total
        return best

    def observe(self, backend: Backend, seconds: float) -> None:
        """
        Latency plays no part in round robin.
        """

    def forget(self, backend: Backend) -> None:
        """
        Drop the bookkeeping for a backend that left the pool.
        """
        self._current.pop(id(backend), None)


@implementer(IStrategy)
class LeastConn:
    """
    Fewest requests in flight per unit of weight.  Backends tied for the
    lightest load share the request by smooth weighted round robin (as
    nginx's least_conn does), so ties take turns in proportion to their
    weights rather than the first in the list taking everything, and
    weights hold even when requests never overlap.
    """

    name = "least-conn"
    description = "fewest requests in flight per weight; ties by weighted turns"

    def __init__(
        self,
        *,
        random: _random.Random | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._ties = RoundRobin()

    def choose(
        self, candidates: Sequence[Backend], key: str | None = None
    ) -> Backend | None:
        if not candidates:
            return None
        best = candidates[0]
        tied = [best]
        for backend in candidates[1:]:
            # Compare active/weight without dividing: a*wb vs b*wa.
            left = backend.active * best.weight
            right = best.active * backend.weight
            if left < right:
                best = backend
                tied = [backend]
            elif left == right:
                tied.append(backend)
        if len(tied) == 1:
            return best
        return self._ties.choose(tied)

    def observe(self, backend: Backend, seconds: float) -> None:
        """
        Latency plays no part in least-conn.
        """

    def forget(self, backend: Backend) -> None:
        """
        Drop the tie-breaking bookkeeping for a backend that left.
        """
        self._ties.forget(backend)


_MASK64 = (1 << 64) - 1
_2_TO_MINUS_53 = 2.0**-53


def _hash64(text: str) -> int:
    """
    A 64-bit hash of C{text} that every process computes alike (unlike
    C{hash()}, which is salted per process).
    """
    return int.from_bytes(blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def _mix(x: int) -> int:
    """
    The splitmix64 finalizer: a 64-bit bijection whose every output bit
    depends on every input bit.
    """
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def hrwScore(key: str, address: str, weight: float) -> float:
    """
    The weighted rendezvous score of the backend at C{address} for C{key};
    the highest score among the candidates wins.

    With C{h = splitmix64(blake2b64(key) ^ blake2b64(address))} (blake2b
    with an 8-byte digest, read big-endian), C{u} is the top 53 bits of
    C{h} mapped into the open interval (0, 1) and the score is
    C{-weight / ln(u)}.  Nothing here depends on the process, so every
    balancer computes the same scores; this is the reference that
    L{IPHash.choose} computes faster.
    """
    u = ((_mix(_hash64(key) ^ _hash64(address)) >> 11) + 0.5) * _2_TO_MINUS_53
    return -weight / math.log(u)


@implementer(IStrategy)
class IPHash:
    """
    Weighted rendezvous hashing (highest random weight) of the client
    address: each candidate scores C{-weight / ln(u)}, with C{u} a hash of
    the key and the backend's address (see L{hrwScore}); the highest score
    wins.

    The same key and backends give the same backend in every process.  A
    backend joining takes only the keys it now wins (its weight's share),
    and a backend leaving gives up only its own keys, each to that key's
    next choice; when it returns, its keys come back.  A key's order over
    the backends never changes, so a request that cannot use its first
    choice (down, or already tried) goes to its second.

    Each backend's address hash is computed once and kept, so a pick costs
    one blake2b plus a few integer operations per candidate.

    Without a key (no client address) it falls back to smooth weighted
    round robin.
    """

    name = "ip-hash"
    description = "consistent hash of the client address: same client, same backend"

    def __init__(
        self,
        *,
        random: _random.Random | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._fallback = RoundRobin()
        self._addressHashes: dict[str, int] = {}

    def choose(
        self, candidates: Sequence[Backend], key: str | None = None
    ) -> Backend | None:
        if not candidates:
            return None
        if key is None:
            return self._fallback.choose(candidates)
        if len(candidates) == 1:
            return candidates[0]
        k = _hash64(key)
        hashes = self._addressHashes
        log = math.log
        best = candidates[0]
        bestScore = -1.0
        for backend in candidates:
            address = backend.address
            a = hashes.get(address)
            if a is None:
                a = hashes[address] = _hash64(address)
            x = k ^ a
            x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
            x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
            x ^= x >> 31
            score = -backend.weight / log(((x >> 11) + 0.5) * _2_TO_MINUS_53)
            if score > bestScore:
                best = backend
                bestScore = score
        return best

    def observe(self, backend: Backend, seconds: float) -> None:
        """
        Latency plays no part in ip-hash.
        """

    def forget(self, backend: Backend) -> None:
        """
        Drop what was kept about C{backend}.
        """
        self._addressHashes.pop(backend.address, None)
        self._fallback.forget(backend)


@implementer(IStrategy)
class Random:
    """
    A candidate drawn at random, with probability proportional to its
    weight.
    """

    name = "random"
    description = "weighted random"

    def __init__(
        self,
        *,
        random: _random.Random | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._random = random if random is not None else _random.Random()

    def choose(
        self, candidates: Sequence[Backend], key: str | None = None
    ) -> Backend | None:
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        return candidates[_weightedIndex(self._random, candidates)]

    def observe(self, backend: Backend, seconds: float) -> None:
        """
        Latency plays no part in random.
        """

    def forget(self, backend: Backend) -> None:
        """
        Random keeps nothing per backend.
        """


@implementer(IStrategy)
class PowerOfTwoChoices:
    """
    Power of two choices: two distinct candidates drawn at random by weight;
    the one with fewer requests in flight per unit of weight wins, the first
    drawn on a tie.  Nearly as good as least-conn at avoiding a loaded
    backend, without every balancer herding onto the same idle one.
    """

    name = "p2c"
    description = (
        "two weighted random picks, the one with less in flight per weight wins"
    )

    def __init__(
        self,
        *,
        random: _random.Random | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._random = random if random is not None else _random.Random()

    def choose(
        self, candidates: Sequence[Backend], key: str | None = None
    ) -> Backend | None:
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        i = _weightedIndex(self._random, candidates)
        j = _weightedIndex(self._random, candidates, skip=i)
        first, second = candidates[i], candidates[j]
        return second if _lighter(second, first) else first

    def observe(self, backend: Backend, seconds: float) -> None:
        """
        Latency plays no part in p2c.
        """

    def forget(self, backend: Backend) -> None:
        """
        P2c keeps nothing per backend.
        """


class _Ewma:
    """
    One backend's peak-EWMA latency estimate, in seconds, as of C{stamp}.
    """

    __slots__ = ("cost", "stamp")

    def __init__(self, cost: float, stamp: float) -> None:
        self.cost = cost
        self.stamp = stamp


@implementer(IStrategy)
class LeastTime:
    """
    Least expected time: the lowest C{latency * (in flight + 1) / weight}
    wins, where C{latency} is a peak-EWMA of the time to response headers,
    as Finagle and Linkerd compute it:

      - a sample above the estimate replaces it at once (the peak), so a
        backend that slows down is avoided on its next pick;
      - a sample below it pulls the estimate down by C{1 - exp(-dt/decay)},
        C{dt} being the time since the estimate was last touched;
      - reading the estimate when choosing decays it towards zero the same
        way, so a backend that was slow and has been left alone is tried
        again after a few C{decay} seconds.

    A backend without samples yet is taken to be as fast as the median of
    those with samples (zero when nobody has any), so a new backend is
    neither flooded nor starved.  Ties (equal cost, e.g. before any sample)
    go to fewer requests in flight per weight, then take turns as in
    L{LeastConn}.

    @param decay: the decay time constant, in seconds.
    """

    name = "least-time"
    description = "lowest peak-EWMA latency x (in flight + 1) / weight"

    def __init__(
        self,
        *,
        random: _random.Random | None = None,
        clock: Callable[[], float] | None = None,
        decay: float = 10.0,
    ) -> None:
        self._clock = clock if clock is not None else time.monotonic
        self._decay = decay
        self._estimates: dict[Backend, _Ewma] = {}
        self._turn = 0

    def _decayed(self, estimate: _Ewma, now: float) -> float:
        elapsed = now - estimate.stamp
        if elapsed <= 0:
            return estimate.cost
        return estimate.cost * math.exp(-elapsed / self._decay)

    def latency(self, backend: Backend) -> float | None:
        """
        C{backend}'s current latency estimate, L{None} before any sample.
        """
        estimate = self._estimates.get(backend)
        if estimate is None:
            return None
        return self._decayed(estimate, self._clock())

    def _median(self, now: float) -> float:
        values = sorted(self._decayed(e, now) for e in self._estimates.values())
        n = len(values)
        if n == 0:
            return 0.0
        if n % 2:
            return values[n // 2]
        return (values[n // 2 - 1] + values[n // 2]) / 2

    def choose(
        self, candidates: Sequence[Backend], key: str | None = None
    ) -> Backend | None:
        n = len(candidates)
        if n == 0:
            return None
        now = self._clock()
        start = self._turn % n
        estimates = self._estimates
        median: float | None = None
        best = candidates[start]
        bestAt = start
        bestCost = 0.0
        for i in range(start, start + n):
            backend = candidates[i % n]
            estimate = estimates.get(backend)
            if estimate is None:
                if median is None:
                    median = self._median(now)
                latency = median
            else:
                latency = estimate.cost = self._decayed(estimate, now)
                estimate.stamp = now
            cost = latency * (backend.active + 1) / backend.weight
            if (
                i == start
                or cost < bestCost
                or (cost == bestCost and _lighter(backend, best))
            ):
                best = backend
                bestAt = i
                bestCost = cost
        self._turn = bestAt + 1
        return best

    def observe(self, backend: Backend, seconds: float) -> None:
        """
        Fold a response-header latency sample into C{backend}'s estimate.
        """
        now = self._clock()
        estimate = self._estimates.get(backend)
        if estimate is None:
            self._estimates[backend] = _Ewma(seconds, now)
            return
        if seconds > estimate.cost:
            estimate.cost = seconds
        else:
            w = math.exp(-max(now - estimate.stamp, 0.0) / self._decay)
            estimate.cost = estimate.cost * w + seconds * (1.0 - w)
        estimate.stamp = now

    def forget(self, backend: Backend) -> None:
        """
        Drop C{backend}'s latency estimate.
        """
        self._estimates.pop(backend, None)


STRATEGIES: dict[str, type] = {
    strategy.name: strategy
    for strategy in (
        RoundRobin,
        LeastConn,
        IPHash,
        Random,
        PowerOfTwoChoices,
        LeastTime,
    )
}
"""
Every strategy by its C{--strategy} name.  Build one with
C{STRATEGIES[name](random=..., clock=...)}; each class has a C{description}.
"""

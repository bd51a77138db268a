"""
Strategies that pick a backend for a request.

Each strategy is a small class with one method::

    choose(candidates: Sequence[Backend]) -> Backend | None

C{candidates} are the backends the request may go to right now (available,
not yet tried by this request), in the pool's order.  A strategy keeps only
its own bookkeeping, never a reference to the reactor, and does no I/O, so
it is tested alone with exact sequences.
"""

from __future__ import annotations

from typing import Sequence

from txbalancer.backend import Backend


class RoundRobin:
    """
    Smooth weighted round robin, as nginx does it: every pick adds each
    candidate's weight to its running score, the highest score wins and pays
    back the total.  Weights 5, 1, 1 give C{a a b a c a a}: the heavy
    backend's turns are spread out, never bunched.
    """

    name = "round-robin"

    def __init__(self) -> None:
        self._current: dict[int, int] = {}

    def choose(self, candidates: Sequence[Backend]) -> Backend | None:
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        current = self._current
        total = 0
        best = None
        bestScore = 0
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

    def forget(self, backend: Backend) -> None:
        """
        Drop the bookkeeping for a backend that left the pool.
        """
        self._current.pop(id(backend), None)


STRATEGIES = {
    RoundRobin.name: RoundRobin,
}

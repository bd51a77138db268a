"""
The backend pool: a Twisted service that owns the backends and the chooser,
and answers one question for the proxy: which backend gets this request?

Everything a later worker process would need to receive rather than compute
(the set of backends and their state) lives here behind L{choose} and
L{status}.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

from twisted.application.service import Service
from twisted.logger import Logger

from txbalancer.backend import Backend

log = Logger()


class BackendPool(Service):
    """
    The backends behind one listener and the strategy that picks among them.

    @ivar backends: every backend, in the order of the backends file.
    """

    def __init__(self, specs: Iterable[Any], chooser: Any) -> None:
        self.chooser = chooser
        self.backends: list[Backend] = [Backend(spec) for spec in specs]
        self._refresh()

    def _refresh(self) -> None:
        self._available = [b for b in self.backends if b.available]

    def setAvailable(self, backend: Backend, available: bool) -> None:
        """
        Let the chooser pick C{backend} again, or stop it doing so.
        """
        if backend.available != available:
            backend.available = available
            self._refresh()

    def choose(
        self, request: Any = None, exclude: Sequence[Backend] | set[Backend] = ()
    ) -> Optional[Backend]:
        """
        The backend for C{request}, never one in C{exclude}; L{None} when
        no backend is left.
        """
        candidates = self._available
        if exclude:
            candidates = [b for b in candidates if b not in exclude]
        return self.chooser.choose(candidates)

    def status(self) -> list[dict[str, Any]]:
        """
        Each backend's state, as plain data.
        """
        return [b.status() for b in self.backends]

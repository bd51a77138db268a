"""
The access log: one line per request, in the combined log format followed
by the backend that served it and the time it took.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any, Callable, Optional

_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()


def _quote(value: Optional[bytes]) -> str:
    if value is None:
        return "-"
    text = value.decode("latin-1")
    return text.replace("\\", "\\\\").replace('"', '\\"')


class AccessLog:
    """
    Writes access log lines to a file (or stdout for C{-}).

    @param clock: returns the current time; the reactor's C{seconds}.
    """

    def __init__(self, stream: IO[str], clock: Callable[[], float]) -> None:
        self.stream = stream
        self.clock = clock
        self._second = -1
        self._stamp = ""

    @classmethod
    def open(cls, path: str, clock: Callable[[], float]) -> "AccessLog":
        if path == "-":
            return cls(sys.stdout, clock)
        return cls(open(path, "a", buffering=1, encoding="utf-8"), clock)

    def _timestamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            t = time.gmtime(second)
            self._second = second
            self._stamp = "%02d/%s/%04d:%02d:%02d:%02d +0000" % (
                t.tm_mday,
                _MONTHS[t.tm_mon - 1],
                t.tm_year,
                t.tm_hour,
                t.tm_min,
                t.tm_sec,
            )
        return self._stamp

    def log(self, request: Any, status: int, size: int, backend: Any) -> None:
        now = self.clock()
        referer = agent = None
        for name, value in request.headers:
            lname = name.lower()
            if lname == b"referer":
                referer = value
            elif lname == b"user-agent":
                agent = value
        line = '%s - - [%s] "%s %s %s" %d %d "%s" "%s" %s %.3f\n' % (
            request.peer or "-",
            self._timestamp(now),
            request.method.decode("latin-1"),
            _quote(request.target),
            request.version.decode("latin-1"),
            status,
            size,
            _quote(referer),
            _quote(agent),
            backend.address if backend is not None else "-",
            max(0.0, now - request.received),
        )
        self.stream.write(line)

    def close(self) -> None:
        if self.stream is not sys.stdout:
            self.stream.close()

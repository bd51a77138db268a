"""
What one backend's responses looked like: counts by status class, a
latency histogram, and a window of recent response times for percentiles.

Recording is on the hot path (once per response), so it is a handful of
integer and list operations: no allocation, no sorting, no clock of its
own (the caller passes the times it already has).  The readers (the admin
server's /status and /metrics) do the sorting, at scrape time.

Pure: no reactor, no I/O.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Optional

__all__ = ["BUCKETS", "WINDOW_SECONDS", "WINDOW_SIZE", "ResponseStats", "percentile"]

# Upper bounds (seconds, inclusive) of the latency histogram's buckets; a
# last, implicit one is +Inf.
BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)

# The percentiles of /status are over the last WINDOW_SIZE responses, less
# those older than WINDOW_SECONDS.
WINDOW_SIZE = 1024  # a power of two: the ring's index wraps with a mask
WINDOW_SECONDS = 60.0
_MASK = WINDOW_SIZE - 1


class ResponseStats:
    """
    The responses of one backend since start.

    @ivar classes: responses by status class: C{classes[2]} counts 2xx
        (index 0 is unused; 1 to 5 are 1xx to 5xx).
    @ivar buckets: the histogram: C{buckets[i]} counts response times in
        C{(BUCKETS[i-1], BUCKETS[i]]}, the last one those above every bound.
    @ivar total: the sum of the response times, in seconds.
    """

    __slots__ = ("classes", "buckets", "total", "_times", "_at", "_next")

    def __init__(self) -> None:
        self.classes = [0] * 6
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self._times = [0.0] * WINDOW_SIZE
        self._at = [float("-inf")] * WINDOW_SIZE  # when each was recorded
        self._next = 0

    def record(self, status: int, seconds: float, now: float) -> None:
        """
        A response with C{status} whose head arrived C{seconds} after the
        request was sent, at time C{now}.
        """
        cls = status // 100
        if 0 < cls < 6:
            self.classes[cls] += 1
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        i = self._next
        self._times[i] = seconds
        self._at[i] = now
        self._next = (i + 1) & _MASK

    @property
    def count(self) -> int:
        """
        Responses recorded since start.
        """
        return sum(self.buckets)

    def byClass(self) -> dict[str, int]:
        """
        C{{"2xx": N, "3xx": N, "4xx": N, "5xx": N}} (and C{"1xx"} when a
        backend answered one, such as a WebSocket upgrade's 101).
        """
        result = {f"{c}xx": self.classes[c] for c in (2, 3, 4, 5)}
        if self.classes[1]:
            result["1xx"] = self.classes[1]
        return result

    def recent(self, now: float, window: float = WINDOW_SECONDS) -> list[float]:
        """
        The response times recorded within C{window} seconds of C{now}
        (at most the last L{WINDOW_SIZE}), sorted.
        """
        since = now - window
        at = self._at
        return sorted(t for i, t in enumerate(self._times) if at[i] >= since)

    def latency(self, now: float, window: float = WINDOW_SECONDS) -> dict[str, Optional[float]]:
        """
        C{{"p50": ms, "p99": ms}} over the recent window; L{None} for each
        when no response arrived in it.
        """
        recent = self.recent(now, window)
        return {
            "p50": _ms(percentile(recent, 50)),
            "p99": _ms(percentile(recent, 99)),
        }


def percentile(ordered: list[float], p: float) -> Optional[float]:
    """
    The C{p}th percentile (nearest rank) of the sorted C{ordered}, or
    L{None} when it is empty.
    """
    if not ordered:
        return None
    rank = -(-len(ordered) * p // 100)  # ceil(n * p / 100)
    return ordered[max(0, min(len(ordered), int(rank)) - 1)]


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000.0, 3)

"""
Backend health: the state machine that gives one answer per backend (up,
down or draining), the active checks and the passive outlier ejection that
feed it.

One job per module:

L{txbalancer.health.state}
    L{BackendHealth}, one Automat state machine per backend.
L{txbalancer.health.checker}
    L{HealthChecker}, a C{Service} that checks every backend on a
    C{LoopingCall} and feeds the results to its machine.
L{txbalancer.health.outliers}
    L{OutlierDetector}, which ejects backends that fail real requests.

How they meet (what L{txbalancer.balancer.PoolRuntime} wires)::

    def onChange(backend, state, reason):
        pool.setHealth(backend, state, reason)
        if state == "up":
            outliers.returnEarly(backend)   # checks brought it back sooner

    checker = HealthChecker(pool.backends, onChange, reactor, ...)
    outliers = OutlierDetector(checker.eject, checker.ejectionEnded, reactor)
    # in the proxy, after each attempt:
    outliers.record(backend, ok, total=len(pool.backends))

So an ejection marks the backend down at once (C{onEject} -> C{eject});
when its time is up the detector calls C{onReturn} -> C{ejectionEnded} ->
up.  If active checks pass C{rise} times in a row first, the machine goes
up by itself and C{onChange} tells the detector with C{returnEarly}, which
cancels its timer and forgets the ejection (without calling C{onReturn}).

Whether so few backends are healthy that the chooser should ignore health
(C{--panic-threshold}) is the pool's decision, not health's: see
L{txbalancer.pool.BackendPool}.
"""

from txbalancer.health.checker import HealthChecker
from txbalancer.health.outliers import OutlierDetector
from txbalancer.health.state import DOWN, DRAINING, UP, BackendHealth

__all__ = [
    "DOWN",
    "DRAINING",
    "UP",
    "BackendHealth",
    "HealthChecker",
    "OutlierDetector",
]

"""
Settings for every test: Hypothesis makes no timing assertions.

The machine is shared and noisy, and on PyPy the first examples run before
the JIT has warmed up, so a deadline or the "too slow" health check would
fail a test for the machine's sake, not the code's.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "txbalancer",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("txbalancer")

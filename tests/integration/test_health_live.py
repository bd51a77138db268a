"""
Health under a continuous request stream: backends killed (SIGKILL), frozen
(SIGSTOP), draining through their health endpoint, all down at once, and
brought back by PID and port, behind the real ``twistd balancer``. Every
request's outcome is recorded; the time limits are the configured check
intervals times the rise/fall thresholds, plus generous slack.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from .httpraw import ProtocolError, RawClient, get
from .support import FALL, FAST_HEALTH, INTERVAL, MARGIN, RISE, port_of, wait_for

pytestmark = pytest.mark.integration

# What the README promises (interval x fall, plus one interval of jitter and
# check in flight), and interval x rise for a recovery, each plus slack.
DOWN_WITHIN = INTERVAL * (FALL + 1) + MARGIN
UP_WITHIN = INTERVAL * (RISE + 1) + MARGIN


@dataclass
class Outcome:
    at: float
    target: str
    status: int | None = None  # None: no HTTP answer at all
    port: int | None = None
    error: str = ""
    elapsed: float = 0.0


@dataclass
class Stream:
    """``clients`` threads sending GETs on kept-alive connections until
    stopped, or ``limit`` requests each, or ``seconds`` after the start; a
    broken connection is recorded as a failure and replaced."""

    port: int
    clients: int = 3
    limit: int = 500_000
    seconds: float = 120.0
    prefix: str = "/stream"
    timeout: float = 20.0
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True)
            for n in range(self.clients)
        ]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 10)
            assert not t.is_alive(), "a stream client hung"

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def _run(self, n: int) -> None:
        client = None
        deadline = time.monotonic() + self.seconds
        for i in range(self.limit):
            if self._stop.is_set() or time.monotonic() > deadline:
                break
            target = f"{self.prefix}{n}-{i}"
            outcome = Outcome(time.monotonic(), target)
            try:
                if client is None:
                    client = RawClient(self.port, timeout=self.timeout)
                resp = client.request("GET", target)
                outcome.status = resp.status
                if resp.status == 200:
                    outcome.port = port_of(resp)
                else:
                    outcome.error = resp.text.strip()
                if (resp.value("Connection") or "").lower() == "close":
                    client.close()
                    client = None
            except (OSError, ProtocolError) as e:
                outcome.error = repr(e)
                if client is not None:
                    client.close()
                client = None
            outcome.elapsed = time.monotonic() - outcome.at
            self._record(outcome)
        if client is not None:
            client.close()

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def ok_count(self) -> int:
        return sum(1 for o in self.snapshot() if o.status == 200)

    def wait_ok(self, more: int, timeout: float) -> None:
        """Wait until ``more`` further requests have succeeded."""
        goal = self.ok_count() + more
        wait_for(lambda: self.ok_count() >= goal, timeout, f"{goal} good answers")

    def failures(self) -> list[Outcome]:
        return [o for o in self.snapshot() if o.status != 200]

    def served_since(self, since: float, port: int) -> int:
        return sum(1 for o in self.snapshot() if o.at >= since and o.port == port)


def describe(failures: list[Outcome], start: float) -> list:
    return [(round(o.at - start, 2), o.status, o.error[:120]) for o in failures]


# -- SIGKILL under load -------------------------------------------------------


@pytest.mark.parametrize(
    "eject_after", ["0", "5"], ids=["active-checks-only", "with-passive-ejection"]
)
def test_kill_and_restart_under_load(backend, balancer, eject_after):
    """Killing one of three backends mid-stream fails no request; the
    balancer stops trying it within interval x fall (+ one interval); brought
    back on its port, it gets traffic again within interval x rise."""
    a, b, c = backend(), backend(), backend()
    lb = balancer([a, b, c], *FAST_HEALTH, "--eject-after", eject_after)
    refused = f"connect to backend {b.address} failed"
    with Stream(lb.port) as stream:
        start = time.monotonic()
        stream.wait_ok(60, 20)
        assert stream.served_since(start, b.port) > 0
        b.kill()
        killed = time.monotonic()
        lb.wait_for_log(f"backend {b.address} down: ", DOWN_WITHIN)
        noticed = time.monotonic() - killed
        # From now on nothing is sent its way: no more refused connects.
        attempts = lb.log_count(refused)
        stream.wait_ok(60, 20)
        time.sleep(INTERVAL * 2)  # a few more checks' worth of traffic
        stream.wait_ok(20, 20)
        assert lb.log_count(refused) == attempts, (attempts, noticed)

        again = backend(port=b.port)
        restarted = time.monotonic()
        wait_for(
            lambda: again.counts("/stream")["started"] > 0,
            UP_WITHIN,
            "the restarted backend to get stream traffic",
        )
        stream.wait_ok(30, 20)
    failures = stream.failures()
    assert failures == [], describe(failures, start)
    assert stream.served_since(restarted, again.port) > 0
    assert lb.log_count(f"backend {b.address} up: ") == 1
    if eject_after == "0":
        # Only the checks could take it out.
        down = [l for l in lb.log_text().splitlines() if f"{b.address} down: " in l]
        assert len(down) == 1 and f"{FALL} failed checks, last: " in down[0], down


# -- SIGSTOP under load -------------------------------------------------------


def test_frozen_backend_under_load(backend, balancer):
    """A frozen (SIGSTOP) backend accepts connections and never answers.

    What the balancer does: a GET sent to it gets no answer within
    --backend-timeout; being idempotent it is then sent once to another
    backend (it may have reached the frozen one, which is why only
    idempotent requests are retried), so the client gets its answer late
    rather than a 504. The health checks time out and take the backend
    down after fall checks; passive ejection counts the timeouts too. So a
    freeze delays a few requests (about one per client per backend timeout
    in the detection window) and fails none, and none is delayed once the
    backend is marked down. After SIGCONT it comes back."""
    a, b, c = backend(), backend(), backend()
    backend_timeout = 1.0
    lb = balancer(
        [a, b, c],
        *FAST_HEALTH,
        "--health-timeout",
        "0.4",
        "--backend-timeout",
        str(backend_timeout),
    )
    try:
        with Stream(lb.port) as stream:
            stream.wait_ok(60, 20)
            b.freeze()
            frozen = time.monotonic()
            lb.wait_for_log(f"backend {b.address} down: ", DOWN_WITHIN + 0.4)
            down_at = time.monotonic()
            stream.wait_ok(60, 20)
            time.sleep(INTERVAL * 2)
            stream.wait_ok(20, 20)
            b.thaw()
            thawed = time.monotonic()
            wait_for(
                lambda: stream.served_since(thawed, b.port) > 0,
                UP_WITHIN,
                "the thawed backend to get traffic",
            )
    finally:
        b.thaw()
    failures = stream.failures()
    outcomes = stream.snapshot()
    delayed = [o for o in outcomes if o.elapsed >= backend_timeout * 0.9]
    window = down_at - frozen
    print(
        f"\nfrozen backend: {len(outcomes)} requests, {len(failures)} failed "
        f"({sorted(set(o.status for o in failures), key=str)}), {len(delayed)} "
        f"delayed by >= {backend_timeout * 0.9:g}s, marked down {window:.2f}s after "
        f"SIGSTOP, {lb.log_count('idempotent, so trying another backend')} retried"
    )
    # Every request sent to the frozen backend was answered by another.
    assert failures == [], describe(failures, frozen)
    # Only requests sent before it was marked down (plus those in flight then)
    # waited, at most one per client per backend timeout in the window.
    assert all(o.at < down_at for o in delayed), describe(delayed, frozen)
    assert len(delayed) <= stream.clients * (window / backend_timeout + 1), (
        describe(delayed, frozen),
        window,
    )
    assert lb.log_count(f"backend {b.address} down: ") == 1


# -- a health endpoint that says 503 ------------------------------------------


def test_health_endpoint_drains_and_restores(backend, balancer):
    """/__health answering 503 with Retry-After drains the backend (no new
    requests, those in flight finish) while it keeps serving; 200 again
    brings it back."""
    a, b, c = backend(), backend(), backend()
    lb = balancer([a, b, c], *FAST_HEALTH, "--health-path", "/__health")
    wait_for(lambda: b.counts("/__health")["started"] >= 1, UP_WITHIN, "a health check")

    # Three slow requests in flight, one on each backend (round robin).
    slow = [RawClient(lb.port, timeout=20) for _ in range(3)]
    for i, client in enumerate(slow):
        client.send(f"GET /__delay?ms=3000&n={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    wait_for(lambda: b.counts("/__delay")["started"] == 1, 10, "the slow request on b")
    b.set_health(503)
    lb.wait_for_log(f"backend {b.address} draining: ", DOWN_WITHIN)
    drained = b.counts("/drain")["started"]
    for i in range(30):
        resp = get(lb.port, f"/drain{i}")
        assert resp.status == 200, resp
        assert port_of(resp) != b.port, (i, resp)
    assert b.counts("/drain")["started"] == drained == 0
    # It keeps serving, and the requests it had finish.
    assert port_of(get(b.port, "/direct")) == b.port
    for client in slow:
        resp = client.response()
        client.close()
        assert resp.status == 200, resp
    assert b.counts("/__delay")["cancelled"] == 0

    b.set_health(200)
    lb.wait_for_log(f"backend {b.address} up: ", UP_WITHIN)

    def b_served():
        return port_of(get(lb.port, "/back")) == b.port

    wait_for(b_served, 10, "b to get requests again")
    assert lb.log_count(f"backend {b.address} draining: ") == 1
    line = [l for l in lb.log_text().splitlines() if f"{b.address} draining: " in l]
    assert "503" in line[0] and "Retry-After" in line[0], line


# -- every backend down -------------------------------------------------------


def test_all_down_fails_fast_and_recovers(backend, balancer):
    """With every backend dead, each request is answered at once (502 while
    the checks have not noticed, 503 once they have); when the backends come
    back, traffic resumes by itself. Each transition is logged once, with
    its reason."""
    a, b = backend(), backend()
    lb = balancer([a, b], *FAST_HEALTH)
    assert get(lb.port, "/before").status == 200
    a.kill()
    b.kill()
    killed = time.monotonic()
    statuses = []
    # A couple of seconds per answer at most: the socket gives up after that.
    while True:
        resp = get(lb.port, f"/dead{len(statuses)}", timeout=2.5)
        assert resp.status in (502, 503), resp
        statuses.append(resp.status)
        if resp.status == 503:
            break
        assert time.monotonic() - killed < DOWN_WITHIN, statuses
        time.sleep(INTERVAL / 5)
    for i in range(10):
        resp = get(lb.port, f"/alldown{i}", timeout=2.5)
        assert resp.status == 503, resp
        assert (resp.value("Content-Type") or "").startswith("text/plain"), resp
    for x in (a, b):
        lb.wait_for_log(f"backend {x.address} down: ", DOWN_WITHIN)

    a2, b2 = backend(port=a.port), backend(port=b.port)

    def recovered():
        resp = get(lb.port, "/recover", timeout=2.5)
        return resp.status == 200

    wait_for(recovered, UP_WITHIN, "traffic to resume")
    for x in (a2, b2):
        lb.wait_for_log(f"backend {x.address} up: ", UP_WITHIN)
    served = {port_of(get(lb.port, f"/after{i}")) for i in range(6)}
    assert served == {a.port, b.port}

    text = lb.log_text().splitlines()
    for x in (a, b):
        downs = [l for l in text if f"backend {x.address} down: " in l]
        ups = [l for l in text if f"backend {x.address} up: " in l]
        assert len(downs) == 1, downs
        assert len(ups) == 1, ups
        # Taken out by its checks, or first by passive ejection (the 502s
        # above were 5 failed requests in a row): either way, with its reason.
        down = downs[0].split(" down: ", 1)[1]
        assert (
            down.startswith(f"{FALL} failed checks, last: ")
            and "refused" in down.lower()
        ) or (
            down.startswith("ejected for ") and "consecutive failed requests" in down
        ), downs
        assert f"{RISE} passed checks" in ups[0], ups

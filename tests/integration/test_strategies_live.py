"""
Strategies, sticky cookies, backups and the max_conns queue, through the real
``twistd balancer`` over real sockets: which backend served each request is
read from the answer ("Response from server on port N") or from the
backends' own counts (``/__count``).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from .httpraw import RawClient, build_request, get
from .support import FALL, FAST_HEALTH, INTERVAL, MARGIN, RISE, get_from, port_of, wait_for

pytestmark = pytest.mark.integration


SOURCES = [f"127.0.0.{i}" for i in range(2, 21)]


def served_by(port: int, targets) -> list[int]:
    """GET each target in turn; the backend port that answered each."""
    ports = []
    for target in targets:
        resp = get(port, target)
        assert resp.status == 200, (target, resp)
        ports.append(port_of(resp))
    return ports


def spread(backends, prefix: str) -> dict[int, int]:
    """{backend port: requests it received whose target starts with prefix}."""
    return {b.port: b.counts(prefix)["started"] for b in backends}


def hammer(port: int, clients: int, each: int, prefix: str) -> None:
    """``clients`` threads, each sending ``each`` GETs on its own connection."""

    def client(n: int) -> None:
        with RawClient(port) as c:
            for i in range(each):
                resp = c.request("GET", f"{prefix}{n}-{i}")
                assert resp.status == 200, resp

    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client, n) for n in range(clients)]:
            f.result()


# -- least-conn, p2c, least-time: a slow backend gets less ------------------


@pytest.mark.parametrize("strategy", ["least-conn", "p2c", "least-time"])
def test_load_aware_strategies_avoid_a_slow_backend(backend, balancer, strategy):
    """One backend of three answers after 300 ms, the others at once: with
    concurrent clients it gets far fewer than the third round robin gives it."""
    fast1, fast2 = backend(), backend()
    slow = backend("delay", DELAY_MS=300)
    lb = balancer([fast1, slow, fast2], "--strategy", strategy)
    hammer(lb.port, clients=4, each=40, prefix="/lc")
    counts = spread([fast1, slow, fast2], "/lc")
    total = sum(counts.values())
    assert total == 160, counts
    # Round robin would send it exactly a third (53); half of that is "clearly fewer".
    assert counts[slow.port] < total / 6, (strategy, counts, slow.port)


def test_round_robin_gives_a_slow_backend_its_share(backend, balancer):
    """The baseline the test above is measured against."""
    fast1, fast2 = backend(), backend()
    slow = backend("delay", DELAY_MS=100)
    lb = balancer([fast1, slow, fast2])
    hammer(lb.port, clients=3, each=12, prefix="/rr")
    counts = spread([fast1, slow, fast2], "/rr")
    assert sum(counts.values()) == 36, counts
    assert counts[slow.port] == 12, counts


# -- ip-hash ----------------------------------------------------------------


def test_ip_hash_is_sticky_per_source_address_and_agrees_across_balancers(
    backend, balancer
):
    """Each of 19 source addresses always gets the same backend, and a second
    balancer started separately with the same backends sends each source to
    the same one."""
    backends = [backend() for _ in range(3)]
    lb1 = balancer(backends, "--strategy", "ip-hash")
    lb2 = balancer(backends, "--strategy", "ip-hash")
    assert lb1.backends_file.read_text() == lb2.backends_file.read_text()
    chosen = {}
    for source in SOURCES:
        ports = {
            port_of(get_from(source, lb.port, f"/ip{i}"))
            for lb in (lb1, lb2)
            for i in range(3)
        }
        assert len(ports) == 1, (source, ports)
        chosen[source] = ports.pop()
    # 19 addresses all on one of three backends would mean no hashing at all.
    assert len(set(chosen.values())) >= 2, chosen
    # Interleaved again later: nothing drifted.
    for source in reversed(SOURCES):
        assert port_of(get_from(source, lb1.port, "/again")) == chosen[source]


def test_ip_hash_uses_forwarded_address_only_from_trusted_proxies(backend, balancer):
    """Behind a trusted proxy (127.0.0.1) the X-Forwarded-For client is
    hashed: it lands where a direct connection from that address lands. From
    an untrusted peer the header is ignored."""
    backends = [backend() for _ in range(3)]
    lb = balancer(
        backends, "--strategy", "ip-hash", "--trusted-proxies", "127.0.0.1/32"
    )
    direct = {s: port_of(get_from(s, lb.port, "/direct")) for s in SOURCES}
    assert len(set(direct.values())) >= 2, direct
    for source in SOURCES:
        for i in range(2):
            resp = get_from(
                "127.0.0.1", lb.port, f"/xff{i}", [("X-Forwarded-For", source)]
            )
            assert port_of(resp) == direct[source], (source, resp)
        # Several hops: the right-most untrusted one is the client.
        resp = get_from(
            "127.0.0.1",
            lb.port,
            "/xff-hops",
            [("X-Forwarded-For", f"203.0.113.9, {source}")],
        )
        assert port_of(resp) == direct[source], (source, resp)
    # An untrusted peer cannot choose its backend with the header.
    for source, other in zip(SOURCES, reversed(SOURCES)):
        resp = get_from(source, lb.port, "/spoof", [("X-Forwarded-For", other)])
        assert port_of(resp) == direct[source], (source, other)


# -- sticky cookies -----------------------------------------------------------


def cookie_from(resp, name: str = "srv") -> str | None:
    """The value the response sets for cookie ``name``, or None."""
    for header in resp.values("Set-Cookie"):
        first, _, _ = header.partition(";")
        key, _, value = first.strip().partition("=")
        if key == name:
            return value
    return None


def test_sticky_cookie(backend, balancer):
    """The first answer sets the cookie; with it every request goes to that
    backend; a tampered cookie falls back and is replaced; a cookie for a
    backend that was stopped falls back to a live one and is replaced."""
    backends = [backend() for _ in range(3)]
    by_port = {b.port: b for b in backends}
    lb = balancer(backends, "--sticky-cookie", "srv", *FAST_HEALTH)

    first = get(lb.port, "/s0")
    assert first.status == 200, first
    home = port_of(first)
    cookie = cookie_from(first)
    assert cookie, first.headers
    attributes = next(h for h in first.values("Set-Cookie") if h.startswith("srv="))
    assert "Path=/" in attributes and "HttpOnly" in attributes, attributes
    # Opaque: neither the address nor the port shows.
    assert str(home) not in cookie and "127.0.0.1" not in cookie, cookie

    for i in range(9):  # round robin alone would visit all three
        resp = get(lb.port, f"/s{i}", [("Cookie", f"a=b; srv={cookie}")])
        assert port_of(resp) == home, (i, resp)

    # A different cookie per backend: collect them by going round.
    cookies = {home: cookie}
    for i in range(12):
        resp = get(lb.port, f"/collect{i}")
        cookies.setdefault(port_of(resp), cookie_from(resp))
        if len(cookies) == 3:
            break
    assert len(cookies) == 3, cookies
    assert len(set(cookies.values())) == 3, cookies

    # Tampered: flip one character.
    flipped = "A" if cookie[-1] != "A" else "B"
    tampered = cookie[:-1] + flipped
    resp = get(lb.port, "/tampered", [("Cookie", f"srv={tampered}")])
    assert resp.status == 200, resp
    replacement = cookie_from(resp)
    assert replacement == cookies[port_of(resp)], (resp.headers, cookies)
    garbage = get(lb.port, "/garbage", [("Cookie", "srv=not-a-cookie")])
    assert garbage.status == 200 and cookie_from(garbage), garbage

    # The home backend dies: its cookie falls back at once (the refused
    # connect moves the request) and after the checks mark it down.
    by_port[home].kill()
    for phase in ("refused", "down"):
        if phase == "down":
            lb.wait_for_log(
                f"backend 127.0.0.1:{home} down: ", INTERVAL * (FALL + 1) + MARGIN
            )
        for i in range(4):
            resp = get(lb.port, f"/{phase}{i}", [("Cookie", f"srv={cookie}")])
            assert resp.status == 200, (phase, resp)
            now = port_of(resp)
            assert now != home, (phase, resp)
            assert cookie_from(resp) == cookies[now], (phase, resp.headers)
    # The new cookie sticks.
    new_home = now
    for i in range(6):
        resp = get(lb.port, f"/after{i}", [("Cookie", f"srv={cookies[new_home]}")])
        assert port_of(resp) == new_home, resp


# -- backup takeover ----------------------------------------------------------


def test_backup_takes_over_only_when_every_primary_is_down(backend, balancer):
    """A backup gets nothing while a primary is up, takes every request within
    interval x fall of the last primary dying, and loses them again within
    interval x rise of one coming back."""
    p1, p2 = backend(), backend()
    spare = backend()
    lb = balancer([p1, p2, f"{spare.address} backup"], *FAST_HEALTH)
    ports = served_by(lb.port, [f"/primary{i}" for i in range(20)])
    assert set(ports) == {p1.port, p2.port}, ports
    assert spare.counts("/primary")["started"] == 0

    # One primary dies: still not the backup.
    p1.kill()
    lb.wait_for_log(f"backend {p1.address} down: ", INTERVAL * (FALL + 1) + MARGIN)
    ports = served_by(lb.port, [f"/one-left{i}" for i in range(10)])
    assert set(ports) == {p2.port}, ports

    # The last one dies: the backup answers within interval x fall (+ slack).
    p2.kill()
    killed = time.monotonic()

    def via_backup():
        resp = get(lb.port, "/takeover", timeout=10)
        return resp.status == 200 and port_of(resp) == spare.port

    wait_for(via_backup, INTERVAL * (FALL + 1) + MARGIN, "the backup to answer")
    took = time.monotonic() - killed
    ports = served_by(lb.port, [f"/backup{i}" for i in range(10)])
    assert set(ports) == {spare.port}, ports

    # A primary comes back on its port: traffic leaves the backup.
    back = backend(port=p2.port)
    returned = time.monotonic()

    def via_primary():
        resp = get(lb.port, "/return", timeout=10)
        return resp.status == 200 and port_of(resp) == back.port

    wait_for(via_primary, INTERVAL * (RISE + 1) + MARGIN, "traffic back on the primary")
    ports = served_by(lb.port, [f"/primary-again{i}" for i in range(10)])
    assert set(ports) == {back.port}, (ports, took, time.monotonic() - returned)


# -- max_conns and the queue --------------------------------------------------


def send(port: int, target: str) -> RawClient:
    client = RawClient(port, timeout=20)
    client.send(build_request("GET", target))
    return client


def test_max_conns_queue(backend, balancer):
    """max_conns=1, --queue-size 2, --queue-timeout 1: one request in flight,
    two wait and succeed, the rest get 503 with Retry-After at once; one that
    waits longer than the timeout gets 503 with Retry-After; one whose client
    left never reaches the backend."""
    b = backend("delay", DELAY_MS=50)
    lb = balancer(
        [f"{b.address} max_conns=1"],
        "--queue-size",
        "2",
        "--queue-timeout",
        "1",
        "--no-health-checks",
    )

    # 1 + 2 + 2: the first holds the only slot for half a second.
    holder = send(lb.port, "/__delay?ms=500&q=hold")
    wait_for(lambda: b.counts("/__delay")["started"] == 1, 10, "the first request")
    others = [send(lb.port, f"/q{i}") for i in range(4)]
    results = [c.response() for c in [holder, *others]]
    for c in [holder, *others]:
        c.close()
    statuses = sorted(r.status for r in results)
    assert statuses == [200, 200, 200, 503, 503], [(r.status, r.text) for r in results]
    assert results[0].status == 200
    for r in results:
        if r.status == 503:
            assert r.value("Retry-After") == "1", r.headers
    counts = b.counts("/q")
    assert counts["started"] == 2, counts

    # One waits past --queue-timeout: 503 with Retry-After, never forwarded.
    holder = send(lb.port, "/__delay?ms=3000&q=long")
    wait_for(lambda: b.counts("/__delay?ms=3000")["started"] == 1, 10, "the holder")
    started = time.monotonic()
    late = send(lb.port, "/late")
    resp = late.response()
    waited = time.monotonic() - started
    late.close()
    assert resp.status == 503, resp
    assert resp.value("Retry-After") == "1", resp.headers
    # It was answered by the queue's timeout, not after the holder finished.
    assert waited < 3.0, waited
    assert b.counts("/late")["started"] == 0
    assert holder.response().status == 200
    holder.close()

    # A client that leaves the queue is removed from it: the next one in
    # line gets the slot, and the one that left is never forwarded.
    holder = send(lb.port, "/__delay?ms=400&q=leave")
    wait_for(lambda: b.counts("/__delay?ms=400")["started"] == 1, 10, "the holder")
    leaver = send(lb.port, "/leaver")
    stayer = send(lb.port, "/stayer")
    leaver.close()
    assert holder.response().status == 200
    assert stayer.response().status == 200
    holder.close()
    stayer.close()
    assert b.counts("/leaver")["started"] == 0
    assert b.counts("/stayer")["started"] == 1


# -- weights --------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["random", "p2c"])
def test_weights_random_and_p2c(backend, balancer, strategy):
    """Weights 1 and 3: about a quarter and three quarters of 400 requests."""
    light, heavy = backend(), backend()
    lb = balancer([light.address, f"{heavy.address} weight=3"], "--strategy", strategy)
    with RawClient(lb.port) as c:
        for i in range(400):
            assert c.request("GET", f"/w{i}").status == 200
    counts = spread([light, heavy], "/w")
    assert sum(counts.values()) == 400, counts
    # Binomial(400, 1/4): mean 100, sd 8.7; 60..140 is more than 4.5 sd.
    assert 60 <= counts[light.port] <= 140, counts


def test_weights_least_conn(backend, balancer):
    """Least-conn weighs requests in flight: with 8 concurrent clients and
    backends that take 100 ms, weight 3 holds about three times as many."""
    light = backend("delay", DELAY_MS=100)
    heavy = backend("delay", DELAY_MS=100)
    lb = balancer(
        [light.address, f"{heavy.address} weight=3"], "--strategy", "least-conn"
    )
    hammer(lb.port, clients=8, each=12, prefix="/wl")
    counts = spread([light, heavy], "/wl")
    assert sum(counts.values()) == 96, counts
    # 24 expected for the light one.
    assert 12 <= counts[light.port] <= 36, counts


def test_weights_least_conn_one_request_at_a_time(backend, balancer):
    """Weights 1 and 3 with requests that never overlap (nothing in flight
    at each choice, so every backend ties on in flight per weight): the
    share must still follow the weights, about 50 and 150 of 200, as
    nginx's least_conn does by breaking ties with weighted round robin."""
    light, heavy = backend(), backend()
    lb = balancer(
        [light.address, f"{heavy.address} weight=3"], "--strategy", "least-conn"
    )
    with RawClient(lb.port) as c:
        for i in range(200):
            assert c.request("GET", f"/seq{i}").status == 200
    counts = spread([light, heavy], "/seq")
    assert sum(counts.values()) == 200, counts
    assert 30 <= counts[light.port] <= 70, counts

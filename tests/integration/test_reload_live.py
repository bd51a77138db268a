"""
SIGHUP under traffic, over real sockets with the real twistd: backends
added, removed and reweighted with zero failed requests; a broken backends
file changes nothing.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import pytest

from .httpraw import RawClient, get
from .support import MARGIN, port_of, wait_for, write_backends
from .test_tcpmode_live import connect, read_line, tcpbackend  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration

# Bounds of the request stream (it stops at whichever comes first).
STREAM_REQUESTS = 50000
STREAM_SECONDS = 120.0


class Stream(threading.Thread):
    """
    Requests sent one after another, over kept-alive connections (a new one
    every 25 requests), counting failures and the backends that answered.
    """

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.served: Counter[int] = Counter()
        self.failures: list[str] = []
        self.sent = 0
        self.done = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        deadline = time.monotonic() + STREAM_SECONDS
        while (
            not self.done.is_set()
            and self.sent < STREAM_REQUESTS
            and time.monotonic() < deadline
        ):
            try:
                with RawClient(self.port, timeout=30) as client:
                    for _ in range(25):
                        if self.done.is_set():
                            break
                        self.sent += 1
                        resp = client.request("GET", f"/s{self.sent}")
                        if resp.status != 200:
                            self.failures.append(f"{resp.status} {resp.text[:80]}")
                            break
                        with self.lock:
                            self.served[port_of(resp)] += 1
                        if (resp.value("Connection") or "").lower() == "close":
                            break
            except Exception as e:  # any failure a client would see
                self.failures.append(repr(e))

    def snapshot(self) -> Counter[int]:
        with self.lock:
            return Counter(self.served)

    def stop(self) -> None:
        self.done.set()
        self.join(60)


def sighup(lb) -> None:
    os.kill(lb.pid, signal.SIGHUP)


def test_new_backend_gets_traffic_after_sighup(backend, balancer):
    """A backend added to the backends file followed by SIGHUP takes requests (the issue's user report)."""
    a, b = backend(), backend()
    lb = balancer([a])
    assert {port_of(get(lb.port, f"/{i}")) for i in range(4)} == {a.port}
    write_backends(lb.backends_file, [a, b])
    sighup(lb)
    lb.wait_for_log("reload applied", 10 * MARGIN)
    served = {port_of(get(lb.port, f"/{i}")) for i in range(8)}
    assert served == {a.port, b.port}


def test_reload_under_traffic_fails_no_request(backend, balancer):
    """Backends added, removed and reweighted by several SIGHUPs under a continuous request stream: zero failed requests, new ones get traffic, removed ones stop getting it, a broken file changes nothing."""
    a, b, c, d = backend(), backend(), backend(), backend()
    lb = balancer([a, b])
    stream = Stream(lb.port)
    stream.start()
    try:
        wait_for(lambda: stream.sent > 50, 30, "the first requests")
        reloads = 0

        def reload(entries) -> None:
            nonlocal reloads
            write_backends(lb.backends_file, entries)
            sighup(lb)
            reloads += 1
            lb.wait_for_log("reload applied", 10 * MARGIN, count=reloads)

        # Add c: it takes traffic.
        reload([a, b, c])
        before = stream.snapshot()[c.port]
        wait_for(lambda: stream.snapshot()[c.port] > before + 10, 30, "traffic to c")

        # Remove b, reweight a: b stops getting traffic, a gets most.
        reload([f"{a.address} weight=4", c])
        # Logged once the requests that were in flight to b are done.
        lb.wait_for_log(f"backend {b.address} removed", 10 * MARGIN)
        gone = stream.snapshot()
        wait_for(lambda: sum(stream.snapshot().values()) > sum(gone.values()) + 100,
                 30, "100 more requests")
        after = stream.snapshot()
        assert after[b.port] == gone[b.port], "b got requests after its removal"
        share_a = after[a.port] - gone[a.port]
        share_c = after[c.port] - gone[c.port]
        assert share_a > 2 * share_c, (share_a, share_c)

        # Replace a by d, with a backup level: d and c serve.
        reload([c, d, f"{a.address} priority=1"])
        mark = stream.snapshot()
        wait_for(lambda: stream.snapshot()[d.port] > mark[d.port] + 10, 30,
                 "traffic to d")
        mark = stream.snapshot()
        wait_for(lambda: sum(stream.snapshot().values()) > sum(mark.values()) + 50,
                 30, "50 more requests")
        assert stream.snapshot()[a.port] == mark[a.port], "a backup got traffic"

        # A broken file: logged, nothing changes, c and d keep serving.
        lb.backends_file.write_text(f"{c.address}\n{d.address} wieght=2\n")
        sighup(lb)
        lb.wait_for_log("reload failed, nothing changed", 10 * MARGIN)
        assert lb.log_count("unknown flag 'wieght'") >= 1
        mark = stream.snapshot()
        wait_for(lambda: sum(stream.snapshot().values()) > sum(mark.values()) + 50,
                 30, "50 more requests after the broken file")
        now = stream.snapshot()
        assert now[c.port] > mark[c.port] and now[d.port] > mark[d.port]
    finally:
        stream.stop()
    assert stream.failures == [], stream.failures[:5]
    print(f"requests: {stream.sent}, failures: {len(stream.failures)}, "
          f"served: {dict(stream.served)}")


def test_stream_in_flight_survives_reloads(backend, balancer):
    """A long streamed response keeps flowing to its end while SIGHUPs remove its backend."""
    slow, other = backend(), backend()
    lb = balancer([slow])
    with RawClient(lb.port, timeout=30) as client:
        client.send(
            b"GET /__slow?chunks=12&interval=250 HTTP/1.1\r\nHost: lb\r\n\r\n"
        )
        wait_for(lambda: slow.counts("/__slow")["started"] == 1, 10 * MARGIN,
                 "the stream to begin")
        write_backends(lb.backends_file, [other])
        sighup(lb)
        lb.wait_for_log("reload applied", 10 * MARGIN)
        # Removed while its stream was in flight:
        assert lb.log_count(f"removing backend {slow.address} (1 requests in flight)") == 1
        sighup(lb)  # a second reload: nothing changed
        lb.wait_for_log("reload: nothing changed", 10 * MARGIN)
        resp = client.response()
    assert resp.status == 200, resp
    assert resp.text.count("chunk ") == 12, resp.text
    assert port_of(get(lb.port, "/after")) == other.port



def test_tcp_tunnel_survives_reload(tcpbackend, balancer):
    """In TCP mode, an open tunnel keeps relaying while a SIGHUP removes its backend; new connections go to the new one, and the removal completes when the tunnel closes."""
    a = tcpbackend("--banner", "{port}")
    b = tcpbackend("--banner", "{port}")
    lb = balancer([a], "--mode", "tcp", "--no-health-checks")
    with connect(lb.port) as tunnel:
        assert read_line(tunnel) == f"{a.port}\n".encode()
        write_backends(lb.backends_file, [b])
        sighup(lb)
        lb.wait_for_log("reload applied", 10 * MARGIN)
        assert lb.log_count(f"removing backend {a.address} (1 requests in flight)") == 1
        with connect(lb.port) as fresh:
            assert read_line(fresh) == f"{b.port}\n".encode()
        tunnel.sendall(b"still here\n")
        assert read_line(tunnel) == b"still here\n"
    lb.wait_for_log(f"backend {a.address} removed", 10 * MARGIN)

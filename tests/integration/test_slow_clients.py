"""
Slow clients against the real ``twistd balancer``: slowloris heads, readers
that never read, connection limits and running out of file descriptors.

No timing is asserted: each test checks that something happens (an answer,
a 408, a closed connection) within a generous bound.  The latencies of the
normal client among the slow ones are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import errno
import resource
import socket
import threading
import time

import pytest

from .httpraw import HOST, RawClient, get
from .support import pid_alive, wait_for

SLOWLORIS = 500
SLOW_READERS = 500
# Far more than the sockets on both sides can hold for a reader that never
# reads, so every slow reader really leaves the balancer blocked.
BIG_BODY = 32 * 1024 * 1024


def _raise_fd_limit(wanted: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE (the balancer inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < 3000:
        pytest.skip(f"the file descriptor limit ({soft}) is too low for this test")


def _connect(port: int, rcvbuf: int | None = None, source: str = HOST) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((source, 0))
        sock.settimeout(10)
        sock.connect((HOST, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _waiting(sock: socket.socket) -> bool:
    """Whether ``sock`` is open with nothing received: no answer, no close."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _closed_by_peer(sock: socket.socket, timeout: float) -> bytes:
    """Read ``sock`` until the peer closes it (EOF or reset); return what came."""
    sock.settimeout(timeout)
    got = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return got
        if not data:
            return got
        got += data


class _Slowloris:
    """
    Connections that send a request head one header byte every
    ``interval`` seconds, from a thread, until stopped.
    """

    def __init__(self, port: int, n: int, interval: float = 2.0):
        self.socks = []
        for _ in range(n):
            sock = _connect(port)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: slowloris\r\nX-Slow: ")
            sock.setblocking(False)
            self.socks.append(sock)
        self.interval = interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        while not self.stopped.wait(self.interval):
            for sock in self.socks:
                try:
                    sock.send(b"a")
                except OSError:
                    pass

    def still_waiting(self) -> int:
        return sum(1 for sock in self.socks if _waiting(sock))

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(10)
        for sock in self.socks:
            sock.close()


def test_normal_client_served_among_slow_clients(backend, balancer):
    """With 500 slowloris and 500 never-reading connections open, a normal client's requests all succeed."""
    _raise_fd_limit(8192)
    b = backend("normal")
    # The head timeout is long enough that the slowloris connections stay
    # open for the whole measurement (their own test is below).
    # The backend (one node process on a shared two-core machine) is busy
    # for a few seconds filling 500 sockets at once: a health timeout long
    # enough that this does not take it out of rotation.
    lb = balancer(
        [b], "--header-timeout", "120", "--client-timeout", "120",
        "--health-timeout", "10", "--fall", "5",
    )
    slowloris = _Slowloris(lb.port, SLOWLORIS)
    readers = []
    try:
        for _ in range(SLOW_READERS):
            sock = _connect(lb.port, rcvbuf=4096)
            sock.sendall(
                b"GET /__big?bytes=%d HTTP/1.1\r\nHost: slowread\r\n\r\n" % (BIG_BODY,)
            )
            readers.append(sock)
        wait_for(
            lambda: b.counts("/__big")["started"] >= SLOW_READERS,
            60,
            "every slow reader's request to reach the backend",
            interval=0.5,
        )
        latencies = []
        for i in range(50):
            started = time.monotonic()
            resp = get(lb.port, f"/normal/{i}", timeout=30)
            latencies.append(time.monotonic() - started)
            assert resp.status == 200, resp
            assert resp.text.startswith("Response from server on port "), resp.text
        # The load was there all along: no slowloris was answered or
        # closed, no slow reader's response finished or was cut.
        assert slowloris.still_waiting() == SLOWLORIS
        counts = b.counts("/__big")
        assert counts["started"] == SLOW_READERS
        assert counts["cancelled"] == 0
        assert lb.log_count("read nothing for") == 0
        latencies.sort()
        print(
            f"\n{SLOWLORIS} slowloris + {SLOW_READERS} slow readers open: 50 GETs, "
            f"median {latencies[25] * 1000:.1f} ms, p90 {latencies[45] * 1000:.1f} ms, "
            f"max {latencies[-1] * 1000:.1f} ms"
        )
    finally:
        slowloris.close()
        for sock in readers:
            sock.close()
    assert pid_alive(lb.pid)


def test_slowloris_gets_408_at_header_timeout(backend, balancer):
    """A head that never ends gets 408 at --header-timeout, long before --client-timeout."""
    b = backend("normal")
    lb = balancer([b], "--header-timeout", "1", "--client-timeout", "300")
    slowloris = _Slowloris(lb.port, 3, interval=0.2)
    try:
        for sock in slowloris.socks:
            sock.setblocking(True)
            got = _closed_by_peer(sock, timeout=60)
            assert got.startswith(b"HTTP/1.1 408 "), got
    finally:
        slowloris.close()
    assert b.counts("/", host="slowloris")["started"] == 0


def test_reader_that_never_reads_is_cut(backend, balancer):
    """A client that reads nothing of a large response is disconnected after --client-timeout and the backend request ends."""
    b = backend("normal")
    lb = balancer([b], "--client-timeout", "1")
    sock = _connect(lb.port, rcvbuf=4096)
    try:
        sock.sendall(b"GET /__big?bytes=%d HTTP/1.1\r\nHost: slowread\r\n\r\n" % (BIG_BODY,))
        wait_for(lambda: b.counts("/__big")["started"] == 1, 30, "the request to arrive")
        lb.wait_for_log("read nothing for", 60)
        # What the client had not read yet, then the reset: not the body.
        assert len(_closed_by_peer(sock, timeout=30)) < BIG_BODY
        wait_for(
            lambda: b.counts("/__big")["cancelled"] == 1,
            30,
            "the backend to see its connection closed",
        )
    finally:
        sock.close()
    assert get(lb.port, "/after").status == 200


def test_max_conns_per_ip(backend, balancer):
    """Beyond --max-conns-per-ip a new connection from that address is closed at once; other addresses are served."""
    b = backend("normal")
    lb = balancer([b], "--max-conns-per-ip", "3")
    held = [_connect(lb.port, source="127.0.0.2") for _ in range(3)]
    try:
        extra = _connect(lb.port, source="127.0.0.2")
        with extra:
            extra.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert _closed_by_peer(extra, timeout=30) == b""
        with RawClient.wrap(_connect(lb.port, source="127.0.0.3")) as other:
            assert other.request("GET", "/").status == 200
        with RawClient.wrap(held[0]) as first:
            assert first.request("GET", "/").status == 200
    finally:
        for sock in held:
            sock.close()
    lb.wait_for_log("over --max-conns-per-ip 3", 10)


def test_max_connections_waits_in_the_listen_queue(backend, balancer):
    """At --max-connections a new connection is not served until an open one closes, and then it is."""
    b = backend("normal")
    lb = balancer([b], "--max-connections", "5", "--header-timeout", "60")
    held = []
    try:
        for i in range(5):
            # A kept-alive request on each: the balancer has admitted it.
            sock = _connect(lb.port)
            held.append(sock)
            sock.sendall(b"GET /held HTTP/1.1\r\nHost: h\r\n\r\n")
            assert _has_data(sock, 30)
            sock.recv(65536)
        lb.wait_for_log("not accepting new ones", 30)
        waiting = _connect(lb.port)  # completes in the kernel's listen queue
        with RawClient.wrap(waiting) as client:
            client.send(b"GET /queued HTTP/1.1\r\nHost: h\r\n\r\n")
            assert not _has_data(waiting, 1.0), "a connection beyond --max-connections was served"
            held.pop().close()
            resp = client.response()
            assert resp.status == 200, resp
    finally:
        for sock in held:
            sock.close()
    assert b.counts("/queued")["started"] == 1


def _has_data(sock: socket.socket, wait: float) -> bool:
    import select

    ready, _, _ = select.select([sock], [], [], wait)
    return bool(ready)


def test_out_of_file_descriptors_is_survived(backend, balancer):
    """A balancer that runs out of file descriptors keeps running and serves again once connections close."""
    b = backend("normal")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The balancer inherits a small limit; this process gets its own back.
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        lb = balancer([b], "--header-timeout", "60")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    socks = []
    try:
        for _ in range(150):
            try:
                socks.append(_connect(lb.port))
            except OSError as e:
                if e.errno not in (errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT):
                    raise
        wait_for(lambda: "EMFILE" in lb.log_text(), 30, "the balancer to run out of fds")
    finally:
        for sock in socks:
            sock.close()
    assert pid_alive(lb.pid)
    resp = wait_for(lambda: _try_get(lb.port), 60, "the balancer to serve again", interval=0.5)
    assert resp.status == 200


def _try_get(port: int):
    try:
        return get(port, "/", timeout=10)
    except OSError:
        return None

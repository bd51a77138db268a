"""
TCP mode over real sockets, with the real twistd and the project's own TCP
backend (tcpbackend.py): bytes intact both ways, a server that speaks
first, rotation, failover, half-close, a backend's reset, PROXY v1 and v2
headers as the backend sees them (TCP and HTTP mode), ip-hash from several
127.x addresses, and PROXY headers accepted from a listed peer only.
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .httpraw import RawClient
from .support import HOST, START_TIMEOUT, free_port, tail

pytestmark = pytest.mark.integration

TCPBACKEND = Path(__file__).resolve().parent / "tcpbackend.py"


class TCPBackend:
    def __init__(self, proc, port, log):
        self.proc, self.port, self.log = proc, port, log

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def __str__(self) -> str:
        # A line of the backends file (support.write_backends).
        return self.address

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def tcpbackend(tmp_path, attach_log):
    """Factory: ``tcpbackend(*switches)`` starts tcpbackend.py on a free port."""
    started = []

    def start(*switches: str) -> TCPBackend:
        log = tmp_path / f"tcpbackend-{len(started)}.log"
        with open(log, "wb") as errors:
            proc = subprocess.Popen(
                [sys.executable, str(TCPBACKEND), "0", *switches],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errors,
            )
        ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
        line = proc.stdout.readline() if ready else b""
        if not line.startswith(b"listening "):
            proc.kill()
            proc.wait()
            raise AssertionError(f"tcpbackend did not start: {tail(log)}")
        b = TCPBackend(proc, int(line.split()[1]), log)
        started.append(b)
        attach_log(f"tcpbackend {switches} on {b.port}", log)
        return b

    yield start
    for b in started:
        b.kill()
        b.proc.stdout.close()


def connect(port: int, source: str = HOST, timeout: float = 15.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect((HOST, port))
    return sock


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_megabyte_echo_intact(tcpbackend, balancer):
    """1 MiB of random bytes comes back unchanged through the relay."""
    echo = tcpbackend()
    lb = balancer([echo], "--mode", "tcp")
    payload = os.urandom(1024 * 1024)
    with connect(lb.port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        back = read_all(sock)
    assert len(back) == len(payload)
    assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()


def test_banner_first(tcpbackend, balancer):
    """A server that speaks first is heard before the client sends a byte."""
    smtp = tcpbackend("--banner", "220 ready on {port}")
    lb = balancer([smtp], "--mode", "tcp")
    with connect(lb.port) as sock:
        assert read_line(sock) == f"220 ready on {smtp.port}\n".encode()
        sock.sendall(b"EHLO x\r\n")
        assert sock.recv(100) == b"EHLO x\r\n"


def test_rotation_and_failover(tcpbackend, balancer):
    """Connections rotate over the backends, and one that is not listening is skipped (no client sees it)."""
    a = tcpbackend("--banner", "{port}")
    b = tcpbackend("--banner", "{port}")
    dead = f"{HOST}:{free_port()}"
    lb = balancer([a, dead, b], "--mode", "tcp", "--no-health-checks")
    seen = []
    for _ in range(6):
        with connect(lb.port) as sock:
            seen.append(int(read_line(sock)))
    # The dead backend's turns go to the next one, so the split is uneven.
    assert set(seen) == {a.port, b.port}, seen


def test_half_close_passed_on(tcpbackend, balancer):
    """The client's half-close reaches the backend, whose answer still comes back."""
    hc = tcpbackend("--half-close")
    lb = balancer([hc], "--mode", "tcp")
    payload = os.urandom(300000)
    with connect(lb.port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        answer = read_all(sock)
    assert (
        answer
        == f"got {len(payload)} sha256 {hashlib.sha256(payload).hexdigest()}\n".encode()
    )


def test_backend_reset_closes_client(tcpbackend, balancer):
    """A backend that resets its connection gets the client's connection closed too."""
    rst = tcpbackend("--abrupt")
    lb = balancer([rst], "--mode", "tcp")
    with connect(lb.port) as sock:
        sock.sendall(b"hello")
        try:
            rest = read_all(sock)
        except ConnectionResetError:
            rest = b""
    assert rest == b""
    lb.wait_for_log("reset the relay", 10)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_header_seen_by_backend(tcpbackend, balancer, version):
    """With --proxy-protocol, the backend reads the client's address and port and the balancer's."""
    seer = tcpbackend("--proxy")
    lb = balancer([seer], "--mode", "tcp", "--proxy-protocol", version)
    with connect(lb.port, source="127.0.0.7") as sock:
        sport = sock.getsockname()[1]
        line = read_line(sock)
        sock.sendall(b"after")
        assert sock.recv(10) == b"after"
    assert line == f"proxy {version} 127.0.0.7 {sport} 127.0.0.1 {lb.port}\n".encode()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_header_http_mode(tcpbackend, balancer, version):
    """In HTTP mode the header names the client, and a backend connection serves one client connection only."""
    seer = tcpbackend("--proxy", "--http")
    lb = balancer([seer], "--proxy-protocol", version)
    bodies = []
    ports = []
    for source in ("127.0.0.8", "127.0.0.9"):
        sock = connect(lb.port, source=source)
        ports.append(sock.getsockname()[1])
        with RawClient.wrap(sock) as client:
            for _ in range(2):
                resp = client.request("GET", "/")
                assert resp.status == 200, resp
                bodies.append(resp.body.decode())
    first = f"proxy {version} 127.0.0.8 {ports[0]} 127.0.0.1 {lb.port}"
    second = f"proxy {version} 127.0.0.9 {ports[1]} 127.0.0.1 {lb.port}"
    assert bodies[0].startswith(first) and bodies[1].startswith(first), bodies
    assert bodies[2].startswith(second) and bodies[3].startswith(second), bodies
    conn = [b.split(" conn ")[1].split()[0] for b in bodies]
    assert conn[0] == conn[1] and conn[2] == conn[3] and conn[0] != conn[2], bodies


def test_ip_hash_by_client_address(tcpbackend, balancer):
    """ip-hash sends every connection from one 127.x address to one backend, and spreads the addresses."""
    backends = [tcpbackend("--banner", "{port}") for _ in range(3)]
    lb = balancer(backends, "--mode", "tcp", "--strategy", "ip-hash")
    chosen = {}
    for i in range(2, 14):
        source = f"127.0.0.{i}"
        for _ in range(3):
            with connect(lb.port, source=source) as sock:
                chosen.setdefault(source, set()).add(int(read_line(sock)))
    assert all(len(ports) == 1 for ports in chosen.values()), chosen
    assert len(set().union(*chosen.values())) >= 2, chosen


def test_accept_proxy_protocol_from_listed_peer(tcpbackend, balancer):
    """A listed peer's header is believed: its address is the one sent on to the backend."""
    seer = tcpbackend("--proxy")
    lb = balancer(
        [seer],
        "--mode",
        "tcp",
        "--proxy-protocol",
        "v2",
        "--accept-proxy-protocol",
        "127.0.0.1/32",
    )
    with connect(lb.port) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.44 10.9.9.9 40404 5432\r\nping")
        line = read_line(sock)
        assert sock.recv(10) == b"ping"
    assert line == b"proxy v2 192.0.2.44 40404 10.9.9.9 5432\n"


def test_accept_proxy_protocol_refusals(tcpbackend, balancer):
    """A listed peer without a header, and an unlisted peer with one, are closed with log lines."""
    echo = tcpbackend()
    lb = balancer([echo], "--mode", "tcp", "--accept-proxy-protocol", "127.0.0.1/32")
    with connect(lb.port) as sock:
        sock.sendall(b"no header here\r\n")
        assert read_all(sock) == b""
    lb.wait_for_log("expected a PROXY protocol header", 10)
    with connect(lb.port, source="127.0.0.2") as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.44 10.9.9.9 40404 5432\r\n")
        try:
            assert read_all(sock) == b""
        except ConnectionResetError:
            pass
    lb.wait_for_log("not in --accept-proxy-protocol", 10)
    with connect(lb.port, source="127.0.0.2") as sock:
        sock.sendall(b"plain bytes")
        assert sock.recv(20) == b"plain bytes"


def test_accept_proxy_protocol_http(backend, balancer):
    """In HTTP mode a listed peer's header address becomes the X-Forwarded-For the backend sees; an unlisted peer's header gets 400."""
    web = backend()
    lb = balancer([web], "--accept-proxy-protocol", "127.0.0.1/32")
    sock = connect(lb.port)
    sock.sendall(b"PROXY TCP4 192.0.2.45 10.9.9.9 40405 80\r\n")
    with RawClient.wrap(sock) as client:
        resp = client.request("GET", "/__echo")
    assert resp.status == 200, resp
    assert "192.0.2.45" in resp.text, resp.text
    sock = connect(lb.port, source="127.0.0.3")
    sock.sendall(
        b"PROXY TCP4 192.0.2.45 10.9.9.9 40405 80\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    answer = read_all(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]


def test_pending_connect_and_timeout(balancer):
    """With every backend refusing, the client is closed and the reason logged."""
    lb = balancer([f"{HOST}:{free_port()}"], "--mode", "tcp", "--no-health-checks")
    # The fixture's own probe connection has already been refused once.
    time.sleep(0)
    with connect(lb.port) as sock:
        assert read_all(sock) == b""
    lb.wait_for_log("no backend could be reached", 10)


def test_tls_listener_relays_plain_tcp(tcpbackend, balancer, tmp_path):
    """A TLS listener in TCP mode terminates TLS and relays the plain bytes (like stunnel)."""
    import ssl

    from test_tls import PKI  # tests/ is on sys.path

    from .support import accepts, wait_for

    spec = PKI(str(tmp_path)).server("db", "db.example")
    echo = tcpbackend("--banner", "plain {port}")
    tls_port = free_port()
    balancer(
        [echo],
        "--mode",
        "tcp",
        "--tls",
        f"{tls_port}:cert={spec.cert}:key={spec.key}:interface={HOST}",
    )
    wait_for(lambda: accepts(tls_port), 10, "the TLS listener")
    ctx = ssl.create_default_context(cafile=spec.cert)
    raw = socket.create_connection((HOST, tls_port), timeout=15)
    with raw, ctx.wrap_socket(raw, server_hostname="db.example") as s:
        assert read_line(s) == f"plain {echo.port}\n".encode()
        payload = os.urandom(200000)
        s.sendall(payload)
        back = b""
        while len(back) < len(payload):
            chunk = s.recv(65536)
            assert chunk, len(back)
            back += chunk
        assert back == payload
        assert s.selected_alpn_protocol() is None


def test_least_conn_counts_open_connections(tcpbackend, balancer):
    """least-conn sends new connections away from a backend holding an open one."""
    a = tcpbackend("--banner", "{port}")
    b = tcpbackend("--banner", "{port}")
    lb = balancer([a, b], "--mode", "tcp", "--strategy", "least-conn")

    def cycle() -> int:
        with connect(lb.port) as sock:
            port = int(read_line(sock))
            # Closed both ways before the next: the balancer has counted
            # this connection out when the end of stream comes back.
            sock.shutdown(socket.SHUT_WR)
            assert read_all(sock) == b""
        return port

    # The fixture's probe connection (connect, close) is relayed too, and
    # counted until its backend has seen it close: let it finish first.
    cycle()
    cycle()
    held = connect(lb.port)
    busy = int(read_line(held))
    (other,) = {a.port, b.port} - {busy}
    try:
        assert [cycle() for _ in range(4)] == [other] * 4
    finally:
        held.close()


def test_idle_tunnel_is_closed(tcpbackend, balancer):
    """A tunnel with no traffic for --tunnel-idle-timeout is closed; the backend stays up."""
    echo = tcpbackend()
    lb = balancer([echo], "--mode", "tcp", "--tunnel-idle-timeout", "1")
    with connect(lb.port, timeout=30) as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        assert read_all(sock) == b""
    lb.wait_for_log("tunnel idle", 10)
    with connect(lb.port) as sock:
        sock.sendall(b"again")
        assert sock.recv(5) == b"again"


def test_sigterm_drains_then_closes_tunnels(tcpbackend, balancer):
    """On SIGTERM an open tunnel is closed after --drain-timeout and the balancer exits 0."""
    echo = tcpbackend()
    lb = balancer([echo], "--mode", "tcp", "--drain-timeout", "1")
    with connect(lb.port, timeout=30) as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        lb.proc.send_signal(signal.SIGTERM)
        assert read_all(sock) == b""
    assert lb.proc.wait(15) == 0


def test_accept_proxy_protocol_v2(tcpbackend, balancer):
    """A v2 header from a listed peer is read as well as a v1 one."""
    import struct

    seer = tcpbackend("--proxy")
    lb = balancer(
        [seer],
        "--mode",
        "tcp",
        "--proxy-protocol",
        "v1",
        "--accept-proxy-protocol",
        "127.0.0.0/8",
    )
    header = (
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11"
        + struct.pack("!H", 12)
        + socket.inet_aton("203.0.113.9")
        + socket.inet_aton("10.1.2.3")
        + struct.pack("!HH", 1111, 2222)
    )
    with connect(lb.port, source="127.0.0.5") as sock:
        sock.sendall(header + b"ok")
        line = read_line(sock)
        assert sock.recv(2) == b"ok"
    assert line == b"proxy v1 203.0.113.9 1111 10.1.2.3 2222\n"


def test_admin_counts_tcp_connections_and_bytes(tcpbackend, balancer):
    """The admin server's /status and /metrics count each backend's TCP-mode connections and bytes both ways."""
    from .admin_support import admin
    from .support import accepts, wait_for

    echo = tcpbackend()
    port = free_port()
    lb = balancer([echo], "--mode", "tcp", "--admin", f"tcp:{port}:interface={HOST}")
    wait_for(lambda: accepts(port), START_TIMEOUT, "the admin server")

    def counters():
        (b,) = admin(port, "GET", "/status").json()["pools"]["default"]["backends"]
        return b

    # The fixture's readiness probe was a connection too: count from here.
    before = wait_for(lambda: (lambda b: b if b["in_flight"] == 0 else None)(counters()),
                      10, "the probe's connection to end")
    payload = b"x" * 10000
    for _ in range(3):
        with connect(lb.port) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            assert read_all(sock) == payload

    seen = []

    def counted():
        b = counters()
        seen.append(b)
        done = b["connections"] - before["connections"] == 3
        return b if done and b["bytes_in"] - before["bytes_in"] == 30000 else None

    try:
        b = wait_for(counted, 10, "the counters")
    except AssertionError:
        raise AssertionError(f"the last /status said {seen[-1:]}") from None
    assert b["bytes_out"] - before["bytes_out"] == 30000
    assert before["bytes_in"] == before["bytes_out"] == 0
    metrics = admin(port, "GET", "/metrics").text
    label = f'backend="{echo.address}",pool="default"'
    assert f"txbalancer_backend_connections_total{{{label}}} {b['connections']:.1f}" in metrics
    assert f"txbalancer_backend_sent_bytes_total{{{label}}} 30000.0" in metrics
    assert f"txbalancer_backend_received_bytes_total{{{label}}} 30000.0" in metrics

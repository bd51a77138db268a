"""Listeners are Twisted endpoint strings: socket activation (systemd:),
unix sockets, and the txbtls: endpoint serving other Twisted programs."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_tls import PKI  # tests/ is on sys.path (pytest's rootdir-relative import)

from .httpraw import HOST, RawClient
from .support import (
    START_TIMEOUT,
    accepts,
    free_port,
    start_twistd,
    stop_process,
    tail,
    twistd_command,
    write_backends,
)

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.rst"

# Run a command as systemd would with one inherited socket: the socket as
# file descriptor 3, LISTEN_FDS=1, LISTEN_FDNAMES=http (Twisted wants as
# many names as descriptors) and LISTEN_PID this process (exec keeps it).
SOCKET_ACTIVATE = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "os.dup2(fd, 3)\n"
    "if fd != 3:\n"
    "    os.close(fd)\n"
    "os.environ.update(\n"
    "    LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='http'\n"
    ")\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


@pytest.fixture
def processes():
    """Processes a test started; each is stopped by its PID at teardown."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        stop_process(proc)


def wait_listening(proc, port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not accepts(port):
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{tail(log)}"
        assert time.monotonic() < deadline, f"not listening on {port}:\n{tail(log)}"
        time.sleep(0.05)


def test_systemd_socket_activation(backend, tmp_path, processes):
    """With --port systemd:domain=INET:index=0 the balancer serves on the socket it inherits."""
    be = backend()
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    backends = write_backends(tmp_path / "backends.txt", [be])
    log = tmp_path / "balancer.log"
    args = twistd_command(
        "-n", "--pidfile=", "balancer",
        "--port", "systemd:domain=INET:index=0",
        "--backends", str(backends),
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SOCKET_ACTIVATE, str(listener.fileno()), *args],
            cwd=str(tmp_path),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            pass_fds=(listener.fileno(),),
        )
    processes.append(proc)
    listener.close()  # the balancer holds it now; connections queue until it adopts it
    with RawClient(port, timeout=START_TIMEOUT) as client:
        response = client.request("GET", "/")
    assert response.status == 200, (response, tail(log))
    assert response.text.strip() == f"Response from server on port {be.port}"
    assert proc.poll() is None, tail(log)
    assert stop_process(proc) == 0, tail(log)
    assert "Unhandled" not in tail(log), tail(log)


def test_unix_socket_listener(backend, balancer, tmp_path):
    """With --port unix:PATH the balancer serves HTTP on that unix socket."""
    be = backend()
    path = tmp_path / "lb.sock"
    balancer([be], "--port", f"unix:{path}")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        response = RawClient.wrap(sock).request("GET", "/")
    assert response.status == 200, response
    assert response.text.strip() == f"Response from server on port {be.port}"


def https_get(port: int, caPath: str, path: str = "/") -> tuple[ssl.SSLSocket, bytes]:
    """GET over TLS verified against caPath for the name localhost."""
    context = ssl.create_default_context(cafile=caPath)
    raw = socket.create_connection((HOST, port), timeout=30)
    sock = context.wrap_socket(raw, server_hostname="localhost")
    sock.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return sock, data


def test_twistd_web_over_txbtls(tmp_path, processes):
    """`twistd web --listen txbtls:...` serves files over TLS 1.2+ with the given certificate."""
    pki = PKI(str(tmp_path))
    spec = pki.server("web", "localhost")
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_text("hello over txbtls\n")
    port = free_port()
    log = tmp_path / "web.log"
    proc = start_twistd(
        twistd_command(
            "-n", "--pidfile=", "web", "--path", str(www),
            "--listen", f"txbtls:{port}:cert={spec.cert}:key={spec.key}:interface={HOST}",
        ),
        tmp_path,
        log,
    )
    processes.append(proc)
    wait_listening(proc, port, log)
    sock, data = https_get(port, pki.caPath, "/hello.txt")
    assert sock.version() in ("TLSv1.2", "TLSv1.3")
    assert data.split(b" ", 2)[1] == b"200", data
    assert data.endswith(b"\r\n\r\nhello over txbtls\n"), data


def test_readme_tac_over_txbtls(tmp_path, processes):
    """The .tac example of README.rst's TLS section runs with twistd -ny and serves over TLS."""
    text = README.read_text()
    block = text.split("In a ``.tac`` file::", 1)[1]
    lines = []
    for line in block.splitlines()[1:]:
        if line.strip() and not line.startswith("      "):
            break
        lines.append(line[6:])
    tac = "\n".join(lines).strip() + "\n"
    assert "txbtls:8443:" in tac, tac
    pki = PKI(str(tmp_path))
    spec = pki.server("web", "localhost")
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("<p>from the tac</p>\n")
    port = free_port()
    tac = (
        tac.replace("/srv/www", str(www))
        .replace("txbtls:8443:", f"txbtls:{port}:interface={HOST}:")
        .replace("cert=fullchain.pem", f"cert={spec.cert}")
        .replace("key=privkey.pem", f"key={spec.key}")
    )
    assert not re.search(r"\b8443\b", tac), tac
    (tmp_path / "www.tac").write_text(tac)
    log = tmp_path / "tac.log"
    proc = start_twistd(twistd_command("-ny", "www.tac", "--pidfile="), tmp_path, log)
    processes.append(proc)
    wait_listening(proc, port, log)
    _sock, data = https_get(port, pki.caPath, "/")
    assert data.split(b" ", 2)[1] == b"200", data
    assert data.endswith(b"<p>from the tac</p>\n"), data

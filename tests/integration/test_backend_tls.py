"""TLS to backends: https:// backends are verified (CA, host name), get SNI, and tls_verify=off is possible but logged."""

from __future__ import annotations

import subprocess
import time

import pytest
from test_tls import PKI  # tests/ is on sys.path (pytest's rootdir-relative import)

from .httpraw import get
from .support import accepts, free_port, stop_process

pytestmark = pytest.mark.integration

HTTPS_BACKEND = r"""
const https = require('https'), fs = require('fs');
const [cert, key, port] = process.argv.slice(2);
https.createServer({cert: fs.readFileSync(cert), key: fs.readFileSync(key)}, (req, res) => {
  const body = 'sni=' + (req.socket.servername || '-') + ' proto=' + req.headers['x-forwarded-proto'] + '\n';
  res.writeHead(200, {'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body)});
  res.end(body);
}).listen(+port, '127.0.0.1', () => console.log('listening ' + port));
"""


@pytest.fixture
def https_backend(node, tmp_path):
    """Factory: a Node HTTPS backend serving a certificate issued for ``names``."""
    procs = []
    pki = PKI(str(tmp_path))
    script = tmp_path / "https_backend.js"
    script.write_text(HTTPS_BACKEND)

    def start(*names: str) -> int:
        spec = pki.server(f"backend{len(procs)}", *names)
        port = free_port()
        proc = subprocess.Popen(
            [node, str(script), spec.cert, spec.key, str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        deadline = time.monotonic() + 10
        while not accepts(port):
            assert proc.poll() is None, "https backend exited"
            assert time.monotonic() < deadline, "https backend did not listen"
            time.sleep(0.05)
        return port

    start.pki = pki  # type: ignore[attr-defined]
    yield start
    for proc in procs:
        stop_process(proc)


def test_verified_backend_gets_sni(https_backend, balancer):
    """An https:// backend whose certificate the --backend-ca trusts is reached, with SNI."""
    port = https_backend("localhost")
    lb = balancer([f"https://localhost:{port}"], "--backend-ca", https_backend.pki.caPath)
    response = get(lb.port, "/")
    assert response.status == 200, response
    assert response.body == b"sni=localhost proto=http\n"


def test_untrusted_backend_certificate_is_refused(https_backend, balancer):
    """Without the CA that signed it, the backend's certificate fails verification: 502."""
    port = https_backend("localhost")
    lb = balancer([f"https://localhost:{port}"], "--no-health-checks")
    response = get(lb.port, "/")
    assert response.status == 502, response


def test_wrong_host_name_is_refused(https_backend, balancer):
    """A trusted certificate for another name fails host name verification: 502."""
    port = https_backend("other.example")
    lb = balancer(
        [f"https://localhost:{port}"],
        "--backend-ca", https_backend.pki.caPath,
        "--no-health-checks",
    )
    response = get(lb.port, "/")
    assert response.status == 502, response


def test_tls_verify_off_is_possible_and_logged(https_backend, balancer):
    """tls_verify=off reaches an unverifiable backend, and start-up logs a warning."""
    port = https_backend("other.example")
    lb = balancer([f"https://localhost:{port} tls_verify=off"])
    response = get(lb.port, "/")
    assert response.status == 200, response
    assert "is not verified (tls_verify=off)" in lb.log.read_text()


def test_unreadable_backend_ca_stops_start_up(tmp_path):
    """A --backend-ca file that cannot be read stops start-up with one line naming it."""
    import os
    import sys

    backends = tmp_path / "backends.txt"
    backends.write_text("127.0.0.1:3001\n")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    missing = tmp_path / "nope.pem"
    done = subprocess.run(
        [twistd, "-n", "--pidfile=", "balancer", "--backends", str(backends),
         "--backend-ca", str(missing)],
        capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
    )
    assert done.returncode != 0
    assert f"{missing}: cannot read CA file" in done.stderr

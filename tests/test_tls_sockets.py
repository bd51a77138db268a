"""
Real-socket tests of txbalancer.tls: a tiny protocol behind
tlsServerEndpoint in a subprocess on 127.0.0.1, and clients that are
Python's ssl module, openssl s_client and (when installed) sslyze.

The server answers any bytes with one line,
C{alpn=<protocol> subject=<client certificate subject>}, and closes; on
SIGHUP it reloads its certificates and prints C{RELOADED True|False}.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys

import pytest
from test_tls import PKI, _certPem, _pem

from txbalancer import tls

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUND = 60  # seconds: a bound for a stuck subprocess, never a measurement

SERVER = r"""
import json, signal, sys
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from txbalancer import tls

config = json.loads(sys.argv[1])
serverTLS = tls.ServerTLS(
    [tls.CertSpec(*c) for c in config["certs"]],
    certDir=config.get("certDir"),
    clientCA=config.get("clientCA"),
    clientOptional=config.get("clientOptional", False),
    alpn=[p.encode() for p in config.get("alpn", ["http/1.1"])],
)

class Answer(Protocol):
    def dataReceived(self, data):
        alpn = self.transport.negotiatedProtocol or b"-"
        subject = tls.peerCertificateSubject(self.transport) or b"-"
        self.transport.write(b"alpn=" + alpn + b" subject=" + subject + b"\n")
        self.transport.loseConnection()

def hup(*a):
    reactor.callFromThread(lambda: print("RELOADED", serverTLS.reload(), flush=True))

signal.signal(signal.SIGHUP, hup)
endpoint = tls.tlsServerEndpoint(reactor, 0, "127.0.0.1", serverTLS)

def listening(port):
    print("PORT", port.getHost().port, flush=True)

endpoint.listen(Factory.forProtocol(Answer)).addCallback(listening)
reactor.run()
"""


class Server:
    def __init__(self, config: dict) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, json.dumps(config)],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        line = self.proc.stdout.readline()
        assert line.startswith("PORT "), line
        self.port = int(line.split()[1])

    def reload(self) -> bool:
        self.proc.send_signal(signal.SIGHUP)
        line = self.proc.stdout.readline()
        assert line.startswith("RELOADED "), line
        return line.split()[1] == "True"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(BOUND)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture
def pki(tmp_path):
    return PKI(str(tmp_path))


@pytest.fixture
def serve():
    servers = []

    def start(**config):
        server = Server(config)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def clientContext(
    caPath=None, minimum=None, maximum=None, ciphers=None, cert=None, alpn=None
):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if caPath:
        ctx.load_verify_locations(caPath)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if minimum is not None:
        ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if cert:
        ctx.load_cert_chain(*cert)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def talk(port, ctx, serverName=None):
    """
    Handshake, send a line, return (the TLS socket's facts, the answer).
    """
    # Two statements, not one parenthesized with: Python 3.9 must parse this.
    raw = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
    with raw, ctx.wrap_socket(raw, server_hostname=serverName) as s:
        facts = {
            "version": s.version(),
            "cipher": s.cipher()[0],
            "cert": s.getpeercert(binary_form=True),
        }
        s.sendall(b"hello\n")
        answer = b""
        while True:
            data = s.recv(4096)
            if not data:
                break
            answer += data
        return facts, answer.decode()


def names(facts) -> list[str]:
    from cryptography import x509

    return tls.certificateNames(x509.load_der_x509_certificate(facts["cert"]))


@pytest.fixture
def basic(pki, serve):
    return pki, serve(certs=[list(pki.server("a", "a.example", rsaKey=True).files())])


def test_tls13(basic):
    """A default client gets TLS 1.3 and a certificate it can verify."""
    pki, server = basic
    facts, answer = talk(server.port, clientContext(pki.caPath), "a.example")
    assert facts["version"] == "TLSv1.3"
    assert answer == "alpn=- subject=-\n"


def test_tls12(basic):
    """A TLS 1.2 client gets an ECDHE AEAD cipher."""
    pki, server = basic
    ctx = clientContext(pki.caPath, maximum=ssl.TLSVersion.TLSv1_2)
    facts, _ = talk(server.port, ctx, "a.example")
    assert facts["version"] == "TLSv1.2"
    assert facts["cipher"].startswith("ECDHE-") and (
        "GCM" in facts["cipher"] or "CHACHA20" in facts["cipher"]
    )


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion")
@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_oldVersionsRefused(basic, version):
    """TLS 1.0 and 1.1 clients are refused with a protocol version alert."""
    _pki, server = basic
    v = getattr(ssl.TLSVersion, version)
    try:
        ctx = clientContext(minimum=v, maximum=v, ciphers="ALL:@SECLEVEL=0")
    except ssl.SSLError as e:  # pragma: no cover - depends on the local OpenSSL
        pytest.skip(f"this Python's OpenSSL cannot offer {version}: {e}")
    with pytest.raises(ssl.SSLError) as e:
        talk(server.port, ctx)
    # The server said no: not a client that could not even try.
    assert "PROTOCOL_VERSION" in str(e.value) or "UNSUPPORTED_PROTOCOL" in str(e.value)


@pytest.mark.parametrize(
    "cipher",
    ["AES128-SHA", "DES-CBC3-SHA", "ECDHE-RSA-AES128-SHA", "AES256-GCM-SHA384",
     "ECDHE-RSA-AES256-SHA384"],
)
def test_weakCiphersRefused(basic, cipher):
    """TLS 1.2 clients offering only weak or RSA-key-exchange ciphers are refused."""
    _pki, server = basic
    try:
        ctx = clientContext(maximum=ssl.TLSVersion.TLSv1_2,
                            ciphers=cipher + ":@SECLEVEL=0")
    except ssl.SSLError as e:  # pragma: no cover - depends on the local OpenSSL
        pytest.skip(f"this Python's OpenSSL cannot offer {cipher}: {e}")
    with pytest.raises(ssl.SSLError) as e:
        talk(server.port, ctx)
    assert "HANDSHAKE_FAILURE" in str(e.value) or "NO_SHARED_CIPHER" in str(e.value)


@pytest.fixture
def sni(pki, serve, tmp_path):
    certDir = tmp_path / "certs"
    certDir.mkdir()
    pki.dir = str(certDir)
    pki.combined("b.pem", "b.example")
    pki.combined("wild.pem", "*.w.example")
    pki.dir = str(tmp_path)
    default = pki.server("default", "default.example")
    return pki, serve(certs=[list(default.files())], certDir=str(certDir))


@pytest.mark.parametrize(
    "name, expected",
    [
        ("b.example", "b.example"),
        ("x.w.example", "*.w.example"),
        ("unknown.example", "default.example"),
        (None, "default.example"),
    ],
)
def test_sni(sni, name, expected):
    """SNI picks the certificate for the name; no or unknown name gets the default."""
    _pki, server = sni
    facts, answer = talk(server.port, clientContext(), name)
    assert names(facts)[0] == expected
    assert answer.startswith("alpn=")


def test_sniVerifiedByName(sni):
    """A verifying client accepts the certificate SNI chose for its name."""
    pki, server = sni
    facts, _ = talk(server.port, clientContext(pki.caPath), "b.example")
    assert names(facts) == ["b.example"]


def _replace(pki, spec, name):
    cert, key = pki.issue(name, (name,))
    with open(spec.cert, "wb") as f:
        f.write(_certPem(cert) + _certPem(pki.caCert))
    with open(spec.key, "wb") as f:
        f.write(_pem(key))


def test_reload(pki, serve):
    """SIGHUP-style reload: new handshakes get the new certificate; a broken
    file keeps the old one."""
    spec = pki.server("a", "old.example")
    server = serve(certs=[list(spec.files())])
    # A connection open across the reload keeps working.
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=BOUND)
    early = clientContext().wrap_socket(raw)
    try:
        _replace(pki, spec, "new.example")
        assert server.reload() is True
        facts, _ = talk(server.port, clientContext())
        assert names(facts) == ["new.example"]
        early.sendall(b"still there?\n")
        assert early.recv(4096).startswith(b"alpn=")
    finally:
        early.close()
    with open(spec.key, "wb") as f:
        f.write(b"-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
    assert server.reload() is False
    facts, _ = talk(server.port, clientContext())
    assert names(facts) == ["new.example"]


def test_alpn(pki, serve):
    """ALPN chooses h2 when configured and offered, else http/1.1."""
    spec = pki.server("a", "a.example")
    h2 = serve(certs=[list(spec.files())], alpn=["h2", "http/1.1"])
    _, answer = talk(h2.port, clientContext(alpn=["http/1.1", "h2"]))
    assert answer.startswith("alpn=h2 ")
    _, answer = talk(h2.port, clientContext(alpn=["http/1.1"]))
    assert answer.startswith("alpn=http/1.1 ")
    h1 = serve(certs=[list(spec.files())])
    _, answer = talk(h1.port, clientContext(alpn=["h2", "http/1.1"]))
    assert answer.startswith("alpn=http/1.1 ")


@pytest.fixture
def clients(pki, tmp_path):
    alice = pki.client("alice", "alice")
    otherDir = tmp_path / "other"
    otherDir.mkdir()
    mallory = PKI(str(otherDir), name="Other CA").client("mallory", "mallory")
    return alice, mallory


def test_mtlsRequired(pki, serve, clients):
    """With a client CA, a verified certificate is required; its subject is
    what the server sees."""
    alice, mallory = clients
    spec = pki.server("a", "a.example")
    server = serve(certs=[list(spec.files())], clientCA=pki.caPath)
    _, answer = talk(server.port, clientContext(cert=alice))
    assert answer == "alpn=- subject=CN=alice,O=txbalancer tests\n"
    for cert in (None, mallory):
        # TLS 1.3 clients learn of the refusal when they read.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            talk(server.port, clientContext(cert=cert))


def test_mtlsOptional(pki, serve, clients):
    """Optional client certificates: none passes without a subject, a
    verified one passes with it, an unverifiable one is refused."""
    alice, mallory = clients
    spec = pki.server("a", "a.example")
    server = serve(certs=[list(spec.files())], clientCA=pki.caPath,
                   clientOptional=True)
    _, answer = talk(server.port, clientContext())
    assert answer == "alpn=- subject=-\n"
    _, answer = talk(server.port, clientContext(cert=alice))
    assert answer == "alpn=- subject=CN=alice,O=txbalancer tests\n"
    with pytest.raises((ssl.SSLError, ConnectionError)):
        talk(server.port, clientContext(cert=mallory))


# -- openssl s_client


def s_client(port, *args):
    result = subprocess.run(
        ["openssl", "s_client", "-ign_eof", "-connect", f"127.0.0.1:{port}", *args],
        input=b"hello\n",
        check=False,
        capture_output=True,
        timeout=BOUND,
    )
    return result.returncode, result.stdout.decode("latin-1")


needsOpenSSL = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl command not installed"
)


@needsOpenSSL
def test_s_client(sni):
    """openssl s_client: TLS 1.2 and 1.3 with SNI work; TLS 1.1 and weak
    ciphers fail."""
    pki, server = sni
    code, out = s_client(server.port, "-tls1_3", "-servername", "b.example",
                         "-CAfile", pki.caPath, "-verify_return_error")
    assert code == 0, out
    assert "Verify return code: 0 (ok)" in out and "CN = b.example" in out
    assert "alpn=" in out
    code, out = s_client(server.port, "-tls1_2", "-servername", "x.w.example")
    assert code == 0 and "TLSv1.2" in out and "CN = *.w.example" in out
    code, out = s_client(server.port, "-tls1_1", "-cipher", "ALL:@SECLEVEL=0")
    assert code != 0
    code, out = s_client(server.port, "-tls1_2", "-cipher", "AES128-SHA:@SECLEVEL=0")
    assert code != 0
    code, out = s_client(server.port, "-tls1_2", "-groups", "P-521")
    assert code != 0
    code, out = s_client(server.port, "-tls1_3", "-groups", "P-384", "-msg")
    if tls.groupsSettable():
        assert code == 0 and "alpn=" in out, out
    else:
        # pyOpenSSL < 25.2 (PyPy 3.9): P-256 is the one group it can offer.
        assert code != 0
        code, out = s_client(server.port, "-tls1_3", "-groups", "P-256", "-msg")
        assert code == 0 and "alpn=" in out, out


# -- sslyze


def _sslyze():
    found = os.environ.get("SSLYZE") or shutil.which("sslyze")
    if not found and os.path.exists("/work/sslyze-venv/bin/sslyze"):
        found = "/work/sslyze-venv/bin/sslyze"
    return found


@pytest.mark.skipif(not _sslyze(), reason="sslyze not installed (set SSLYZE=path)")
@pytest.mark.parametrize("rsaKey", [True, False], ids=["rsa", "ecdsa"])
def test_sslyzeMozillaIntermediate(pki, serve, rsaKey):
    """sslyze finds the listener compliant with Mozilla's intermediate profile."""
    spec = pki.server("a", "a.example", rsaKey=rsaKey)
    server = serve(certs=[list(spec.files())])
    result = subprocess.run(
        [_sslyze(), "--mozilla_config=intermediate", "--certinfo_ca_file", pki.caPath,
         f"a.example:{server.port}{{127.0.0.1}}"],
        capture_output=True,
        check=False,
        timeout=10 * BOUND,
    )
    out = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, out
    verdict = out.split("COMPLIANCE AGAINST")[-1]
    assert "OK - Compliant" in verdict and "Not compliant" not in verdict, out

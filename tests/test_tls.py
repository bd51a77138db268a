"""
Unit tests for txbalancer.tls: parsing listener descriptions, loading and
checking certificates, the context policy, SNI and ALPN selection, reload
and the file watcher.  No sockets: handshakes run over memory BIOs.

The certificate factory here (L{PKI}) is shared with test_tls_sockets.
"""

from __future__ import annotations

import datetime
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from txbalancer import tls
from txbalancer.config import ConfigError
from txbalancer.tls import CertSpec, ServerTLS, TLSConfigError, parseTLSListener

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def _pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certPem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class PKI:
    """
    A throwaway CA in a directory, issuing server and client certificates.
    """

    def __init__(self, directory: str, name: str = "Test CA") -> None:
        self.dir = directory
        self.caKey = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.caCert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.caKey.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.caKey.public_key()),
                False,
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False,
                    key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                True,
            )
            .sign(self.caKey, hashes.SHA256())
        )
        self.caPath = self.write("ca.pem", _certPem(self.caCert))

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def issue(
        self,
        commonName: str,
        sans: tuple[str, ...] = (),
        client: bool = False,
        notAfter: datetime.datetime | None = None,
        rsaKey: bool = False,
    ) -> tuple[x509.Certificate, object]:
        if rsaKey:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "txbalancer tests"),
                    x509.NameAttribute(NameOID.COMMON_NAME, commonName),
                ])
            )
            .issuer_name(self.caCert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - 2 * DAY if notAfter else NOW - DAY)
            .not_valid_after(notAfter or NOW + 10 * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.caKey.public_key()
                ),
                False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH if client
                     else ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                False,
            )
        )
        if sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), False
            )
        return builder.sign(self.caKey, hashes.SHA256()), key

    def server(self, stem: str, *sans: str, **kw) -> CertSpec:
        """
        Write C{stem}.crt (leaf + CA) and C{stem}.key; return their spec.
        """
        cert, key = self.issue(sans[0] if sans else stem, sans, **kw)
        return CertSpec(
            self.write(stem + ".crt", _certPem(cert) + _certPem(self.caCert)),
            self.write(stem + ".key", _pem(key)),
        )

    def combined(self, name: str, *sans: str) -> str:
        """
        Write one C{name} file holding chain and key, as in a cert dir.
        """
        cert, key = self.issue(sans[0], sans)
        return self.write(name, _certPem(cert) + _certPem(self.caCert) + _pem(key))

    def client(self, stem: str, commonName: str) -> tuple[str, str]:
        cert, key = self.issue(commonName, client=True)
        return (
            self.write(stem + ".crt", _certPem(cert)),
            self.write(stem + ".key", _pem(key)),
        )


@pytest.fixture
def pki(tmp_path) -> PKI:
    return PKI(str(tmp_path))


def handshake(
    serverTLS: ServerTLS,
    serverName: bytes | None = None,
    alpn: list[bytes] | None = None,
    clientCert: tuple[str, str] | None = None,
    caPath: str | None = None,
    maxVersion: int | None = None,
    ciphers: bytes | None = None,
):
    """
    Run a handshake between a pyOpenSSL client and C{serverTLS} over memory
    BIOs.  Return C{(client, server)} connections; raises SSL.Error when
    the handshake fails.
    """
    cctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if maxVersion is not None:
        cctx.set_max_proto_version(maxVersion)
    if ciphers is not None:
        cctx.set_cipher_list(ciphers)
    if caPath:
        cctx.load_verify_locations(caPath.encode())
        cctx.set_verify(SSL.VERIFY_PEER)
    if clientCert:
        cctx.use_certificate_file(clientCert[0])
        cctx.use_privatekey_file(clientCert[1])
    if alpn:
        cctx.set_alpn_protos(alpn)
    client = SSL.Connection(cctx, None)
    client.set_connect_state()
    if serverName:
        client.set_tlsext_host_name(serverName)
    server = serverTLS.serverConnectionForTLS(None)
    server.set_accept_state()

    def pump(src: SSL.Connection, dst: SSL.Connection) -> bool:
        moved = False
        while True:
            try:
                data = src.bio_read(65536)
            except SSL.WantReadError:
                break
            if not data:
                break
            dst.bio_write(data)
            moved = True
        return moved

    done = [False, False]
    for _ in range(20):
        for i, conn in enumerate((client, server)):
            if not done[i]:
                try:
                    conn.do_handshake()
                    done[i] = True
                except SSL.WantReadError:
                    pass
        moved = pump(client, server) | pump(server, client)
        if all(done) and not moved:
            break
    if not all(done):
        raise AssertionError("handshake did not complete")
    # TLS 1.3 servers verify client certificates after their own Finished:
    # let the client read the server's verdict.
    try:
        client.recv(1)
    except SSL.WantReadError:
        pass
    except SSL.ZeroReturnError:
        pass
    return client, server


def servedNames(client: SSL.Connection) -> list[str]:
    cert = client.get_peer_certificate(as_cryptography=True)
    return tls.certificateNames(cert)


# -- parsing


def test_parseTwistedForm():
    """The ssl: endpoint form gives port, interface and files."""
    port, iface, spec = parseTLSListener(
        "ssl:8443:privateKey=key.pem:certKey=cert.pem:extraCertChainFile=chain.pem"
        ":interface=127.0.0.1"
    )
    assert (port, iface) == (8443, "127.0.0.1")
    assert spec == CertSpec("cert.pem", "key.pem", "chain.pem")


def test_parseTwistedFormCertKeyDefaultsToPrivateKey():
    """Without certKey the certificate is read from the privateKey file."""
    port, iface, spec = parseTLSListener("ssl:port=443:privateKey=both.pem")
    assert (port, iface, spec) == (443, "", CertSpec("both.pem", "both.pem"))


def test_parseShortForm():
    """The --tls form takes cert=, key=, chain= and interface=."""
    port, iface, spec = parseTLSListener(
        r"8443:cert=fullchain.pem:key=privkey.pem:interface=\:\:1"
    )
    assert (port, iface) == (8443, "::1")
    assert spec == CertSpec("fullchain.pem", "privkey.pem")


def test_parseTxbtlsForm():
    """The txbtls: endpoint string given to --port reads like --tls."""
    port, iface, spec = parseTLSListener(
        "txbtls:8443:cert=fullchain.pem:key=privkey.pem:chain=c.pem:interface=127.0.0.1"
    )
    assert (port, iface) == (8443, "127.0.0.1")
    assert spec == CertSpec("fullchain.pem", "privkey.pem", "c.pem")
    with pytest.raises(TLSConfigError, match=r"--port: .*unknown option\(s\) alpn"):
        parseTLSListener("txbtls:8443:cert=c.pem:key=k.pem:alpn=h2")


def test_parseEscapedColon():
    """A backslash escapes a colon in a path, as in Twisted's strings."""
    _, _, spec = parseTLSListener(r"8443:cert=C\:/certs/a.pem:key=k.pem")
    assert spec.cert == "C:/certs/a.pem"


def test_parseEqualsInValue():
    """A value keeps every "=" after its key's, and a backslash escapes one in a key."""
    _, _, spec = parseTLSListener(r"8443:cert=a=b.pem:key=k.pem")
    assert spec.cert == "a=b.pem"
    with pytest.raises(TLSConfigError, match="unknown option.*x=y"):
        parseTLSListener(r"8443:cert=c.pem:key=k.pem:x\=y=z")


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("ssl:8443:certKey=cert.pem", "privateKey"),
        ("ssl:8443:privateKey=k.pem:sslmethod=TLSv1_METHOD", "sslmethod"),
        ("ssl:privateKey=k.pem", "no port"),
        ("8443:key=k.pem", "cert=FILE"),
        ("8443:cert=c.pem", "key=FILE"),
        ("8443:cert=c.pem:key=k.pem:ciphers=ALL", "ciphers"),
        ("99999:cert=c.pem:key=k.pem", "not a port"),
        ("cert=c.pem:key=k.pem", "PORT"),
        ("8443:cert=a.pem:cert=b.pem:key=k.pem", "--tls: 'cert' given twice"),
        ("ssl:8443:privateKey=a.pem:privateKey=b.pem", "--port: 'privateKey' given twice"),
    ],
)
def test_parseErrors(value, fragment):
    """Malformed listener descriptions say which option is wrong."""
    with pytest.raises(TLSConfigError) as e:
        parseTLSListener(value)
    assert fragment in str(e.value)
    assert isinstance(e.value, ConfigError)


# -- loading and checking


def test_serverTLSProvidesCreator(pki):
    """ServerTLS is an IOpenSSLServerConnectionCreator."""
    from zope.interface.verify import verifyObject

    serverTLS = ServerTLS([pki.server("a", "a.example")])
    assert verifyObject(IOpenSSLServerConnectionCreator, serverTLS)


def test_mismatchedKey(pki):
    """A key that does not belong to the certificate is named."""
    a = pki.server("a", "a.example")
    b = pki.server("b", "b.example")
    with pytest.raises(TLSConfigError) as e:
        ServerTLS([CertSpec(a.cert, b.key)])
    assert b.key in str(e.value) and "does not match" in str(e.value)


def test_expired(pki):
    """An expired certificate is refused, naming its file."""
    spec = pki.server("old", "old.example", notAfter=NOW - DAY)
    with pytest.raises(TLSConfigError) as e:
        ServerTLS([spec])
    assert spec.cert in str(e.value) and "expired" in str(e.value)


def test_unreadable(pki, tmp_path):
    """A missing file is named."""
    spec = pki.server("a", "a.example")
    missing = str(tmp_path / "nope.key")
    with pytest.raises(TLSConfigError) as e:
        ServerTLS([CertSpec(spec.cert, missing)])
    assert missing in str(e.value)


def test_notPEM(pki):
    """A certificate file without a certificate is named."""
    spec = pki.server("a", "a.example")
    junk = pki.write("junk.pem", b"hello\n")
    with pytest.raises(TLSConfigError) as e:
        ServerTLS([CertSpec(junk, spec.key)])
    assert junk in str(e.value)


def test_encryptedKey(pki):
    """An encrypted key is refused with a message saying so."""
    cert, key = pki.issue("e.example", ("e.example",))
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    spec = CertSpec(pki.write("e.crt", _certPem(cert)), pki.write("e.key", encrypted))
    with pytest.raises(TLSConfigError) as e:
        ServerTLS([spec])
    assert spec.key in str(e.value) and "encrypted" in str(e.value)


def test_badClientCA(pki):
    """A client CA file without certificates is named."""
    junk = pki.write("junk.pem", b"nothing here\n")
    with pytest.raises(TLSConfigError) as e:
        ServerTLS([pki.server("a", "a.example")], clientCA=junk)
    assert junk in str(e.value)


def test_certDirNotADirectory(pki, tmp_path):
    """A --tls-cert-dir that is not a directory is named."""
    with pytest.raises(TLSConfigError) as e:
        ServerTLS([], certDir=str(tmp_path / "none"))
    assert "none" in str(e.value)


def test_emptyCertDirAlone(pki, tmp_path):
    """A cert dir without *.pem files and no other certificate is an error."""
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(TLSConfigError):
        ServerTLS([], certDir=str(d))


def test_chainFile(pki):
    """extraCertChainFile certificates are sent after the leaf."""
    cert, key = pki.issue("c.example", ("c.example",))
    spec = CertSpec(
        pki.write("leaf.crt", _certPem(cert)),
        pki.write("leaf.key", _pem(key)),
        pki.write("chain.crt", _certPem(pki.caCert)),
    )
    client, _ = handshake(ServerTLS([spec]), caPath=pki.caPath)
    chain = client.get_peer_cert_chain(as_cryptography=True)
    assert [c.subject for c in chain] == [cert.subject, pki.caCert.subject]


# -- policy


def test_tls13Default(pki):
    """A modern client gets TLS 1.3 and a verified certificate."""
    client, _server = handshake(ServerTLS([pki.server("a", "a.example")]),
                               serverName=b"a.example", caPath=pki.caPath)
    assert client.get_protocol_version_name() == "TLSv1.3"


def test_tls12ServerOrderAEAD(pki):
    """TLS 1.2 uses the server's first ECDHE AEAD cipher the client offers."""
    client, _ = handshake(
        ServerTLS([pki.server("a", "a.example", rsaKey=True)]),
        maxVersion=SSL.TLS1_2_VERSION,
        ciphers=b"ECDHE-RSA-CHACHA20-POLY1305:ECDHE-RSA-AES256-GCM-SHA384:"
                b"ECDHE-RSA-AES128-GCM-SHA256",
    )
    assert client.get_protocol_version_name() == "TLSv1.2"
    assert client.get_cipher_name() == "ECDHE-RSA-AES128-GCM-SHA256"


@pytest.mark.parametrize("cipher", [b"AES128-SHA", b"ECDHE-RSA-AES128-SHA",
                                    b"AES128-GCM-SHA256", b"ECDHE-RSA-AES128-SHA256"])
def test_weakTLS12CiphersRefused(pki, cipher):
    """CBC and RSA key exchange ciphers are refused for TLS 1.2."""
    with pytest.raises(SSL.Error):
        handshake(ServerTLS([pki.server("a", "a.example", rsaKey=True)]),
                  maxVersion=SSL.TLS1_2_VERSION, ciphers=cipher)


def test_contextOptions(pki):
    """Compression, renegotiation and tickets are off; TLS 1.2 at least."""
    ctx = ServerTLS([pki.server("a", "a.example")]).contextFor(None)
    options = ctx.set_options(0)
    for flag in (SSL.OP_NO_COMPRESSION, SSL.OP_NO_RENEGOTIATION, SSL.OP_NO_TICKET,
                 SSL.OP_CIPHER_SERVER_PREFERENCE):
        assert options & flag


def test_groups(pki):
    """The key exchange uses X25519 by default and P-384 when asked."""
    serverTLS = ServerTLS([pki.server("a", "a.example")])
    client, server = handshake(serverTLS)
    from OpenSSL._util import ffi, lib

    if not getattr(lib, "Cryptography_HAS_SSL_GET0_GROUP_NAME", False):
        pytest.skip("this pyOpenSSL cannot report the group")

    def group(conn):
        return ffi.string(lib.SSL_get0_group_name(conn._ssl)).decode()

    assert group(server).lower() in ("x25519",)
    cctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    lib.SSL_CTX_set1_curves_list(cctx._context, b"P-384")
    # secp521r1 only: no overlap, the handshake fails.
    cctx2 = SSL.Context(SSL.TLS_CLIENT_METHOD)
    lib.SSL_CTX_set1_curves_list(cctx2._context, b"P-521")
    for ctx, ok in ((cctx, True), (cctx2, False)):
        client = SSL.Connection(ctx, None)
        client.set_connect_state()
        server = serverTLS.serverConnectionForTLS(None)
        server.set_accept_state()
        failed = False
        for _ in range(10):
            try:
                for conn in (client, server):
                    try:
                        conn.do_handshake()
                    except SSL.WantReadError:
                        pass
                for a, b in ((client, server), (server, client)):
                    try:
                        b.bio_write(a.bio_read(65536))
                    except SSL.WantReadError:
                        pass
            except SSL.Error:
                failed = True
                break
        assert failed is not ok
        if ok:
            assert group(server) in ("secp384r1", "P-384")


# -- SNI


@pytest.fixture
def sniServer(pki, tmp_path):
    certDir = tmp_path / "certs"
    certDir.mkdir()
    pki.dir = str(certDir)
    pki.combined("b.pem", "b.example", "www.b.example")
    pki.combined("wild.pem", "*.w.example")
    pki.write("ignored.txt", b"not a pem")
    pki.dir = str(tmp_path)
    default = pki.server("default", "default.example")
    return ServerTLS([default], certDir=str(certDir))


@pytest.mark.parametrize(
    "name, expected",
    [
        (b"b.example", "b.example"),
        (b"WWW.B.Example", "b.example"),
        (b"b.example.", "b.example"),
        (b"x.w.example", "*.w.example"),
        (b"w.example", "default.example"),
        (b"y.x.w.example", "default.example"),
        (b"unknown.example", "default.example"),
        (None, "default.example"),
    ],
)
def test_sni(sniServer, name, expected):
    """SNI picks the certificate whose SAN covers the name, else the default."""
    client, _ = handshake(sniServer, serverName=name)
    assert servedNames(client)[0] == expected


def test_certificateNamesFallsBackToCN(pki):
    """A certificate without SANs serves its common name."""
    cert, _ = pki.issue("Legacy.Example")
    assert tls.certificateNames(cert) == ["legacy.example"]


# -- ALPN


@pytest.mark.parametrize(
    "configured, offered, expected",
    [
        ((b"h2", b"http/1.1"), [b"http/1.1", b"h2"], b"h2"),
        ((b"h2", b"http/1.1"), [b"http/1.1"], b"http/1.1"),
        ((b"http/1.1",), [b"h2", b"http/1.1"], b"http/1.1"),
        ((b"http/1.1",), [b"h2"], b""),
        ((b"http/1.1",), None, b""),
    ],
)
def test_alpn(pki, configured, offered, expected):
    """ALPN picks the server's preferred protocol the client offers; no
    overlap is not a failed handshake."""
    serverTLS = ServerTLS([pki.server("a", "a.example")], alpn=configured)
    _client, server = handshake(serverTLS, alpn=offered)
    assert server.get_alpn_proto_negotiated() == expected


# -- client certificates


@pytest.fixture
def mtls(pki):
    good = pki.client("alice", "alice")
    otherDir = os.path.join(pki.dir, "other")
    os.mkdir(otherDir)
    other = PKI(otherDir, name="Other CA")
    stranger = other.client("mallory", "mallory")
    return pki, good, stranger


def test_clientCertRequired(mtls):
    """With a client CA, a verified certificate is required."""
    pki, good, stranger = mtls
    serverTLS = ServerTLS([pki.server("a", "a.example")], clientCA=pki.caPath)
    _, server = handshake(serverTLS, clientCert=good)
    subject = server.get_peer_certificate(as_cryptography=True).subject
    assert subject.rfc4514_string() == "CN=alice,O=txbalancer tests"
    for cert in (None, stranger):
        with pytest.raises(SSL.Error):
            handshake(serverTLS, clientCert=cert)


def test_clientCertOptional(mtls):
    """Optional client certificates: none is fine, an unverifiable one is not."""
    pki, good, stranger = mtls
    serverTLS = ServerTLS([pki.server("a", "a.example")], clientCA=pki.caPath,
                          clientOptional=True)
    _, server = handshake(serverTLS)
    assert server.get_peer_certificate() is None
    _, server = handshake(serverTLS, clientCert=good)
    assert server.get_peer_certificate() is not None
    with pytest.raises(SSL.Error):
        handshake(serverTLS, clientCert=stranger)


def test_clientCertAcrossSNI(mtls, tmp_path):
    """Client certificates are required whichever certificate SNI picks."""
    pki, good, _ = mtls
    certDir = tmp_path / "d"
    certDir.mkdir()
    pki.dir = str(certDir)
    pki.combined("b.pem", "b.example")
    pki.dir = str(tmp_path)
    serverTLS = ServerTLS([pki.server("a", "a.example")], certDir=str(certDir),
                          clientCA=pki.caPath)
    with pytest.raises(SSL.Error):
        handshake(serverTLS, serverName=b"b.example")
    client, _ = handshake(serverTLS, serverName=b"b.example", clientCert=good)
    assert servedNames(client) == ["b.example"]


class _FakeTLSTransport:
    def __init__(self, cert):
        self.cert = cert

    def getPeerCertificate(self):
        return self.cert


def test_peerCertificateSubject(mtls):
    """The subject comes out as an RFC 4514 string; none or no TLS is None."""
    pki, good, _ = mtls
    serverTLS = ServerTLS([pki.server("a", "a.example")], clientCA=pki.caPath)
    _, server = handshake(serverTLS, clientCert=good)
    transport = _FakeTLSTransport(server.get_peer_certificate())
    assert tls.peerCertificateSubject(transport) == b"CN=alice,O=txbalancer tests"
    assert tls.peerCertificateSubject(_FakeTLSTransport(None)) is None
    assert tls.peerCertificateSubject(object()) is None


def test_peerCertificateSubjectEscapes(pki):
    """Control and non-ASCII characters in a subject are hex-escaped, so
    the header value stays one safe line."""
    cert, _ = pki.issue("evil\r\nX-Admin: yes \u00e9")
    value = tls.peerCertificateSubject(_FakeTLSTransport(cert))
    assert b"\r" not in value and b"\n" not in value
    assert value == b"CN=evil\\0D\\0AX-Admin: yes \\C3\\A9,O=txbalancer tests"


# -- reload


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _replace(pki: PKI, spec: CertSpec, *sans: str) -> None:
    cert, key = pki.issue(sans[0], sans)
    with open(spec.cert, "wb") as f:
        f.write(_certPem(cert))
    with open(spec.key, "wb") as f:
        f.write(_pem(key))


def test_reloadSwapsForNewHandshakes(pki):
    """After reload new handshakes get the new certificate."""
    spec = pki.server("a", "old.example")
    serverTLS = ServerTLS([spec])
    oldServer = serverTLS.serverConnectionForTLS(None)
    _replace(pki, spec, "new.example")
    assert serverTLS.reload() is True
    client, _ = handshake(serverTLS)
    assert servedNames(client) == ["new.example"]
    # A connection made before keeps its context and certificate.
    old = oldServer.get_certificate(as_cryptography=True)
    assert tls.certificateNames(old) == ["old.example"]


def test_reloadBrokenKeepsOld(pki, logged):
    """A broken new file is logged with its name and the old one stays."""
    spec = pki.server("a", "old.example")
    serverTLS = ServerTLS([spec])
    other = pki.server("b", "b.example")
    with open(spec.key, "wb") as f, open(other.key, "rb") as g:
        f.write(g.read())
    assert serverTLS.reload() is False
    client, _ = handshake(serverTLS)
    assert servedNames(client) == ["old.example"]
    errors = [e for e in logged if e.get("log_level").name == "error"]
    assert len(errors) == 1 and spec.key in errors[0]["error"]


def test_reloadPicksUpNewDirFiles(pki, tmp_path):
    """A file added to the cert dir is served after reload."""
    certDir = tmp_path / "d"
    certDir.mkdir()
    serverTLS = ServerTLS([pki.server("a", "a.example")], certDir=str(certDir))
    client, _ = handshake(serverTLS, serverName=b"n.example")
    assert servedNames(client) == ["a.example"]
    pki.dir = str(certDir)
    pki.combined("n.pem", "n.example")
    assert serverTLS.reload()
    client, _ = handshake(serverTLS, serverName=b"n.example")
    assert servedNames(client) == ["n.example"]


def test_watchReloadsOnChange(pki, logged):
    """The watcher reloads when a file's mtime changes, and only then."""
    spec = pki.server("a", "old.example")
    serverTLS = ServerTLS([spec])
    clock = Clock()
    serverTLS.watch(clock, interval=10.0)
    clock.advance(10)
    client, _ = handshake(serverTLS)
    assert servedNames(client) == ["old.example"]
    _replace(pki, spec, "new.example")
    os.utime(spec.cert, ns=(1, 10**18))
    clock.advance(10)
    client, _ = handshake(serverTLS)
    assert servedNames(client) == ["new.example"]
    reloads = [e for e in logged if "reloaded" in e.get("log_format", "")]
    clock.advance(10)
    assert len([e for e in logged if "reloaded" in e.get("log_format", "")]) == len(reloads)
    serverTLS.stopWatching()
    assert not clock.getDelayedCalls()


def test_watchSurvivesErrors(pki, logged):
    """A broken file or an exception never stops the watcher."""
    spec = pki.server("a", "old.example")
    serverTLS = ServerTLS([spec])
    clock = Clock()
    serverTLS.watch(clock, interval=5.0)
    os.remove(spec.key)
    clock.advance(5)
    assert serverTLS._watcher.running
    serverTLS._stat = lambda: 1 / 0
    clock.advance(5)
    assert serverTLS._watcher.running
    del serverTLS._stat
    _replace(pki, spec, "new.example")
    clock.advance(5)
    client, _ = handshake(serverTLS)
    assert servedNames(client) == ["new.example"]
    serverTLS.stopWatching()


def test_pathsAreAbsolute(pki, monkeypatch, tmp_path):
    """Relative paths are resolved at start, so reload works after a chdir."""
    pki.server("a", "a.example")
    monkeypatch.chdir(pki.dir)
    serverTLS = ServerTLS([CertSpec("a.crt", "a.key")])
    monkeypatch.chdir(tmp_path.parent)
    assert serverTLS.reload()


# -- endpoint


def test_endpointListensWithTLS(pki):
    """tlsServerEndpoint listens on TCP with a TLSMemoryBIOFactory."""
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import MemoryReactor
    from twisted.protocols.tls import TLSMemoryBIOFactory

    reactor = MemoryReactor()
    serverTLS = ServerTLS([pki.server("a", "a.example")])
    endpoint = tls.tlsServerEndpoint(reactor, 8443, "127.0.0.1", serverTLS)
    factory = Factory.forProtocol(Protocol)
    endpoint.listen(factory)
    port, wrapped, _backlog, interface = reactor.tcpServers[0]
    assert (port, interface) == (8443, "127.0.0.1")
    assert isinstance(wrapped, TLSMemoryBIOFactory)
    assert wrapped.wrappedFactory is factory


def _field(path: str) -> str:
    """A file name escaped for an endpoint string."""
    return path.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def test_txbtlsEndpointString(pki):
    """serverFromString("txbtls:...") listens on the port and interface with TLS
    from the given files around the given factory."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import MemoryReactorClock
    from twisted.protocols.tls import TLSMemoryBIOFactory

    spec = pki.server("a", "a.example")
    reactor = MemoryReactorClock()
    endpoint = serverFromString(
        reactor,
        f"txbtls:8443:cert={_field(spec.cert)}:key={_field(spec.key)}"
        r":interface=127.0.0.1:backlog=7",
    )
    factory = Factory.forProtocol(Protocol)
    endpoint.listen(factory)
    port, wrapped, backlog, interface = reactor.tcpServers[0]
    assert (port, interface, backlog) == (8443, "127.0.0.1", 7)
    assert isinstance(wrapped, TLSMemoryBIOFactory)
    assert wrapped.wrappedFactory is factory
    client, server = handshake(endpoint.serverTLS, alpn=[b"h2", b"http/1.1"])
    assert servedNames(client) == ["a.example"]
    assert server.get_alpn_proto_negotiated() == b"http/1.1"
    assert server.get_protocol_version_name() == "TLSv1.3"


def test_txbtlsEndpointStringOptions(pki):
    """txbtls: takes a chain file, an IPv6 interface and the ALPN protocols to offer."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import MemoryReactorClock

    spec = pki.server("a", "a.example")
    chain = pki.write("chain.pem", _certPem(pki.caCert))
    reactor = MemoryReactorClock()
    endpoint = serverFromString(
        reactor,
        f"txbtls:0:cert={_field(spec.cert)}:key={_field(spec.key)}"
        rf":chain={_field(chain)}:interface=\:\:1:alpn=h2,http/1.1",
    )
    endpoint.listen(Factory.forProtocol(Protocol))
    port, _wrapped, backlog, interface = reactor.tcpServers[0]
    assert (port, interface, backlog) == (0, "::1", 50)
    _client, server = handshake(endpoint.serverTLS, alpn=[b"http/1.1", b"h2"])
    assert server.get_alpn_proto_negotiated() == b"h2"


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ("8443:key={key}", "no cert=FILE"),
        ("8443:cert={cert}", "no key=FILE"),
        ("8443:cert={cert}:key={key}:ciphers=ALL", "unknown option(s) ciphers"),
        ("8443:cert={cert}:key={key}:backlog=many", "backlog='many'"),
        ("8443:cert={cert}:key={key}:alpn=h2,,x", "alpn="),
        ("99999:cert={cert}:key={key}", "not a port number"),
        ("cert={cert}:key={key}", "is not PORT:cert=FILE"),
        ("8443:cert={cert}:key={cert}", "no PEM private key"),
        ("8443:cert=/nonexistent.pem:key={key}", "/nonexistent.pem: cannot read"),
    ],
)
def test_txbtlsEndpointStringErrors(pki, fields, fragment):
    """A bad txbtls: string fails when parsed, with a message naming the field or file."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactorClock

    spec = pki.server("a", "a.example")
    value = "txbtls:" + fields.format(cert=_field(spec.cert), key=_field(spec.key))
    with pytest.raises(TLSConfigError) as e:
        serverFromString(MemoryReactorClock(), value)
    assert fragment in str(e.value)


def test_endpointInterfaces(pki):
    """The txbtls: parser, the plugin object Twisted finds and the endpoint provide their interfaces."""
    from twisted.internet.interfaces import (
        IStreamServerEndpoint,
        IStreamServerEndpointStringParser,
    )
    from twisted.internet.testing import MemoryReactorClock
    from twisted.plugin import IPlugin
    from twisted.plugins import txbalancer_endpoints
    from zope.interface.verify import verifyObject

    from txbalancer.tls.endpoint import TLSEndpointParser

    assert verifyObject(IStreamServerEndpointStringParser, TLSEndpointParser())
    assert verifyObject(IStreamServerEndpointStringParser, txbalancer_endpoints.txbtls)
    assert IPlugin.providedBy(txbalancer_endpoints.txbtls)
    spec = pki.server("a", "a.example")
    endpoint = txbalancer_endpoints.txbtls.parseStreamServer(
        MemoryReactorClock(), "8443", cert=spec.cert, key=spec.key
    )
    assert verifyObject(IStreamServerEndpoint, endpoint)

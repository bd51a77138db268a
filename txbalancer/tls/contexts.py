"""
The balancer's TLS at run time: pyOpenSSL contexts, SNI, ALPN, reload.

Twisted's C{ssl:} endpoint cannot choose protocol versions, ciphers, curves,
ALPN protocols or a certificate per server name, and its defaults fail the
Mozilla "intermediate" profile.  L{ServerTLS} builds one context per
certificate with that profile and picks among them by SNI; it is an
L{IOpenSSLServerConnectionCreator}, so it plugs into
C{TLSMemoryBIOFactory(serverTLS, False, factory)} (as
L{txbalancer.tls.endpoint.TLSServerEndpoint} does).

The policy, for every certificate:
    - TLS 1.2 and 1.3 only;
    - for TLS 1.2, Mozilla intermediate ECDHE AEAD ciphers in server order
      (TLS 1.3 suites are all AEAD and left at OpenSSL's defaults);
    - key exchange groups X25519, P-256, P-384;
    - no compression, no renegotiation, no session tickets (sessions resume
      from the server's cache instead, so no long-lived ticket key exists);
    - ALPN: the first of the configured protocols that the client offers;
    - SNI: the certificate whose SAN names match, wildcards matching one
      label; no name or an unknown name gets the first certificate, never a
      failed handshake.

Everything is read and checked (by L{txbalancer.tls.config}) when a
L{ServerTLS} is built; L{ServerTLS.reload} reads it all again and keeps the
old contexts when anything is wrong, and L{ServerTLS.watch} reloads when a
file changes.
"""

from __future__ import annotations

import datetime
import glob
import os
import re
from collections.abc import Sequence
from typing import Any, Callable

from cryptography import x509
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from txbalancer.tls.config import (
    CertSpec,
    LoadedCertificate,
    TLSConfigError,
    certDirSpecs,
    loadCertificate,
    readClientCAs,
)

__all__ = [
    "GROUPS",
    "MOZILLA_INTERMEDIATE_CIPHERS",
    "SESSION_ID_CONTEXT",
    "ServerTLS",
    "peerCertificateSubject",
]

log = Logger()

# Mozilla intermediate (server side TLS guidelines 5.7), TLS 1.2 part,
# without the DHE suites: no DH parameters are configured, so OpenSSL would
# never pick them anyway.
MOZILLA_INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
GROUPS = "X25519:P-256:P-384"
SESSION_ID_CONTEXT = b"txbalancer"


def groupsSettable() -> bool:
    """
    Whether this pyOpenSSL can set the list of key exchange groups.  The
    releases PyPy 3.9 gets (pyOpenSSL < 25.2 on cryptography < 44) cannot:
    there the one curve C{set_tmp_ecdh} allows, P-256, is all that is offered
    (no X25519, no P-384), rather than OpenSSL's wider default list.
    """
    if getattr(SSL.Context, "set_groups", None) is not None:
        return True
    from OpenSSL._util import lib

    return bool(
        getattr(lib, "SSL_CTX_set1_groups_list", None)
        or getattr(lib, "SSL_CTX_set1_curves_list", None)
    )


_warnedGroups = False


def _setGroups(ctx: SSL.Context) -> None:
    global _warnedGroups
    setGroups = getattr(ctx, "set_groups", None)
    if setGroups is not None:
        setGroups(GROUPS.split(":"))
        return
    from OpenSSL._util import lib

    setList = getattr(lib, "SSL_CTX_set1_groups_list", None) or getattr(
        lib, "SSL_CTX_set1_curves_list", None
    )
    if setList is not None:
        if setList(ctx._context, GROUPS.encode("ascii")) != 1:
            raise TLSConfigError(f"OpenSSL refused the groups {GROUPS}")
        return
    from cryptography.hazmat.primitives.asymmetric import ec

    if not _warnedGroups:
        _warnedGroups = True
        log.warn(
            "this pyOpenSSL cannot set key exchange groups: TLS offers P-256 "
            "only, not {groups} (pyOpenSSL 25.2 or later can)",
            groups=GROUPS,
        )
    ctx.set_tmp_ecdh(ec.SECP256R1())
    ctx.set_options(SSL.OP_SINGLE_ECDH_USE)



class _Generation:
    """
    Everything one (re)load produced: a context per certificate and the
    server name table.
    """

    def __init__(self, default: SSL.Context, byName: dict[str, SSL.Context],
                 wildcards: dict[str, SSL.Context], names: list[list[str]]) -> None:
        self.default = default
        self.byName = byName
        self.wildcards = wildcards
        self.names = names

    def contextFor(self, name: str | None) -> SSL.Context:
        if not name:
            return self.default
        name = name.rstrip(".").lower()
        ctx = self.byName.get(name)
        if ctx is not None:
            return ctx
        first, dot, rest = name.partition(".")
        if first and dot:
            ctx = self.wildcards.get(rest)
            if ctx is not None:
                return ctx
        return self.default


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    The server side of TLS for one or more listeners.

    @param certs: the certificates; the first is the default one.
    @param certDir: a directory of C{*.pem} files, each with a chain and
        its key, served by SNI after C{certs}.
    @param clientCA: a CA file: clients must present a certificate it
        issued (or may, with C{clientOptional}).
    @param alpn: the application protocols offered, in preference order.
    """

    def __init__(
        self,
        certs: Sequence[CertSpec],
        certDir: str | None = None,
        clientCA: str | None = None,
        clientOptional: bool = False,
        alpn: Sequence[bytes] = (b"http/1.1",),
        clock: Callable[[], datetime.datetime] | None = None,
    ) -> None:
        self.certs = [
            CertSpec(os.path.abspath(c.cert), os.path.abspath(c.key),
                     os.path.abspath(c.chain) if c.chain else None)
            for c in certs
        ]
        self.certDir = os.path.abspath(certDir) if certDir else None
        self.clientCA = os.path.abspath(clientCA) if clientCA else None
        self.clientOptional = clientOptional
        self.alpn = tuple(alpn)
        self._now = clock or (lambda: datetime.datetime.now(datetime.timezone.utc))
        self._watcher: Any = None
        self._snapshot: dict[str, Any] | None = None
        if not self.certs and not self.certDir:
            raise TLSConfigError("no TLS certificate given")
        self._generation = self._build()

    # -- loading

    def _specs(self) -> list[CertSpec]:
        specs = list(self.certs)
        if self.certDir:
            specs += certDirSpecs(self.certDir)
        if not specs:
            raise TLSConfigError(f"{self.certDir}: no *.pem files (--tls-cert-dir)")
        return specs

    def _build(self) -> _Generation:
        now = self._now()
        loaded = [loadCertificate(spec, now) for spec in self._specs()]
        cas = readClientCAs(self.clientCA) if self.clientCA else None
        contexts = [self._context(item, cas) for item in loaded]
        byName: dict[str, SSL.Context] = {}
        wildcards: dict[str, SSL.Context] = {}
        for item, ctx in zip(loaded, contexts):
            for name in item.names:
                if name.startswith("*."):
                    wildcards.setdefault(name[2:], ctx)
                else:
                    byName.setdefault(name, ctx)
        return _Generation(contexts[0], byName, wildcards, [i.names for i in loaded])

    def _context(self, item: LoadedCertificate, cas: list[Any] | None) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(
            SSL.OP_NO_COMPRESSION
            | SSL.OP_NO_RENEGOTIATION
            | SSL.OP_NO_TICKET
            | SSL.OP_CIPHER_SERVER_PREFERENCE
        )
        try:
            ctx.set_cipher_list(MOZILLA_INTERMEDIATE_CIPHERS.encode("ascii"))
        except SSL.Error as e:
            raise TLSConfigError(f"OpenSSL refused the cipher list: {e}")
        _setGroups(ctx)
        ctx.set_session_id(SESSION_ID_CONTEXT)
        try:
            ctx.use_certificate(item.leaf)
            for extra in item.chain:
                ctx.add_extra_chain_cert(extra)
            ctx.use_privatekey(item.key)
            ctx.check_privatekey()
        except (SSL.Error, TypeError, ValueError) as e:
            raise TLSConfigError(f"{item.label}: OpenSSL refused the certificate: {e}")
        if cas is not None:
            assert self.clientCA is not None
            try:
                ctx.load_verify_locations(self.clientCA.encode("utf-8"))
            except SSL.Error as e:
                raise TLSConfigError(f"{self.clientCA}: unusable CA file: {e}")
            # The CA names sent in the CertificateRequest, so clients know
            # which certificate to offer.
            ctx.load_client_ca(self.clientCA.encode("utf-8"))
            mode = SSL.VERIFY_PEER
            if not self.clientOptional:
                mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
            ctx.set_verify(mode)
        else:
            ctx.set_verify(SSL.VERIFY_NONE)
        ctx.set_tlsext_servername_callback(self._serverName)
        if self.alpn:
            ctx.set_alpn_select_callback(self._selectALPN)
        return ctx

    def reload(self) -> bool:
        """
        Read every file again.  On success new handshakes use the new
        certificates (open connections keep theirs); on any error, log one
        line naming the file and keep the old ones.

        @return: whether the new files were taken.
        """
        try:
            generation = self._build()
        except TLSConfigError as e:
            log.error("TLS reload failed, keeping the old certificates: {error}",
                      error=str(e))
            return False
        except Exception:  # noqa: BLE001
            log.failure("TLS reload failed, keeping the old certificates")
            return False
        self._generation = generation
        log.info("TLS certificates reloaded ({n} certificates)", n=len(generation.names))
        return True

    # -- watching files

    def files(self) -> list[str]:
        """
        Every file the current configuration reads (and the certificate
        directory itself, whose modification time changes as files come
        and go).
        """
        paths = [p for spec in self.certs for p in spec.files()]
        if self.certDir:
            paths.append(self.certDir)
            paths += sorted(glob.glob(os.path.join(self.certDir, "*.pem")))
        if self.clientCA:
            paths.append(self.clientCA)
        return paths

    def _stat(self) -> dict[str, Any]:
        snapshot: dict[str, Any] = {}
        for path in self.files():
            try:
                st = os.stat(path)
            except OSError:
                snapshot[path] = None
            else:
                snapshot[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return snapshot

    def checkFiles(self) -> bool:
        """
        Reload if any file changed since the last check (the first check
        only remembers).  Never raises.

        @return: whether a reload was attempted.
        """
        try:
            snapshot = self._stat()
            previous, self._snapshot = self._snapshot, snapshot
            if previous is None or previous == snapshot:
                return False
            log.info("TLS files changed; reloading")
            self.reload()
            return True
        except Exception:  # noqa: BLE001
            log.failure("checking TLS files for changes")
            return False

    def watch(self, reactor: Any, interval: float = 10.0) -> None:
        """
        Check the files' modification times every C{interval} seconds and
        reload when one changed.
        """
        from twisted.internet.task import LoopingCall

        self.stopWatching()
        self._snapshot = self._stat()
        watcher = LoopingCall(self.checkFiles)
        watcher.clock = reactor
        self._watcher = watcher
        watcher.start(interval, now=False).addErrback(
            lambda f: log.failure("TLS file watcher stopped", f)
        )

    def stopWatching(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher.running:
            watcher.stop()

    # -- handshakes

    @property
    def serverNames(self) -> list[list[str]]:
        """
        The names of each certificate in use, default first.
        """
        return self._generation.names

    def contextFor(self, serverName: str | None) -> SSL.Context:
        """
        The context serving C{serverName} (the default one for L{None} or an
        unknown name).
        """
        return self._generation.contextFor(serverName)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        A new server connection on the default context; SNI may switch it.
        """
        return SSL.Connection(self._generation.default, None)

    def _serverName(self, connection: SSL.Connection) -> None:
        try:
            raw = connection.get_servername()
            name = raw.decode("ascii", "replace") if raw else None
            ctx = self._generation.contextFor(name)
            if ctx is not connection.get_context():
                connection.set_context(ctx)
        except Exception:  # noqa: BLE001
            # Whatever happens, the handshake goes on with the default.
            log.failure("choosing a certificate by server name")

    def _selectALPN(self, connection: SSL.Connection, offered: list[bytes]) -> Any:
        for proto in self.alpn:
            if proto in offered:
                return proto
        return SSL.NO_OVERLAPPING_PROTOCOLS



# -- the client's certificate

_UNSAFE = re.compile(r"[^\x20-\x7e]")


def _escape(text: str) -> str:
    """
    Keep a distinguished name header-safe: RFC 4514 hex escapes for every
    control and non-ASCII character (as UTF-8 bytes).
    """
    return _UNSAFE.sub(
        lambda m: "".join(f"\\{b:02X}" for b in m.group(0).encode("utf-8")), text
    )


def peerCertificateSubject(transport: Any) -> bytes | None:
    """
    The subject of the client's certificate on a TLS transport, as an
    RFC 4514 string (ASCII only, control characters escaped), or L{None}
    when the client sent none or the transport is not TLS.

    The certificate was verified during the handshake: a L{ServerTLS} with
    a client CA asks for one and refuses any it cannot verify, and without
    a client CA none is asked for.
    """
    getPeerCertificate = getattr(transport, "getPeerCertificate", None)
    if getPeerCertificate is None:
        return None
    try:
        cert = getPeerCertificate()
    except Exception:  # noqa: BLE001
        return None
    if cert is None:
        return None
    if not isinstance(cert, x509.Certificate):
        cert = cert.to_cryptography()
    return _escape(cert.subject.rfc4514_string()).encode("ascii")


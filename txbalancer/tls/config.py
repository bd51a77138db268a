"""
TLS configuration: where certificates are, and reading and checking them.

L{parseTLSListener} reads a listener description (C{--tls} or Twisted's
C{ssl:} form) into a port, an interface and a L{CertSpec}.
L{loadCertificate} reads one L{CertSpec}'s files and checks them: a key
that does not match its certificate, an expired certificate, an unreadable
or non-PEM file are L{TLSConfigError}s naming the file.  Nothing here
builds an OpenSSL context or touches the reactor; L{txbalancer.tls.contexts}
turns what is loaded here into contexts.
"""

from __future__ import annotations

import datetime
import glob
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID, NameOID

from txbalancer.config import ConfigError

__all__ = [
    "CertSpec",
    "LoadedCertificate",
    "TLSConfigError",
    "certDirSpecs",
    "certificateNames",
    "loadCertificate",
    "parseTLSListener",
    "readClientCAs",
    "tlsListenerFields",
]

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL
)


class TLSConfigError(ConfigError):
    """
    A TLS setting or file is unusable; the message names the file or option.
    """


class CertSpec:
    """
    Where one certificate lives: C{cert} holds the certificate (and possibly
    its chain after it, as in Let's Encrypt's C{fullchain.pem}), C{key} its
    private key, C{chain} optional further chain certificates.
    """

    __slots__ = ("cert", "chain", "key")

    def __init__(self, cert: str, key: str, chain: str | None = None) -> None:
        self.cert = cert
        self.key = key
        self.chain = chain

    def files(self) -> list[str]:
        return [f for f in (self.cert, self.key, self.chain) if f]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CertSpec):
            return NotImplemented
        return (self.cert, self.key, self.chain) == (other.cert, other.key, other.chain)

    def __hash__(self) -> int:
        return hash((self.cert, self.key, self.chain))

    def __repr__(self) -> str:
        return f"CertSpec(cert={self.cert!r}, key={self.key!r}, chain={self.chain!r})"



# -- parsing listener descriptions

_TWISTED_SSL_KEYS = {"port", "interface", "privateKey", "certKey",
                     "extraCertChainFile", "backlog"}


def _port(value: str, option: str) -> int:
    if not value.isdigit() or int(value) > 65535:
        raise TLSConfigError(f"{option}: {value!r} is not a port number (0-65535)")
    return int(value)



def _splitFields(value: str, option: str) -> tuple[list[str], dict[str, str]]:
    """
    Split a listener description as Twisted splits endpoint strings: fields
    are separated by C{:}, a field C{key=value} (split at its first C{=}) is
    a keyword, and a backslash makes the next character literal (C{\\:} in
    a path, C{\\=} in a name).
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    key: str | None = None
    text: list[str] = []
    chars = iter(value + ":")
    for char in chars:
        if char == "\\":
            text.append(next(chars, ""))
        elif char == "=" and key is None:
            key, text = "".join(text), []
        elif char == ":":
            if key is None:
                args.append("".join(text))
            elif key in kwargs:
                raise TLSConfigError(f"{option}: {key!r} given twice in {value!r}")
            else:
                kwargs[key] = "".join(text)
            key, text = None, []
        else:
            text.append(char)
    return args, kwargs


def parseTLSListener(value: str) -> tuple[int, str, CertSpec]:
    """
    Parse a TLS listener description, in any of its forms::

        8443:cert=fullchain.pem:key=privkey.pem[:chain=chain.pem][:interface=ADDR]
        txbtls:8443:cert=fullchain.pem:key=privkey.pem[:chain=chain.pem][:interface=ADDR]
        ssl:8443:privateKey=key.pem:certKey=cert.pem[:extraCertChainFile=chain.pem][:interface=ADDR]

    The first is C{--tls}; the second the project's endpoint string (see
    L{txbalancer.tls.endpoint}) given to C{--port}; the third Twisted's
    C{ssl:} endpoint (C{certKey} defaults to C{privateKey}, as there).

    @return: C{(port, interface, CertSpec)}; C{interface} is C{""} for all.
    @raise TLSConfigError: naming the option that is wrong.
    """
    value = value.strip()
    prefix = value.split(":", 1)[0].lower()
    option = "--port" if prefix in ("ssl", "txbtls") else "--tls"
    args, kwargs = _splitFields(value, option)
    if prefix == "txbtls":
        return tlsListenerFields(args[1:], kwargs, option, repr(value))
    if option == "--port":
        unknown = set(kwargs) - _TWISTED_SSL_KEYS
        if unknown:
            raise TLSConfigError(
                f"{option}: {value!r}: unsupported option(s) "
                + ", ".join(sorted(unknown))
                + " (txbalancer sets TLS versions, ciphers and curves itself; "
                "accepted: privateKey, certKey, extraCertChainFile, interface)"
            )
        positional = args[1:]
        if len(positional) > 1 or (positional and "port" in kwargs):
            raise TLSConfigError(f"{option}: too many fields in {value!r}")
        port = positional[0] if positional else kwargs.get("port")
        if port is None:
            raise TLSConfigError(f"{option}: {value!r} names no port")
        key = kwargs.get("privateKey")
        if not key:
            raise TLSConfigError(f"{option}: {value!r} has no privateKey=FILE")
        cert = kwargs.get("certKey") or key
        chain = kwargs.get("extraCertChainFile") or None
    else:
        return tlsListenerFields(args, kwargs, option, repr(value))
    return _port(port, option), kwargs.get("interface", ""), CertSpec(cert, key, chain)


def tlsListenerFields(
    args: Sequence[str],
    kwargs: Mapping[str, str],
    option: str,
    shown: str,
    extra: Sequence[str] = (),
) -> tuple[int, str, CertSpec]:
    """
    Check the fields of the C{PORT:cert=FILE:key=FILE[:chain=FILE]
    [:interface=ADDRESS]} form, already split (by L{parseTLSListener} for
    C{--tls}, by Twisted for the C{txbtls:} endpoint string).

    @param option: what errors are about (C{"--tls"}, C{"txbtls"}).
    @param shown: how errors show the whole value.
    @param extra: keywords the caller accepts (and handles) beyond these.
    @return: C{(port, interface, CertSpec)}; C{interface} is C{""} for all.
    """
    accepted = ["cert", "key", "chain", "interface", *extra]
    unknown = set(kwargs) - set(accepted)
    if unknown:
        raise TLSConfigError(
            f"{option}: {shown}: unknown option(s) "
            + ", ".join(sorted(unknown))
            + f" (accepted: {', '.join(accepted)})"
        )
    if len(args) != 1:
        raise TLSConfigError(
            f"{option}: {shown} is not PORT:cert=FILE:key=FILE"
            "[:chain=FILE][:interface=ADDRESS]"
        )
    cert = kwargs.get("cert", "")
    key = kwargs.get("key", "")
    if not cert:
        raise TLSConfigError(f"{option}: {shown} has no cert=FILE")
    if not key:
        raise TLSConfigError(f"{option}: {shown} has no key=FILE")
    spec = CertSpec(cert, key, kwargs.get("chain") or None)
    return _port(args[0], option), kwargs.get("interface", ""), spec



# -- reading and checking files


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"{path}: cannot read: {e.strerror or e}")


def _pemBlocks(data: bytes) -> list[tuple[str, bytes]]:
    return [(m.group(1).decode("ascii"), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


def _certificates(path: str, data: bytes) -> list[x509.Certificate]:
    certs = []
    for kind, block in _pemBlocks(data):
        if kind in ("CERTIFICATE", "TRUSTED CERTIFICATE"):
            try:
                certs.append(x509.load_pem_x509_certificate(block))
            except ValueError as e:
                raise TLSConfigError(f"{path}: malformed certificate: {e}")
    return certs


def _privateKey(path: str, data: bytes) -> Any:
    keys = [block for kind, block in _pemBlocks(data) if kind.endswith("PRIVATE KEY")]
    if not keys:
        raise TLSConfigError(f"{path}: no PEM private key in this file")
    if len(keys) > 1:
        raise TLSConfigError(f"{path}: more than one private key in this file")
    try:
        return serialization.load_pem_private_key(keys[0], password=None)
    except TypeError:
        raise TLSConfigError(f"{path}: the private key is encrypted (give it unencrypted)")
    except Exception as e:  # noqa: BLE001
        raise TLSConfigError(f"{path}: unusable private key: {e}")


def _publicBytes(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def certificateNames(cert: x509.Certificate) -> list[str]:
    """
    The DNS names a certificate serves: its SAN DNS names, or its common
    name when it has no SAN extension; lower case.
    """
    try:
        san = cert.extensions.get_extension_for_oid(
            ExtensionOID.SUBJECT_ALTERNATIVE_NAME
        ).value
    except x509.ExtensionNotFound:
        return [
            str(a.value).lower()
            for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    return [name.lower() for name in san.get_values_for_type(x509.DNSName)]


def _notAfter(cert: x509.Certificate) -> datetime.datetime:
    after = getattr(cert, "not_valid_after_utc", None)
    if after is None:  # cryptography < 42
        after = cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    return after


class LoadedCertificate:
    """
    One certificate, checked and ready: its leaf, chain, key and names.
    """

    def __init__(self, label: str, leaf: Any, chain: list[Any], key: Any) -> None:
        self.label = label
        self.leaf = leaf
        self.chain = chain
        self.key = key
        self.names = certificateNames(leaf)


def loadCertificate(
    spec: CertSpec, now: datetime.datetime | None = None
) -> LoadedCertificate:
    """
    Read and check one certificate: it must be readable, unexpired, and its
    key must match it.

    @raise TLSConfigError: naming the file at fault.
    """
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    certData = _read(spec.cert)
    certs = _certificates(spec.cert, certData)
    if not certs:
        raise TLSConfigError(f"{spec.cert}: no PEM certificate in this file")
    if spec.key == spec.cert:
        keyData = certData
    else:
        keyData = _read(spec.key)
    key = _privateKey(spec.key, keyData)
    chain = certs[1:]
    if spec.chain:
        extra = _certificates(spec.chain, _read(spec.chain))
        if not extra:
            raise TLSConfigError(f"{spec.chain}: no PEM certificate in this file")
        chain += extra
    leaf = certs[0]
    if _publicBytes(key.public_key()) != _publicBytes(leaf.public_key()):
        raise TLSConfigError(
            f"{spec.key}: this private key does not match the certificate in {spec.cert}"
        )
    after = _notAfter(leaf)
    if after < now:
        raise TLSConfigError(
            f"{spec.cert}: the certificate expired on {after:%Y-%m-%d %H:%M:%S} UTC"
        )
    return LoadedCertificate(spec.cert, leaf, chain, key)


def certDirSpecs(certDir: str) -> list[CertSpec]:
    if not os.path.isdir(certDir):
        raise TLSConfigError(f"{certDir}: not a directory (--tls-cert-dir)")
    return [CertSpec(p, p) for p in sorted(glob.glob(os.path.join(certDir, "*.pem")))]



def readClientCAs(path: str) -> list[x509.Certificate]:
    cas = _certificates(path, _read(path))
    if not cas:
        raise TLSConfigError(f"{path}: no PEM certificate in this file (--tls-client-ca)")
    return cas


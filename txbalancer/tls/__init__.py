"""
TLS termination with the balancer's own pyOpenSSL contexts.

One job per module:

L{txbalancer.tls.config}
    Where the certificates are (L{CertSpec}, L{parseTLSListener}) and
    reading and checking their files (L{loadCertificate}); errors are
    L{TLSConfigError}s naming the file.
L{txbalancer.tls.contexts}
    L{ServerTLS}: the contexts (Mozilla intermediate), SNI, ALPN, reload
    and watching the files; L{peerCertificateSubject} for client
    certificates.
L{txbalancer.tls.endpoint}
    L{TLSServerEndpoint}: a TCP endpoint serving TLS from a L{ServerTLS}.
"""

from txbalancer.tls.config import (
    CertSpec,
    TLSConfigError,
    certificateNames,
    loadCertificate,
    parseTLSListener,
)
from txbalancer.tls.contexts import ServerTLS, groupsSettable, peerCertificateSubject
from txbalancer.tls.endpoint import TLSServerEndpoint, tlsServerEndpoint

__all__ = [
    "CertSpec",
    "ServerTLS",
    "TLSConfigError",
    "TLSServerEndpoint",
    "certificateNames",
    "groupsSettable",
    "loadCertificate",
    "parseTLSListener",
    "peerCertificateSubject",
    "tlsServerEndpoint",
]

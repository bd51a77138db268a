"""
The PROXY protocol header the balancer sends first on a backend connection
(HAProxy's proxy-protocol.txt, versions 1 and 2): who the client is, and
where it connected to.

Pure: no reactor, no I/O.  Addresses are anything with C{host} and C{port}
(Twisted's C{IPv4Address} and C{IPv6Address}); any other kind of address
(a UNIX socket, L{None}) gives the header for an unknown origin, which a
backend takes as "use the connection's own addresses".

Reading a header is not done here: listeners use Twisted's parsers
(L{txbalancer.acceptproxy}).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, Optional

__all__ = ["V2_SIGNATURE", "encode", "encodeV1", "encodeV2"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

_V2_PROXY = 0x21  # version 2, command PROXY
_V2_LOCAL = 0x20  # version 2, command LOCAL
_TCP4 = 0x11
_TCP6 = 0x21


def _ip(address: Any) -> Optional[tuple[Any, int]]:
    """
    C{(ip_address, port)} for an IP address with a port, else L{None}.
    """
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if not 0 <= port <= 65535:
        return None
    return ip, port


def _pair(source: Any, destination: Any) -> Optional[tuple[Any, int, Any, int]]:
    """
    Both addresses in one family (an IPv4 one is mapped into IPv6 when the
    other is IPv6), or L{None} when either is not an IP address.
    """
    src, dst = _ip(source), _ip(destination)
    if src is None or dst is None:
        return None
    (sip, sport), (dip, dport) = src, dst
    if sip.version != dip.version:
        if sip.version == 4:
            sip = ipaddress.IPv6Address("::ffff:" + str(sip))
        else:
            dip = ipaddress.IPv6Address("::ffff:" + str(dip))
    elif sip.version == 6:
        # Both IPv6: an IPv4-mapped pair reads better, and is shorter, as v4.
        if sip.ipv4_mapped is not None and dip.ipv4_mapped is not None:
            sip, dip = sip.ipv4_mapped, dip.ipv4_mapped
    return sip, sport, dip, dport


def encodeV1(source: Any, destination: Any) -> bytes:
    """
    The text header: C{PROXY TCP4 SRC DST SPORT DPORT\\r\\n}.
    """
    pair = _pair(source, destination)
    if pair is None:
        # The space is allowed (receivers skip to the CRLF) and needed by
        # Twisted's parser, which the balancer's own listeners use.
        return b"PROXY UNKNOWN \r\n"
    sip, sport, dip, dport = pair
    family = b"TCP4" if sip.version == 4 else b"TCP6"
    return b"PROXY %s %s %s %d %d\r\n" % (
        family,
        str(sip).encode("ascii"),
        str(dip).encode("ascii"),
        sport,
        dport,
    )


def encodeV2(source: Any, destination: Any) -> bytes:
    """
    The binary header: signature, version and command, family, length,
    addresses, ports; no TLVs.
    """
    pair = _pair(source, destination)
    if pair is None:
        return V2_SIGNATURE + struct.pack("!BBH", _V2_LOCAL, 0x00, 0)
    sip, sport, dip, dport = pair
    body = sip.packed + dip.packed + struct.pack("!HH", sport, dport)
    family = _TCP4 if sip.version == 4 else _TCP6
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, family, len(body)) + body


def encode(version: str, source: Any, destination: Any) -> bytes:
    """
    The header of C{version} (C{"v1"} or C{"v2"}) for a client at
    C{source} that connected to C{destination}.
    """
    if version == "v1":
        return encodeV1(source, destination)
    if version == "v2":
        return encodeV2(source, destination)
    raise ValueError(f"unknown PROXY protocol version {version!r}")

"""
Header rules for forwarding: hop-by-hop removal and the X-Forwarded family.

Pure functions over header lists.  A header list is a list of
``(name, value)`` byte-string pairs in the order they arrived, names in the
case the peer sent them; repeated headers stay separate entries.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Sequence

from txbalancer.framing import TOKEN

# Hop-by-hop headers (RFC 9110 section 7.6.1) and their unofficial siblings.
# They describe one connection, never the next one, so they are removed in
# both directions, together with every header a Connection header names.
HOP_BY_HOP = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"proxy-authenticate",
        b"proxy-authorization",
        # RFC 7540 3.2.1: the h2c upgrade's settings, for one connection
        # only (a client may send it without naming it in Connection).
        b"http2-settings",
    ]
)

# Headers the balancer writes itself on the way upstream.  Whatever a client
# sends under these names is dropped (or, from a trusted proxy, folded into
# the new value by forwardedHeaders).
SET_BY_BALANCER = frozenset(
    [
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
        b"x-client-cert-subject",
    ]
)

# Framing headers: the balancer re-frames every message it forwards.
FRAMING = frozenset([b"content-length"])

# Fields HTTP defines as end-to-end (RFC 9110, 9111; Cookie from RFC 6265):
# they are meant for every recipient, so naming one in Connection cannot
# make it a connection option (RFC 9110 7.6.1: "a sender MUST NOT send a
# connection option corresponding to a field that is intended for all
# recipients").  endToEnd never removes these because Connection names
# them: "Connection: Host" must not strip Host, nor "Connection:
# Content-Type" the type of the body.  Framing (Content-Length,
# Transfer-Encoding) is the balancer's own in any case.
NEVER_CONNECTION_OPTIONS = frozenset(
    [
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"content-type",
        b"content-encoding",
        b"content-language",
        b"content-location",
        b"content-range",
        b"authorization",
        b"cookie",
        b"set-cookie",
        b"cache-control",
        b"pragma",
        b"date",
        b"expect",
        b"range",
        b"if-match",
        b"if-none-match",
        b"if-modified-since",
        b"if-unmodified-since",
        b"if-range",
        b"accept",
        b"accept-encoding",
        b"accept-language",
        b"max-forwards",
        b"referer",
        b"user-agent",
        b"from",
        b"location",
        b"etag",
        b"last-modified",
        b"vary",
        b"www-authenticate",
        b"retry-after",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
        b"via",
    ]
)

VIA = b"1.1 txbalancer"


def connectionTokens(values: Iterable[bytes]) -> frozenset[bytes]:
    """
    The lower-cased header names listed in ``Connection`` header values.
    """
    tokens = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return frozenset(tokens)


def endToEnd(
    headers: Sequence[tuple[bytes, bytes]], extraDrop: frozenset[bytes] = frozenset()
) -> list[tuple[bytes, bytes]]:
    """
    The headers of a message without its hop-by-hop headers, without the
    extension headers its Connection header names (never one in
    L{NEVER_CONNECTION_OPTIONS}), without framing headers, and without any
    header named in C{extraDrop}; order is kept.
    """
    kept = []
    named: list[bytes] = []
    drop = _DROP.get(extraDrop)
    if drop is None:
        drop = _DROP[extraDrop] = HOP_BY_HOP | FRAMING | extraDrop
    for header in headers:
        lname = header[0].lower()
        if lname == b"connection":
            named.append(header[1])
        elif lname not in drop:
            kept.append((lname, header))
    if named:
        tokens = connectionTokens(named) - NEVER_CONNECTION_OPTIONS
        return [header for lname, header in kept if lname not in tokens]
    return [header for lname, header in kept]


_DROP: dict[frozenset[bytes], frozenset[bytes]] = {}


def formatForwardedFor(address: str) -> bytes:
    """
    An RFC 7239 C{for=} node: IPv4 bare, IPv6 quoted in brackets.
    """
    if ":" in address:
        return b'for="[' + address.encode("ascii") + b']"'
    return b"for=" + address.encode("ascii")


def _quoteIfNeeded(value: bytes) -> bytes:
    if TOKEN.match(value):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def isTrusted(address: str, trusted: Sequence[ipaddress._BaseNetwork]) -> bool:
    """
    Whether C{address} lies in one of the C{trusted} networks.
    """
    if not trusted:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def forwardedHeaders(
    headers: Sequence[tuple[bytes, bytes]],
    peer: str,
    trustedPeer: bool,
    proto: bytes,
    host: bytes | None,
) -> list[tuple[bytes, bytes]]:
    """
    The X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, Forwarded and
    Via headers to send upstream for a request that arrived from C{peer}.

    From a trusted peer the incoming chains are kept and the peer appended;
    from anyone else they are replaced, so a client cannot spoof its address.
    """
    xff: list[bytes] = []
    fwd: list[bytes] = []
    xfp = xfh = None
    via: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        if lname == b"via":
            via.append(value)
        elif trustedPeer:
            if lname == b"x-forwarded-for":
                xff.append(value)
            elif lname == b"forwarded":
                fwd.append(value)
            elif lname == b"x-forwarded-proto" and xfp is None:
                xfp = value
            elif lname == b"x-forwarded-host" and xfh is None:
                xfh = value
    peerBytes = peer.encode("ascii")
    xff.append(peerBytes)
    element = formatForwardedFor(peer)
    if host is not None:
        element += b";host=" + _quoteIfNeeded(host)
    element += b";proto=" + proto
    fwd.append(element)
    via.append(VIA)
    result = [
        (b"X-Forwarded-For", b", ".join(xff)),
        (b"X-Forwarded-Proto", xfp if xfp is not None else proto),
    ]
    if xfh is not None:
        result.append((b"X-Forwarded-Host", xfh))
    elif host is not None:
        result.append((b"X-Forwarded-Host", host))
    result.append((b"Forwarded", b", ".join(fwd)))
    result.append((b"Via", b", ".join(via)))
    return result


def _forwardedFor(value: bytes) -> list[str]:
    """
    The C{for=} addresses of a Forwarded header value, in order.
    """
    found = []
    for element in value.split(b","):
        for pair in element.split(b";"):
            name, eq, node = pair.strip().partition(b"=")
            if eq and name.strip().lower() == b"for":
                node = node.strip().strip(b'"')
                if node.startswith(b"["):
                    node = node[1:].partition(b"]")[0]
                elif node.count(b":") == 1:
                    node = node.partition(b":")[0]
                found.append(node.decode("latin-1"))
    return found


def normalizeAddress(address: str) -> str:
    """
    An IP address in one canonical text form (IPv4-mapped IPv6 as IPv4), so
    one client always gives one key; anything else unchanged.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def clientAddress(
    headers: Sequence[tuple[bytes, bytes]],
    peer: str,
    trusted: Sequence[ipaddress._BaseNetwork],
) -> str:
    """
    The address of the client a request comes from: the peer, unless the
    peer is a trusted proxy; then the right-most address in
    X-Forwarded-For (or, without it, Forwarded) that is not itself a
    trusted proxy.  Only trusted hops are believed, so a client cannot
    choose its own address by sending the header.
    """
    if not isTrusted(peer, trusted):
        return normalizeAddress(peer)
    chain: list[str] = []
    forwarded: list[str] = []
    for name, value in headers:
        lname = name.lower()
        if lname == b"x-forwarded-for":
            chain.extend(a.strip().decode("latin-1") for a in value.split(b","))
        elif lname == b"forwarded":
            forwarded.extend(_forwardedFor(value))
    for address in reversed(chain or forwarded):
        address = normalizeAddress(address)
        if address and not isTrusted(address, trusted):
            return address
    return normalizeAddress(peer)

"""
Unit tests for L{txbalancer.proxyprotocol}: the v1 and v2 headers the
balancer sends, read back by Twisted's own PROXY protocol parsers; and the
HTTP side: a backend connection opened with a PROXY header is reused only
for the same client connection.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.trial.unittest import SynchronousTestCase

from txbalancer.backend import Backend
from txbalancer.proxyprotocol import encode, encodeV1, encodeV2
from txbalancer.testing import backendSpecs
from txbalancer.upstream import UpstreamPool

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None).map(str)


def parsed(header: bytes, parser):
    info, rest = parser().feed(header + b"tail")
    assert rest == b"tail"
    return info


class RoundTripTests(SynchronousTestCase):
    @given(ipv4, ports, ipv4, ports)
    def test_v1_ipv4(self, s, sp, d, dp) -> None:
        """Twisted's v1 parser reads back the IPv4 addresses and ports encoded."""
        info = parsed(
            encodeV1(IPv4Address("TCP", s, sp), IPv4Address("TCP", d, dp)), V1Parser
        )
        self.assertEqual((info.source.host, info.source.port), (s, sp))
        self.assertEqual((info.destination.host, info.destination.port), (d, dp))

    @given(ipv4, ports, ipv4, ports)
    def test_v2_ipv4(self, s, sp, d, dp) -> None:
        """Twisted's v2 parser reads back the IPv4 addresses and ports encoded."""
        info = parsed(
            encodeV2(IPv4Address("TCP", s, sp), IPv4Address("TCP", d, dp)), V2Parser
        )
        self.assertEqual((info.source.host, info.source.port), (s, sp))
        self.assertEqual((info.destination.host, info.destination.port), (d, dp))

    @given(ipv6, ports, ipv6, ports)
    def test_ipv6_both_versions(self, s, sp, d, dp) -> None:
        """IPv6 addresses survive both encodings (compared as addresses)."""
        import ipaddress

        for encoder, parser in ((encodeV1, V1Parser), (encodeV2, V2Parser)):
            info = parsed(
                encoder(IPv6Address("TCP", s, sp), IPv6Address("TCP", d, dp)), parser
            )
            self.assertEqual(
                ipaddress.ip_address(info.source.host), ipaddress.ip_address(s)
            )
            self.assertEqual(
                ipaddress.ip_address(info.destination.host), ipaddress.ip_address(d)
            )
            self.assertEqual((info.source.port, info.destination.port), (sp, dp))

    def test_v1_exact_text(self) -> None:
        """The v1 header is the documented line."""
        self.assertEqual(
            encodeV1(
                IPv4Address("TCP", "192.0.2.1", 5555),
                IPv4Address("TCP", "10.0.0.1", 443),
            ),
            b"PROXY TCP4 192.0.2.1 10.0.0.1 5555 443\r\n",
        )

    def test_mixed_families_are_mapped(self) -> None:
        """An IPv4 client on an IPv6 listener is sent as an IPv4-mapped IPv6 address."""
        import ipaddress

        header = encodeV1(
            IPv4Address("TCP", "192.0.2.1", 1), IPv6Address("TCP", "::1", 2)
        )
        self.assertTrue(header.startswith(b"PROXY TCP6 "))
        info = parsed(header, V1Parser)
        self.assertEqual(
            ipaddress.ip_address(info.source.host).ipv4_mapped,
            ipaddress.ip_address("192.0.2.1"),
        )

    def test_unknown_origin(self) -> None:
        """A UNIX-socket client gives UNKNOWN (v1) and LOCAL (v2), which the parsers accept."""
        unix = UNIXAddress(b"/run/lb.sock")
        self.assertTrue(encodeV1(unix, unix).startswith(b"PROXY UNKNOWN"))
        self.assertIsNone(parsed(encodeV1(unix, unix), V1Parser).source)
        self.assertIsNone(parsed(encodeV2(unix, unix), V2Parser).source)

    def test_unknown_version(self) -> None:
        """An unknown version is a programming error, not a silent header."""
        with self.assertRaises(ValueError):
            encode("v3", None, None)


class FakeConn:
    def __init__(self, backend, header) -> None:
        self.backend = backend
        self.proxyHeader = header
        self.reused = False
        self.idleSince = 0.0


class UpstreamReuseTests(SynchronousTestCase):
    def test_reuse_only_for_the_same_client(self) -> None:
        """With proxy-protocol, an idle backend connection goes only to requests of the client it was opened for."""
        pool = UpstreamPool(MemoryReactorClock(), proxyProtocol="v1")
        backend = Backend(backendSpecs("127.0.0.1:1")[0])
        alice = pool.proxyHeaderFor(
            (IPv4Address("TCP", "192.0.2.1", 1000), IPv4Address("TCP", "10.0.0.1", 80))
        )
        bob = pool.proxyHeaderFor(
            (IPv4Address("TCP", "192.0.2.1", 1001), IPv4Address("TCP", "10.0.0.1", 80))
        )
        conn = FakeConn(backend, alice)
        pool.release(conn)
        self.assertIsNone(pool.takeIdle(backend, bob))
        self.assertIs(pool.takeIdle(backend, alice), conn)

    def test_no_header_when_off(self) -> None:
        """Without proxy-protocol no header is made."""
        pool = UpstreamPool(MemoryReactorClock())
        self.assertEqual(
            pool.proxyHeaderFor(
                (IPv4Address("TCP", "1.2.3.4", 1), IPv4Address("TCP", "1.2.3.4", 2))
            ),
            b"",
        )

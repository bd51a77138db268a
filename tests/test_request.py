"""
Tests for txbalancer.request: the strict, pure request-head parser.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from txbalancer.request import BadRequest, parseHead

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ParseHeadTests(SynchronousTestCase):
    def parse(self, head: bytes):
        return parseHead(head)

    def refused(self, head: bytes) -> BadRequest:
        try:
            parseHead(head)
        except BadRequest as e:
            return e
        self.fail(f"{head!r} was accepted")

    def test_simple(self) -> None:
        """A simple GET parses into method, target, version, host and headers in order."""
        r = self.parse(b"GET /a?b=%2f&c HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a: 2")
        self.assertEqual((r.method, r.target, r.version), (b"GET", b"/a?b=%2f&c", b"HTTP/1.1"))
        self.assertEqual(r.host, b"h")
        self.assertEqual(r.headers, [(b"Host", b"h"), (b"X-A", b"1"), (b"x-a", b"2")])
        self.assertTrue(r.keepAlive)
        self.assertFalse(r.hasBody)

    def test_bad_request_lines(self) -> None:
        """Malformed request lines are 400."""
        for line in [
            b"GET /",
            b"GET  / HTTP/1.1",
            b"GET / HTTP/1.1 extra",
            b"G(T / HTTP/1.1",
            b" GET / HTTP/1.1",
            b"GET /\x01 HTTP/1.1",
            b"GET / http/1.1",
            b"GET / HTTP/1",
            b"GET foo HTTP/1.1",
            b"GET http://user@h/ HTTP/1.1",
        ]:
            e = self.refused(line + b"\r\nHost: h")
            self.assertEqual(e.status, 400, line)

    def test_http2_is_505(self) -> None:
        """HTTP/2.0 (or 3.0) in a request line is 505."""
        self.assertEqual(self.refused(b"GET / HTTP/2.0\r\nHost: h").status, 505)
        self.assertEqual(self.refused(b"GET / HTTP/3.0\r\nHost: h").status, 505)

    def test_malformed_version_is_400(self) -> None:
        """A version that is not HTTP/digit.digit (HTTP/1.x, HTTP/1.10, HTTP/a.b) is 400, not 505."""
        for version in (b"HTTP/1.x", b"HTTP/x.1", b"HTTP/1.10", b"HTTP/11.1", b"HTTP/1,1",
                        b"HTTP/1.", b"HTTP/.1", b"HTTP/2", b"HTTPS/1.1", b"HTTP/\xb9.1"):
            e = self.refused(b"GET / " + version + b"\r\nHost: h")
            self.assertEqual(e.status, 400, version)
            self.assertEqual(e.reason, "malformed HTTP version")

    def test_unspoken_well_formed_versions_are_505(self) -> None:
        """Well-formed versions other than 1.0 and 1.1 (0.9, 1.2, 2.0, 3.0, 9.9) are 505."""
        for version in (b"HTTP/0.9", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/3.0", b"HTTP/9.9"):
            self.assertEqual(self.refused(b"GET / " + version + b"\r\nHost: h").status, 505)

    def test_missing_host_11(self) -> None:
        """HTTP/1.1 without Host is 400; HTTP/1.0 without Host is fine."""
        self.assertEqual(self.refused(b"GET / HTTP/1.1\r\nX: y").status, 400)
        self.assertIsNone(self.parse(b"GET / HTTP/1.0").host)

    def test_two_hosts(self) -> None:
        """Two Host headers are 400."""
        self.assertEqual(self.refused(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b").status, 400)

    def test_cl_and_te(self) -> None:
        """Content-Length together with Transfer-Encoding is 400."""
        e = self.refused(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"
        )
        self.assertEqual(e.status, 400)

    def test_bad_content_lengths(self) -> None:
        """Conflicting, non-numeric, signed and out-of-range Content-Length values are 400."""
        for values in [
            [b"1", b"2"],
            [b"1, 2"],
            [b"abc"],
            [b"+1"],
            [b"-1"],
            [b"1 1"],
            [b"0x10"],
            [b""],
            [str(2**64).encode()],
            [str(2**63).encode()],
            [b"1" * 40],
        ]:
            head = b"POST / HTTP/1.1\r\nHost: h" + b"".join(
                b"\r\nContent-Length: " + v for v in values
            )
            self.assertEqual(self.refused(head).status, 400, values)

    def test_repeated_equal_content_lengths(self) -> None:
        """Repeated but equal Content-Length values are one length."""
        r = self.parse(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 05\r\nContent-Length: 5")
        self.assertEqual(r.contentLength, 5)

    def test_transfer_codings(self) -> None:
        """Only chunked is accepted: chunked not last is 400, another coding before it 501, TE in 1.0 400."""
        base = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: "
        self.assertTrue(self.parse(base + b"Chunked").chunked)
        self.assertEqual(self.refused(base + b"chunked, gzip").status, 400)
        self.assertEqual(self.refused(base + b"gzip, chunked").status, 501)
        self.assertEqual(self.refused(base + b"identity").status, 400)
        self.assertEqual(
            self.refused(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked").status, 400
        )

    def test_obs_fold(self) -> None:
        """An obs-fold continuation line is 400 and reported as such."""
        for cont in (b" folded", b"\tfolded"):
            e = self.refused(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n" + cont)
            self.assertEqual(e.status, 400)
            self.assertIn("folding", e.reason)

    def test_bad_characters_in_values(self) -> None:
        """NUL, CR, LF and other controls in a header value are 400."""
        for c in (b"\x00", b"\r", b"\n", b"\x1f", b"\x7f"):
            e = self.refused(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a" + c + b"b")
            self.assertEqual(e.status, 400, c)

    def test_bad_header_names(self) -> None:
        """Header names with spaces, empty names and lines without a colon are 400."""
        for line in (b"X A: b", b": b", b"X-A : b", b"no colon here"):
            self.assertEqual(self.refused(b"GET / HTTP/1.1\r\nHost: h\r\n" + line).status, 400)

    def test_header_line_without_colon(self) -> None:
        """A line without a colon (X-No-Colon, a bare Host) is 400 as such, never an empty field."""
        for line in (b"X-No-Colon", b"Host", b"host"):
            e = self.refused(b"GET / HTTP/1.1\r\nHost: h\r\n" + line)
            self.assertEqual((e.status, e.reason), (400, "header line without a colon"), line)
        e = self.refused(b"GET / HTTP/1.0\r\nHost")
        self.assertEqual(e.status, 400)

    def test_connect_any_form_501(self) -> None:
        """CONNECT is 501 whatever its target's form (origin, authority, absolute, *)."""
        for target in (b"/x", b"h:443", b"http://h/", b"*"):
            e = self.refused(b"CONNECT " + target + b" HTTP/1.1\r\nHost: h")
            self.assertEqual(e.status, 501, target)

    def test_too_many_headers(self) -> None:
        """More header lines than maxHeaders is 431."""
        head = b"GET / HTTP/1.1\r\nHost: h" + b"\r\nX: y" * 100
        with self.assertRaises(BadRequest) as cm:
            parseHead(head, maxHeaders=100)
        self.assertEqual(cm.exception.status, 431)

    def test_absolute_form(self) -> None:
        """An absolute-form target becomes origin-form, and its authority replaces Host."""
        r = self.parse(b"GET http://Other:81/p?q HTTP/1.1\r\nHost: h\r\nX: 1")
        self.assertEqual(r.target, b"/p?q")
        self.assertEqual(r.host, b"Other:81")
        self.assertEqual(r.headers, [(b"Host", b"Other:81"), (b"X", b"1")])
        r = self.parse(b"GET http://h2 HTTP/1.1\r\nHost: h")
        self.assertEqual(r.target, b"/")

    def test_options_star(self) -> None:
        """OPTIONS * is accepted, CONNECT is 501."""
        self.assertEqual(self.parse(b"OPTIONS * HTTP/1.1\r\nHost: h").target, b"*")
        self.assertEqual(self.refused(b"CONNECT h:443 HTTP/1.1\r\nHost: h").status, 501)

    def test_keep_alive_rules(self) -> None:
        """1.1 keeps alive unless close; 1.0 only with keep-alive."""
        self.assertTrue(self.parse(b"GET / HTTP/1.1\r\nHost: h").keepAlive)
        self.assertFalse(self.parse(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Close").keepAlive)
        self.assertFalse(self.parse(b"GET / HTTP/1.0").keepAlive)
        self.assertTrue(self.parse(b"GET / HTTP/1.0\r\nConnection: keep-alive").keepAlive)

    def test_expect(self) -> None:
        """Expect: 100-continue is noted; any other expectation is 417."""
        self.assertTrue(
            self.parse(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 1").expectContinue
        )
        self.assertEqual(self.refused(b"GET / HTTP/1.1\r\nHost: h\r\nExpect: tea").status, 417)


class ModuleTests(SynchronousTestCase):
    def test_pure(self) -> None:
        """Importing txbalancer.request (and framing, headers) does not import the reactor."""
        code = (
            "import sys\n"
            "import txbalancer.request, txbalancer.framing, txbalancer.headers\n"
            "bad = [m for m in sys.modules if m == 'twisted.internet.reactor'"
            " or m.startswith('txbalancer.downstream')]\n"
            "print(bad)\n"
            "sys.exit(1 if bad else 0)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_downstream_reexports(self) -> None:
        """The parser's names are still importable from txbalancer.downstream, as the same objects."""
        from txbalancer import downstream, request

        for name in ("Request", "parseHead", "BadRequest"):
            self.assertIs(getattr(downstream, name), getattr(request, name))


class StrictnessTests(SynchronousTestCase):
    def refused(self, head: bytes) -> BadRequest:
        try:
            parseHead(head)
        except BadRequest as e:
            return e
        self.fail(f"{head!r} was accepted")

    def test_underscore_shadows_refused(self) -> None:
        """Framing and X-Forwarded-* names spelled with '_' are 400; other '_' names pass."""
        for name in (b"Transfer_Encoding", b"content_length", b"X_Forwarded_For",
                     b"X_FORWARDED_PROTO", b"x_forwarded_host", b"X_Client_Cert_Subject"):
            e = self.refused(b"GET / HTTP/1.1\r\nHost: h\r\n" + name + b": 1")
            self.assertEqual(e.status, 400, name)
        r = parseHead(b"GET / HTTP/1.1\r\nHost: h\r\nX_Custom: 1")
        self.assertEqual(r.headers[-1], (b"X_Custom", b"1"))

    def test_host_and_authority_syntax(self) -> None:
        """Host and an absolute-form authority must be uri-host[:port]; userinfo, paths, spaces are 400."""
        for host in (b"a b", b"user@h", b"h/x", b"h:8a", b"%zz", b"[::1"):
            self.assertEqual(self.refused(b"GET / HTTP/1.1\r\nHost: " + host).status, 400, host)
            if b"/" not in host:
                self.assertEqual(
                    self.refused(b"GET http://" + host + b"/ HTTP/1.1\r\nHost: h").status,
                    400,
                    host,
                )
        for host in (b"h", b"h:80", b"[::1]:8080", b"1.2.3.4", b"xn--bcher-kva.example", b"a%41", b""):
            self.assertEqual(parseHead(b"GET / HTTP/1.1\r\nHost: " + host).host, host)

    def test_8bit_target_refused(self) -> None:
        """Bytes 0x80-0xff in the request target are 400."""
        for target in (b"/caf\xc3\xa9", b"/?q=\xff", b"/\x80"):
            self.assertEqual(self.refused(b"GET " + target + b" HTTP/1.1\r\nHost: h").status, 400)

    def test_transfer_coding_repeats(self) -> None:
        """chunked twice (in one header or two) is 400; an unknown coding before chunked is 501."""
        base = b"POST / HTTP/1.1\r\nHost: h\r\n"
        self.assertEqual(self.refused(base + b"Transfer-Encoding: chunked, chunked").status, 400)
        self.assertEqual(
            self.refused(base + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked").status, 400
        )
        self.assertEqual(self.refused(base + b"Transfer-Encoding: ,chunked").status, 400)
        self.assertEqual(self.refused(base + b"Transfer-Encoding: br, chunked").status, 501)

"""
Unit tests for txbalancer.h2: HTTP/2 streams proxied by the real balancer
(txbalancer.testing.InMemoryBalancer) to in-memory HTTP/1.1 backends, with
an h2 client state machine on the other side.  No sockets, no real time.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import pytest
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher

from txbalancer.downstream import HTTPServerProtocol
from txbalancer.h2 import H2ProxyConnection, NegotiatingFactory
from txbalancer.testing import FakeTransport, InMemoryBalancer, RecordingHandler

AUTHORITY = b"app.example"


_H2_VERSION = tuple(int(x) for x in h2.__version__.split(".")[:2])


class H2Client:
    """
    An h2 client state machine talking to an L{H2ProxyConnection} over a
    L{FakeTransport}.
    """

    def __init__(
        self,
        balancer: InMemoryBalancer,
        lenient: bool = False,
        serverValidates: bool = True,
        **kw,
    ) -> None:
        """
        @param lenient: the client sends header blocks as given, unchecked
            and unnormalised (to send malformed requests).
        @param serverValidates: whether the server's h2 state machine
            checks inbound headers itself (Twisted's default), or leaves
            every check to the balancer.
        """
        self.balancer = balancer
        self.reactor = balancer.reactor
        self.server = H2ProxyConnection(balancer.factory, balancer.reactor, **kw)
        self.server.conn.config.validate_inbound_headers = serverValidates
        self.transport = FakeTransport()
        self.transport.protocol = self.server
        balancer._transports.append(self.transport)
        self.server.makeConnection(self.transport)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        if lenient:
            config.validate_outbound_headers = False
            config.normalize_outbound_headers = False
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.events: list = []
        self.flush()

    def pump(self) -> None:
        """
        Run the server's sending loop until it has nothing due.  The calls
        are run one at a time (as C{Clock.advance} does, which would never
        return from a loop that keeps rescheduling itself), so a busy loop
        fails the test instead of hanging it.
        """
        reactor = self.reactor
        for _ in range(10000):
            now = reactor.seconds()
            due = [c for c in reactor.getDelayedCalls() if c.getTime() <= now]
            if not due:
                return
            call = min(due, key=lambda c: c.getTime())
            reactor.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)
        raise AssertionError("the server's sending loop never settles")

    def flush(self) -> list:
        """
        Send what the client has queued, let the server answer, read it.
        """
        for _ in range(50):
            out = self.conn.data_to_send()
            if out:
                self.server.dataReceived(out)
            self.pump()
            data = self.transport.value()
            self.transport.clear()
            if data:
                self.events += self.conn.receive_data(data)
            if not out and not data:
                break
        return self.events

    def request(self, method=b"GET", path=b"/", headers=(), body=None, end=True):
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            sid,
            [(b":method", method), (b":path", path), (b":scheme", b"https"),
             (b":authority", AUTHORITY), *headers],
            end_stream=end and body is None,
        )
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end)
        self.flush()
        return sid

    def send(self, headers, body=None, end=True, trailers=None):
        """
        Open a stream with exactly C{headers} (pseudo-headers included),
        then the body in one DATA frame and trailers, if given.
        """
        sid = self.conn.get_next_available_stream_id()
        last = body is None and trailers is None
        self.conn.send_headers(sid, headers, end_stream=end and last)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end and trailers is None)
        if trailers is not None:
            self.conn.send_headers(sid, trailers, end_stream=end)
        self.flush()
        return sid

    def goaway(self):
        """
        The error code of the GOAWAY the server sent, or L{None}.
        """
        ended = [e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)]
        return ended[0].error_code if ended else None

    def status(self, sid):
        """
        The response status on stream C{sid} as an int, or L{None}.
        """
        responses = self.of(sid, h2.events.ResponseReceived)
        return int(dict(responses[0].headers)[b":status"]) if responses else None

    def reset(self, sid):
        """
        The error code the server reset stream C{sid} with, or L{None}.
        """
        resets = self.of(sid, h2.events.StreamReset)
        return resets[0].error_code if resets else None

    def of(self, sid, kind):
        return [e for e in self.events if isinstance(e, kind)
                and getattr(e, "stream_id", sid) == sid]

    def response(self, sid):
        headers = dict(self.of(sid, h2.events.ResponseReceived)[0].headers)
        body = b"".join(e.data for e in self.of(sid, h2.events.DataReceived))
        ended = bool(self.of(sid, h2.events.StreamEnded))
        return headers, body, ended


def request(path=b"/", method=b"GET", authority=AUTHORITY, scheme=b"https"):
    """
    The pseudo-header fields of a request, in the usual order.
    """
    return [(b":method", method), (b":scheme", scheme), (b":authority", authority),
            (b":path", path)]


class LogWatch:
    """
    Collects what is logged while it is installed; L{failures} lists the
    events at level error or critical and those with a traceback.
    """

    def __init__(self, collect: bool = True) -> None:
        """
        @param collect: run the garbage collector on the way out, so that
            unhandled errors in Deferreds (logged when collected) count.
        """
        self.events: list = []
        self.collect = collect

    def __enter__(self) -> LogWatch:
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc) -> None:
        if self.collect:
            gc.collect()
        globalLogPublisher.removeObserver(self.events.append)

    def failures(self) -> list:
        return [
            e for e in self.events
            if e.get("log_failure") is not None
            or e.get("log_level") in (LogLevel.error, LogLevel.critical)
        ]


@pytest.fixture
def balancer():
    return InMemoryBalancer(["127.0.0.1:3001"], secure=True)


def test_getIsProxied(balancer):
    """A GET on a stream reaches the backend as HTTP/1.1 with Host from
    :authority, and the response comes back on the stream."""
    client = H2Client(balancer)
    sid = client.request(path=b"/hello?x=1", headers=[(b"accept", b"*/*")])
    backend = balancer.acceptConnect()
    head = backend.received()
    assert head.startswith(b"GET /hello?x=1 HTTP/1.1\r\nHost: app.example\r\n")
    assert b"accept: */*\r\n" in head
    assert b"X-Forwarded-Proto: https" in head
    backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-App: 1\r\n"
                    b"Connection: keep-alive\r\n\r\nhello")
    client.flush()
    headers, body, ended = client.response(sid)
    assert headers[b":status"] == b"200"
    assert headers[b"x-app"] == b"1" and headers[b"content-length"] == b"5"
    assert b"connection" not in headers
    assert (body, ended) == (b"hello", True)


def test_chunkedResponseStreams(balancer):
    """A chunked backend response arrives as DATA frames, ended once."""
    client = H2Client(balancer)
    sid = client.request()
    backend = balancer.acceptConnect()
    backend.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    client.flush()
    assert client.response(sid)[1:] == (b"abc", False)
    backend.respond(b"2\r\nde\r\n0\r\n\r\n")
    client.flush()
    headers, body, ended = client.response(sid)
    assert (body, ended) == (b"abcde", True)
    assert b"transfer-encoding" not in headers


def test_postWithLength(balancer):
    """A body with content-length is forwarded with Content-Length."""
    client = H2Client(balancer)
    sid = client.request(b"POST", b"/up", [(b"content-length", b"4")], body=b"data")
    backend = balancer.acceptConnect()
    sent = backend.received()
    assert b"Content-Length: 4\r\n\r\ndata" in sent
    backend.respond(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    client.flush()
    assert client.response(sid)[0][b":status"] == b"201"


def test_postWithoutLengthIsChunked(balancer):
    """A body of unknown length goes to the backend chunked."""
    client = H2Client(balancer)
    client.request(b"POST", b"/up", body=b"abc", end=False)
    backend = balancer.acceptConnect()
    sid = 1
    client.conn.send_data(sid, b"de", end_stream=True)
    client.flush()
    sent = backend.received()
    assert b"Transfer-Encoding: chunked\r\n" in sent
    assert sent.endswith(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")


def test_emptyPostHasLengthZero(balancer):
    """A POST whose HEADERS end the stream is sent with Content-Length: 0."""
    client = H2Client(balancer)
    client.request(b"POST", b"/x")
    assert b"Content-Length: 0\r\n" in balancer.acceptConnect().received()


def test_cookiesJoined(balancer):
    """HTTP/2 cookie crumbs become one Cookie header (RFC 9113 8.2.3)."""
    handler = RecordingHandler()
    balancer.factory.handler = handler
    client = H2Client(balancer)
    client.request(headers=[(b"cookie", b"a=1"), (b"cookie", b"b=2")])
    request = handler.exchanges[0].request
    assert (b"cookie", b"a=1; b=2") in request.headers
    assert request.version == b"HTTP/2" and request.secure
    assert request.host == AUTHORITY and request.peer == "203.0.113.7"


def test_unreachableBackend502(balancer):
    """Failures are answered on the stream like on HTTP/1.1."""
    client = H2Client(balancer)
    sid = client.request()
    balancer.failConnect()
    client.flush()
    headers, body, ended = client.response(sid)
    assert headers[b":status"] == b"502"
    assert headers[b"content-type"].startswith(b"text/plain")
    assert ended and b"could be reached" in body


def test_headHasNoBody(balancer):
    """A HEAD response keeps content-length and sends no DATA."""
    client = H2Client(balancer)
    sid = client.request(b"HEAD")
    backend = balancer.acceptConnect()
    backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    client.flush()
    headers, body, ended = client.response(sid)
    assert headers[b"content-length"] == b"10" and body == b"" and ended


def test_clientResetCancelsBackend(balancer):
    """A stream reset by the client aborts its backend request."""
    client = H2Client(balancer)
    sid = client.request()
    backend = balancer.acceptConnect()
    client.conn.reset_stream(sid)
    client.flush()
    balancer.flush()
    assert backend.closed
    # The connection itself keeps serving.
    sid2 = client.request()
    assert balancer.acceptConnect().received().startswith(b"GET / HTTP/1.1")
    assert sid2 == 3


def test_dataAfterResponseIgnored(balancer):
    """Body data for a stream we already answered does not break the
    connection (Twisted looks streams up unchecked)."""
    balancer.factory.maxBodySize = 2
    client = H2Client(balancer)
    sid = client.request(b"POST", b"/", [(b"content-length", b"6")], body=b"abc",
                         end=False)
    headers, _, ended = client.response(sid)
    assert headers[b":status"] == b"413" and ended
    client.conn.send_data(sid, b"def", end_stream=True)
    client.flush()
    assert not client.transport.disconnecting
    sid2 = client.request()
    assert balancer.acceptConnect().received().startswith(b"GET / HTTP/1.1")
    assert sid2 == 3


def test_contentLengthTooLarge(balancer):
    """A declared body over --max-body-size is 413 before any backend."""
    balancer.factory.maxBodySize = 10
    client = H2Client(balancer)
    sid = client.request(b"PUT", b"/", [(b"content-length", b"11")], body=b"x" * 11)
    assert client.response(sid)[0][b":status"] == b"413"
    assert not balancer.pendingConnects()


def test_connectIsRefused(balancer):
    """Extended CONNECT and other malformed requests never reach a backend."""
    client = H2Client(balancer)
    # Some h2 releases (4.3) refuse to send a CONNECT without :path; the
    # client here sends it as written, it is the server that is under test.
    client.conn.config.validate_outbound_headers = False
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, [(b":method", b"CONNECT"),
                                   (b":authority", b"x:443")], end_stream=True)
    client.flush()
    if _H2_VERSION[:2] == (4, 3):
        # h2 4.3 (the newest for PyPy's Python 3.9) itself refuses a CONNECT
        # without :path, before the balancer sees it: GOAWAY PROTOCOL_ERROR.
        goaways = [e for e in client.events
                   if isinstance(e, h2.events.ConnectionTerminated)]
        assert goaways[0].error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    else:
        assert client.response(sid)[0][b":status"] == b"501"
    assert not balancer.pendingConnects()


def test_expectContinueFromBackend(balancer):
    """100-continue is relayed when the backend sends it, not before."""
    client = H2Client(balancer)
    sid = client.request(b"POST", b"/", [(b"content-length", b"2"),
                                         (b"expect", b"100-continue")], end=False)
    assert not client.of(sid, h2.events.InformationalResponseReceived)
    backend = balancer.acceptConnect()
    backend.respond(b"HTTP/1.1 100 Continue\r\n\r\n")
    client.flush()
    info = client.of(sid, h2.events.InformationalResponseReceived)
    assert dict(info[0].headers)[b":status"] == b"100"


def test_rapidReset(balancer):
    """Past maxResets resets within the window, GOAWAY ENHANCE_YOUR_CALM and
    the connection closes; every backend attempt is cancelled."""
    client = H2Client(balancer, maxResets=10, resetWindow=10.0)
    for _ in range(11):
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, [(b":method", b"GET"), (b":path", b"/"),
                                       (b":scheme", b"https"),
                                       (b":authority", AUTHORITY)], end_stream=True)
        client.conn.reset_stream(sid)
    client.flush()
    goaways = [e for e in client.events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaways and goaways[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert client.transport.disconnecting
    # Unregistered, or a TLS transport would never finish closing.
    assert client.transport.producer is None
    assert balancer.factory.counters["h2_rapid_reset"] == 1
    balancer.flush()
    assert balancer.forwarder.inFlight == 0
    assert client.server not in balancer.factory.connections


def test_resetsSpreadOutAreFine(balancer):
    """Resets below the rate limit leave the connection open."""
    client = H2Client(balancer, maxResets=5, resetWindow=10.0)
    for _ in range(12):
        sid = client.request()
        client.conn.reset_stream(sid)
        client.flush()
        balancer.reactor.advance(3)
    assert not client.transport.disconnecting


def test_backpressureOnRequestBody(balancer):
    """While the exchange pauses reading, the stream's window is not
    reopened, so the client must stop sending."""
    handler = RecordingHandler()
    balancer.factory.handler = handler
    client = H2Client(balancer)
    sid = client.request(b"POST", b"/", body=b"a" * 1000, end=False)
    exchange = handler.exchanges[0]
    server = exchange.server
    server.pauseReading("upstream")
    for _ in range(4):
        client.conn.send_data(sid, b"b" * 10000)
    client.flush()
    # What the client may still send on this stream: nothing was given back.
    assert client.conn.local_flow_control_window(sid) == 65535 - 41000
    assert exchange.body == b"a" * 1000
    server.resumeReading("upstream")
    client.flush()
    assert exchange.body == b"a" * 1000 + b"b" * 40000
    assert client.conn.local_flow_control_window(sid) == 65535


def test_pausedStreamDoesNotStallOthers(balancer):
    """A paused upload holds its own window only: other streams still flow."""
    handler = RecordingHandler()
    balancer.factory.handler = handler
    client = H2Client(balancer)
    first = client.request(b"POST", b"/", end=False)
    handler.exchanges[0].server.pauseReading("upstream")
    for _ in range(4):
        client.conn.send_data(first, b"x" * 16000)
    client.flush()
    assert client.conn.local_flow_control_window(first) < 2000
    second = client.request(b"POST", b"/", body=b"y" * 16000, end=False)
    client.conn.send_data(second, b"y" * 16000, end_stream=True)
    client.flush()
    assert handler.exchanges[1].body == b"y" * 32000
    assert handler.exchanges[1].complete


def frames(data: bytes) -> list:
    """
    Raw frames in C{data} (h2's client state machine stops reading after a
    GOAWAY, so a graceful one is checked frame by frame).
    """
    from hyperframe.frame import Frame

    out = []
    while data:
        frame, length = Frame.parse_frame_header(data[:9])
        frame.parse_body(memoryview(data[9 : 9 + length]))
        out.append(frame)
        data = data[9 + length :]
    return out


def test_drainSendsGoAway(balancer):
    """A graceful stop sends GOAWAY, lets the open stream finish, then closes."""
    negotiating = NegotiatingFactory(balancer.factory, balancer.reactor)
    client = H2Client(balancer)
    sid = client.request()
    idle = H2Client(balancer)
    backend = balancer.acceptConnect()
    done = []
    negotiating.drain(30).addCallback(done.append)
    assert idle.transport.disconnecting
    client.pump()
    (goaway,) = frames(client.transport.value())
    assert goaway.type == 0x7 and goaway.error_code == 0
    assert goaway.last_stream_id == sid
    assert not client.transport.disconnecting
    client.transport.clear()
    backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    client.pump()
    sent = frames(client.transport.value())
    assert [f.type for f in sent] == [0x1, 0x0, 0x0]  # HEADERS, DATA, END
    assert sent[1].data == b"ok" and "END_STREAM" in sent[2].flags
    assert client.transport.disconnecting
    assert client.transport.producer is None
    balancer.flush()
    assert done == [None]


def test_idleTimeout(balancer):
    """An idle HTTP/2 connection is closed after the client timeout."""
    client = H2Client(balancer)
    balancer.reactor.advance(balancer.factory.clientTimeout + 1)
    assert client.transport.disconnecting


# -- the negotiator


class _TLSLike(StringTransport):
    def __init__(self, negotiated):
        StringTransport.__init__(self)
        self.negotiatedProtocol = negotiated
        self.wrappedProtocol = None
        self.producer = None


@pytest.mark.parametrize("negotiated, kind", [
    (b"h2", H2ProxyConnection),
    (b"http/1.1", HTTPServerProtocol),
    (None, HTTPServerProtocol),
])
def test_negotiator(balancer, negotiated, kind):
    """The protocol follows ALPN, and takes the negotiator's place."""
    factory = NegotiatingFactory(balancer.factory, balancer.reactor)
    negotiator = factory.buildProtocol(None)
    transport = _TLSLike(negotiated)
    transport.wrappedProtocol = negotiator
    negotiator.makeConnection(transport)
    if negotiated == b"h2":
        c = h2.connection.H2Connection()
        c.initiate_connection()
        data = c.data_to_send()
    else:
        data = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    negotiator.dataReceived(data)
    assert isinstance(transport.wrappedProtocol, kind)
    assert transport.wrappedProtocol in balancer.factory.connections
    if kind is H2ProxyConnection:
        assert transport.producer is transport.wrappedProtocol
    else:
        assert balancer.pendingConnects()


def test_negotiatorTimesOutSilentClients(balancer):
    """A connection that never completes a handshake is aborted after the
    client timeout."""
    factory = NegotiatingFactory(balancer.factory, balancer.reactor)
    negotiator = factory.buildProtocol(None)
    transport = _TLSLike(None)
    negotiator.makeConnection(transport)
    balancer.reactor.advance(balancer.factory.clientTimeout)
    assert transport.disconnecting


# -- real sockets: curl --http2 and h2load through TLS to a tiny backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUND = 120  # seconds: a bound for a stuck subprocess, never a measurement

BALANCER = r"""
import json, sys
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import resource, server

from txbalancer import tls
from txbalancer.choosers import RoundRobin
from txbalancer.downstream import HTTPServerFactory
from txbalancer.h2 import NegotiatingFactory
from txbalancer.pool import BackendPool
from txbalancer.proxy import Forwarder
from txbalancer.testing import backendSpecs
from txbalancer.upstream import UpstreamPool

config = json.loads(sys.argv[1])
from twisted.logger import globalLogBeginner, textFileLogObserver
globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)],
                                  redirectStandardIO=False)

class App(resource.Resource):
    isLeaf = True
    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        return b"hello " + request.getHeader(b"x-forwarded-proto") + b" " + request.uri
    def render_POST(self, request):
        return b"got %d bytes" % (len(request.content.read()),)

def backendUp(port):
    backendPort = port.getHost().port
    pool = BackendPool(backendSpecs("127.0.0.1:%d" % backendPort), RoundRobin())
    forwarder = Forwarder(pool, UpstreamPool(reactor), reactor)
    http = HTTPServerFactory(forwarder, reactor, secure=True)
    serverTLS = tls.ServerTLS([tls.CertSpec(*config["cert"])],
                              alpn=(b"h2", b"http/1.1"))
    endpoint = tls.tlsServerEndpoint(reactor, 0, "127.0.0.1", serverTLS)
    d = endpoint.listen(NegotiatingFactory(http, reactor))
    d.addCallback(lambda p: print("PORT", p.getHost().port, flush=True))

TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
    server.Site(App())).addCallback(backendUp)
reactor.run()
"""


@pytest.fixture
def h2server(tmp_path):
    from test_tls import PKI

    pki = PKI(str(tmp_path))
    spec = pki.server("a", "a.example")
    proc = subprocess.Popen(
        [sys.executable, "-c", BALANCER, json.dumps({"cert": [spec.cert, spec.key]})],
        stdout=subprocess.PIPE,
        # The balancer's log, for tests that look for errors in it.
        stderr=open(tmp_path / "balancer.log", "wb"),  # noqa: SIM115
        env=dict(os.environ, PYTHONPATH=ROOT),
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("PORT "), line
        yield int(line.split()[1]), pki.caPath
    finally:
        proc.terminate()
        try:
            proc.wait(BOUND)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _curl(port, ca, *args):
    return subprocess.run(
        ["curl", "-sS", "--cacert", ca, "--resolve", f"a.example:{port}:127.0.0.1",
         *args],
        capture_output=True, timeout=BOUND, check=False,
    )


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curlHttp2(h2server):
    """curl --http2 negotiates h2 and gets the backend's answer; an HTTP/1.1
    client on the same port still works."""
    port, ca = h2server
    url = f"https://a.example:{port}/path?q=1"
    result = _curl(port, ca, "--http2", "-w", "\n%{http_version} %{http_code}", url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello https /path?q=1\n2 200"
    result = _curl(port, ca, "--http1.1", "-w", "\n%{http_version}", url)
    assert result.stdout == b"hello https /path?q=1\n1.1"
    result = _curl(port, ca, "--http2", "--data-binary", "@-", "-w", " %{http_version}",
                   f"https://a.example:{port}/up")
    assert result.returncode == 0, result.stderr


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curlHttp2Upload(h2server, tmp_path):
    """A 1 MB upload over h2 streams through to the backend."""
    port, ca = h2server
    body = tmp_path / "body"
    body.write_bytes(b"z" * 1_000_000)
    result = _curl(port, ca, "--http2", "--data-binary", f"@{body}",
                   f"https://a.example:{port}/up")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"got 1000000 bytes"


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("h2load") is None,
                    reason="h2load not installed (Debian: nghttp2-client)")
def test_h2load(h2server):
    """h2load: 2000 requests over 4 connections, 10 streams each, all 2xx."""
    port, _ = h2server
    result = subprocess.run(
        ["h2load", "-n", "2000", "-c", "4", "-m", "10",
         f"https://127.0.0.1:{port}/load"],
        capture_output=True, timeout=BOUND, check=False,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out
    assert "Application protocol: h2" in out
    assert "2000 succeeded, 0 failed, 0 errored" in out, out
    assert "status codes: 2000 2xx" in out, out


@pytest.mark.integration
def test_rapidResetOverTLS(h2server):
    """A client that opens and resets streams in a burst gets GOAWAY
    ENHANCE_YOUR_CALM and is disconnected; the server keeps serving."""
    import socket
    import ssl

    port, ca = h2server
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["h2"])
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    for _ in range(150):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(b":method", b"GET"), (b":path", b"/"),
                                (b":scheme", b"https"), (b":authority", b"a.example")],
                          end_stream=True)
        conn.reset_stream(sid)
    events = []
    raw = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
    with raw, ctx.wrap_socket(raw, server_hostname="a.example") as s:
        assert s.selected_alpn_protocol() == "h2"
        s.sendall(conn.data_to_send())
        while True:
            try:
                data = s.recv(65536)
            except (ConnectionError, ssl.SSLError):
                break
            if not data:
                break
            try:
                events += conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                break
    goaways = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaways and goaways[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    result = _curl(port, ca, "--http2", f"https://a.example:{port}/after")
    assert result.stdout == b"hello https /after"


def _exchange(sock, conn, events, done):
    """
    Send what C{conn} has queued and read into C{events} until C{done()}
    (bounded by the socket timeout and a count of reads).
    """
    sock.sendall(conn.data_to_send())
    for _ in range(1000):
        if done():
            return
        data = sock.recv(65536)
        assert data, "the balancer closed the connection"
        events += conn.receive_data(data)
        sock.sendall(conn.data_to_send())
    raise AssertionError("no answer")


@pytest.mark.integration
def test_validationAndNegativeWindowOverTLS(h2server, tmp_path):
    """Over real TLS: the issue's :method reproduction gets 400, a window
    made negative by lowered settings completes once raised again, and the
    balancer logs no traceback."""
    import socket
    import ssl

    from h2.settings import SettingCodes

    port, ca = h2server
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["h2"])
    config = h2.config.H2Configuration(client_side=True, header_encoding=None)
    config.validate_outbound_headers = False
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 100})
    events: list = []

    def of(sid, kind):
        return [e for e in events if isinstance(e, kind)
                and getattr(e, "stream_id", None) == sid]

    def data(sid):
        return b"".join(e.data for e in of(sid, h2.events.DataReceived))

    def head(method, path):
        return [(b":method", method), (b":scheme", b"https"),
                (b":authority", b"a.example"), (b":path", path)]

    raw = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
    with raw, ctx.wrap_socket(raw, server_hostname="a.example") as s:
        assert s.selected_alpn_protocol() == "h2"
        conn.send_headers(1, head(b"GET /admin HTTP/1.1", b"/public"), end_stream=True)
        _exchange(s, conn, events, lambda: of(1, h2.events.StreamEnded))
        assert dict(of(1, h2.events.ResponseReceived)[0].headers)[b":status"] == b"400"

        path = b"/" + b"x" * 400
        conn.send_headers(3, head(b"GET", path), end_stream=True)
        _exchange(s, conn, events, lambda: len(data(3)) >= 100)
        acked = len([e for e in events if isinstance(e, h2.events.SettingsAcknowledged)])
        conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})
        _exchange(s, conn, events, lambda: len(
            [e for e in events if isinstance(e, h2.events.SettingsAcknowledged)]) > acked)
        assert len(data(3)) == 100
        conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 65535})
        _exchange(s, conn, events, lambda: of(3, h2.events.StreamEnded))
        assert data(3) == b"hello https " + path

        conn.send_headers(5, head(b"GET", b"/after"), end_stream=True)
        _exchange(s, conn, events, lambda: of(5, h2.events.StreamEnded))
        assert data(5) == b"hello https /after"
    log = (tmp_path / "balancer.log").read_text()
    assert "refused HTTP/2 request" in log  # the log is really read
    assert "Traceback" not in log and "Unhandled" not in log, log


class _StubStreamServer:
    """What _WriteDeadline sees of an H2StreamServer."""

    def __init__(self, reactor, timeout):
        class Factory:
            clientTimeout = timeout
            counters: dict = {}

        class Connection:
            peer = "192.0.2.9"
            factory = Factory()

        class StreamRequest:
            lost = False

            def connectionLost(self, reason):
                self.lost = True

        class Stream:
            _request = StreamRequest()

        self.connection = Connection()
        self.connection._reactor = reactor
        self.stream = Stream()
        self.streamID = 1
        self.aborted = False
        self.active = True

    def _active(self):
        return self.active

    def abortResponse(self):
        self.aborted = True


class _Producer:
    def __init__(self):
        self.calls = []

    def pauseProducing(self):
        self.calls.append("pause")

    def resumeProducing(self):
        self.calls.append("resume")

    def stopProducing(self):
        self.calls.append("stop")


def test_writeDeadlineResetsStalledStream():
    """A stream paused (its window shut) for --client-timeout is reset and its
    exchange told the client is gone; the producer is paused meanwhile."""
    from twisted.internet.task import Clock

    from txbalancer.h2 import _WriteDeadline

    clock = Clock()
    server = _StubStreamServer(clock, 5)
    producer = _Producer()
    guard = _WriteDeadline(producer, server)
    guard.pauseProducing()
    assert producer.calls == ["pause"]
    clock.advance(4.9)
    assert not server.aborted
    clock.advance(0.2)
    assert server.aborted and server.stream._request.lost
    assert server.connection.factory.counters["write_timeout"] == 1


def test_writeDeadlineCancelledByWindowUpdate():
    """A stream whose window opens again within --client-timeout is not reset,
    however often it is paused."""
    from twisted.internet.task import Clock

    from txbalancer.h2 import _WriteDeadline

    clock = Clock()
    server = _StubStreamServer(clock, 5)
    producer = _Producer()
    guard = _WriteDeadline(producer, server)
    for _ in range(10):
        guard.pauseProducing()
        clock.advance(4)
        guard.resumeProducing()
    assert not server.aborted
    assert clock.getDelayedCalls() == []
    guard.pauseProducing()
    guard._cancel()  # unregistered: the response is over
    clock.advance(10)
    assert not server.aborted


def test_writeDeadlineIgnoresFinishedStream():
    """The deadline does nothing to a stream that has already ended."""
    from twisted.internet.task import Clock

    from txbalancer.h2 import _WriteDeadline

    clock = Clock()
    server = _StubStreamServer(clock, 5)
    guard = _WriteDeadline(_Producer(), server)
    guard.pauseProducing()
    server.active = False
    clock.advance(5)
    assert not server.aborted


def test_streamedResponseRegistersWriteDeadline(balancer):
    """A streamed response registers the exchange with its stream behind the
    write deadline, and unregisters it when done."""
    from txbalancer.h2 import _WriteDeadline

    client = H2Client(balancer)
    sid = client.request(path=b"/big")
    backend = balancer.acceptConnect()
    backend.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
    client.flush()
    stream = client.server.streams[sid]
    assert isinstance(stream.producer, _WriteDeadline)
    backend.respond(b"0\r\n\r\n")
    client.flush()
    assert client.response(sid)[2]

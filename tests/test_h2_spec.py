"""
HTTP/2 conformance cases in the spirit of h2spec (which cannot be installed
here), limited to those that go through the balancer's own code: its
H2Connection subclass (flow control, stream bookkeeping, settings) and how
it builds the HTTP/1.1 request.  Each names the h2spec case it follows.
An h2 client state machine talks to the real balancer in memory; frames the
client library refuses to send are written by hand with hyperframe.
"""

from __future__ import annotations

import h2.errors
import h2.events
import pytest
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame, RstStreamFrame, WindowUpdateFrame
from test_h2 import H2Client, LogWatch, request

from txbalancer.testing import InMemoryBalancer

ErrorCodes = h2.errors.ErrorCodes
OK = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"


@pytest.fixture
def balancer():
    return InMemoryBalancer(["127.0.0.1:3001"], secure=True)


def settle(client):
    """
    Assert the server's sending loop is idle, not spinning: nothing is due
    on the clock (a busy loop reschedules itself with callLater(0)).
    """
    now = client.reactor.seconds()
    assert not [c for c in client.reactor.getDelayedCalls() if c.getTime() <= now]


class Backends:
    """
    The backend connections of one test: a request goes to a new one or to
    one the balancer keeps alive; L{next} finds the one it went to.
    """

    def __init__(self, balancer):
        self.balancer = balancer
        self.seen = []

    def next(self):
        while self.balancer.pendingConnects():
            self.seen.append(self.balancer.acceptConnect())
        (busy,) = [b for b in self.seen if b.received() and not b.closed]
        return busy

    def respond(self, data):
        backend = self.next()
        backend.clear()
        backend.respond(data)
        return backend


def body(client, sid):
    return client.response(sid)[1]


# -- 6.9.2: SETTINGS_INITIAL_WINDOW_SIZE and negative windows


def test_negativeWindow(balancer):
    """h2spec 6.9.2/2: the client lowers SETTINGS_INITIAL_WINDOW_SIZE after
    data was sent, making a stream's window negative; the server sends
    nothing on it until the window is positive again, then completes the
    response, logs no error, and other streams keep working meanwhile."""
    with LogWatch() as watch:
        client = H2Client(balancer)
        client.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 100})
        client.flush()
        backends = Backends(balancer)
        first = client.request(b"GET", b"/big")
        backends.respond(OK % 1000 + b"x" * 1000)
        client.flush()
        assert body(client, first) == b"x" * 100
        settle(client)

        # The window goes to 0 - 100 = -100 (RFC 9113 6.9.2).
        client.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})
        client.flush()
        assert client.server.conn.local_flow_control_window(first) == -100
        # A WINDOW_UPDATE that leaves it negative sends nothing either.
        client.conn.increment_flow_control_window(50, stream_id=first)
        client.flush()
        assert body(client, first) == b"x" * 100
        settle(client)

        # Another stream is served meanwhile (its HEADERS are not flow
        # controlled, and an empty body needs no window).
        second = client.request(b"GET", b"/empty")
        backends.respond(OK % 0)
        client.flush()
        assert client.status(second) == 200 and client.response(second)[2]

        # Raising the setting opens the window: the response completes.
        client.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 65535})
        client.flush()
        _, data, ended = client.response(first)
        assert data == b"x" * 1000 and ended
        third = client.request(b"GET", b"/after")
        backends.respond(OK % 5 + b"after")
        client.flush()
        assert client.response(third)[1:] == (b"after", True)
    assert watch.failures() == []


def test_zeroWindowDoesNotSpin(balancer):
    """With a stream's window at zero and data queued the sending loop
    waits (Twisted's spins with callLater(0)); a WINDOW_UPDATE wakes it."""
    client = H2Client(balancer)
    client.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 10})
    client.flush()
    sid = client.request()
    balancer.acceptConnect().respond(OK % 25 + b"y" * 25)
    client.flush()
    assert body(client, sid) == b"y" * 10
    settle(client)
    client.conn.increment_flow_control_window(10, stream_id=sid)
    client.flush()
    assert body(client, sid) == b"y" * 20
    settle(client)
    client.conn.increment_flow_control_window(10, stream_id=sid)
    client.flush()
    assert client.response(sid)[1:] == (b"y" * 25, True)


def test_connectionWindow(balancer):
    """h2spec 6.9.1: a response larger than the connection window stops when
    either window is exhausted and resumes once both are open again."""
    client = H2Client(balancer)
    sid = client.request()
    size = 70000
    balancer.acceptConnect().respond(OK % size + b"z" * size)
    client.flush()
    assert len(body(client, sid)) == 65535
    settle(client)
    # The connection window alone: the stream's is still exhausted.
    client.conn.increment_flow_control_window(65535)
    client.flush()
    assert len(body(client, sid)) == 65535
    client.conn.increment_flow_control_window(65535, stream_id=sid)
    client.flush()
    assert client.response(sid)[1:] == (b"z" * size, True)


def test_windowUpdateForFinishedStream(balancer):
    """h2spec 6.9/x: a WINDOW_UPDATE for a stream that is already finished
    is ignored without harm."""
    with LogWatch() as watch:
        client = H2Client(balancer)
        backends = Backends(balancer)
        sid = client.request()
        backends.respond(OK % 2 + b"ok")
        client.flush()
        assert client.response(sid)[2]
        client.server.dataReceived(WindowUpdateFrame(sid, window_increment=100).serialize())
        client.server.dataReceived(WindowUpdateFrame(0, window_increment=100).serialize())
        client.flush()
        assert client.goaway() is None
        client.request(b"GET", b"/next")
        assert backends.next().received().startswith(b"GET /next ")
    assert watch.failures() == []


def test_settingsRaiseWakesEveryStream(balancer):
    """A larger SETTINGS_INITIAL_WINDOW_SIZE reopens all streams at once,
    as a connection-wide WINDOW_UPDATE would."""
    client = H2Client(balancer)
    client.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})
    client.flush()
    sids = [client.request(b"GET", b"/%d" % i) for i in range(3)]
    for i in range(3):
        balancer.acceptConnect().respond(OK % 3 + b"ab%d" % i)
    client.flush()
    assert [body(client, s) for s in sids] == [b""] * 3
    settle(client)
    client.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    client.flush()
    assert [client.response(s)[1:] for s in sids] == [
        (b"ab%d" % i, True) for i in range(3)
    ]


# -- 6.5.3: SETTINGS are acknowledged


def test_settingsAcknowledged(balancer):
    """h2spec 6.5.3/2: every SETTINGS frame, the window-changing ones the
    balancer watches included, gets a SETTINGS ACK."""
    client = H2Client(balancer)
    acks = len([e for e in client.events if isinstance(e, h2.events.SettingsAcknowledged)])
    client.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1234})
    client.flush()
    client.conn.update_settings({SettingCodes.MAX_FRAME_SIZE: 20000})
    client.flush()
    now = [e for e in client.events if isinstance(e, h2.events.SettingsAcknowledged)]
    assert len(now) == acks + 2


# -- 5.1: stream states


def test_dataAfterEndStream(balancer):
    """h2spec 5.1/5 (half-closed remote): DATA after END_STREAM is answered
    with RST_STREAM STREAM_CLOSED; the backend got one request with no body
    and is not reused, and the connection goes on serving."""
    with LogWatch() as watch:
        client = H2Client(balancer)
        sid = client.request()
        backend = balancer.acceptConnect()
        frame = DataFrame(sid, data=b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
        frame.flags.add("END_STREAM")
        client.server.dataReceived(frame.serialize())
        client.flush()
        assert client.reset(sid) == ErrorCodes.STREAM_CLOSED
        balancer.flush()
        sent = backend.received()
        assert sent.count(b"HTTP/1.1\r\n") == 1 and sent.endswith(b"\r\n\r\n")
        assert b"smuggled" not in sent
        assert backend.closed
        client.request(b"GET", b"/next")
        assert balancer.acceptConnect().received().startswith(b"GET /next ")
    assert watch.failures() == []


def test_resetIdleStream(balancer):
    """h2spec 5.1/1: RST_STREAM on an idle stream is a connection error
    PROTOCOL_ERROR, handled without an unhandled error."""
    with LogWatch() as watch:
        client = H2Client(balancer)
        client.server.dataReceived(
            RstStreamFrame(5, error_code=ErrorCodes.CANCEL).serialize()
        )
        client.flush()
        assert client.goaway() == ErrorCodes.PROTOCOL_ERROR
        assert client.transport.disconnecting
        balancer.flush()
    assert watch.failures() == []
    assert client.server not in balancer.factory.connections


def test_resetAfterResponse(balancer):
    """h2spec 5.1/x (closed): RST_STREAM for a stream the server finished is
    harmless; the connection stays up."""
    client = H2Client(balancer)
    sid = client.request()
    balancer.acceptConnect().respond(OK % 0)
    client.flush()
    client.server.dataReceived(RstStreamFrame(sid, error_code=ErrorCodes.CANCEL).serialize())
    client.flush()
    assert client.goaway() is None and not client.transport.disconnecting


# -- 8.1.1 / 8.1.2.6: content-length against the DATA frames


def test_longerBodyThanContentLength(balancer):
    """h2spec 8.1.2.6/2: more DATA than content-length is a protocol error;
    the backend, already sent the head, gets none of the excess and its
    connection is aborted (never reused with a wrong body)."""
    client = H2Client(balancer)
    sid = client.request(b"POST", b"/up", [(b"content-length", b"3")], end=False)
    backend = balancer.acceptConnect()
    client.conn.send_data(sid, b"abc")
    client.flush()
    before = backend.received()
    assert before.endswith(b"Content-Length: 3\r\n\r\nabc")
    client.server.dataReceived(DataFrame(sid, data=b"GET / HTTP/1.1\r\n\r\n").serialize())
    client.flush()
    assert client.goaway() == ErrorCodes.PROTOCOL_ERROR
    balancer.flush()
    assert backend.received() == before
    assert backend.transport.aborted


def test_shorterBodyThanContentLength(balancer):
    """h2spec 8.1.2.6/1: fewer bytes than content-length before END_STREAM
    is refused, and the backend connection that was promised the bytes is
    aborted."""
    client = H2Client(balancer)
    sid = client.request(b"POST", b"/up", [(b"content-length", b"10")], end=False)
    backend = balancer.acceptConnect()
    client.conn.send_data(sid, b"abc", end_stream=True)
    client.flush()
    assert client.goaway() == ErrorCodes.PROTOCOL_ERROR
    balancer.flush()
    assert backend.transport.aborted


@pytest.mark.parametrize("trailers", [False, True])
def test_streamEndsWithoutTheBody(balancer, trailers):
    """A stream whose HEADERS (or trailers) end it before content-length
    bytes came (h2 does not notice this) is refused with 400; a backend
    promised the body is aborted, not reused."""
    client = H2Client(balancer)
    head = request(b"/up", b"POST") + [(b"content-length", b"5")]
    if trailers:
        sid = client.send(head, body=b"ab", end=False)
        backend = balancer.acceptConnect()
        client.conn.send_headers(sid, [(b"x-trailer", b"1")], end_stream=True)
        client.flush()
        balancer.flush()
        assert backend.transport.aborted
    else:
        sid = client.send(head)
        assert balancer.reactor.tcpClients == []
    assert client.status(sid) == 400
    assert b"content-length" in client.response(sid)[1]
    assert client.goaway() is None


def test_emptyDataFrames(balancer):
    """Empty DATA frames (legal, h2spec 6.1) add nothing to a body sent on
    chunked: they do not become the empty chunk that would end it early and
    leave the rest as a bogus next request on the backend connection."""
    client = H2Client(balancer)
    sid = client.request(b"POST", b"/up", end=False)
    backend = balancer.acceptConnect()
    for data, end in [(b"", False), (b"ab", False), (b"", False), (b"", True)]:
        client.conn.send_data(sid, data, end_stream=end)
        client.flush()
    sent = backend.received()
    assert sent.endswith(b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n")
    assert sent.count(b"0\r\n\r\n") == 1

"""
Fuzzing the HTTP/2 front end (issue 14, item 5): hypothesis generates
request header blocks (valid and broken names, values and pseudo-header
fields) and bodies, an h2 client sends them to the real balancer in
memory, and the property is checked: the stream is refused (an error
status, a reset or GOAWAY) and nothing goes upstream, or exactly one
upstream request arrives whose method, target, headers and body are the
ones sent, modulo the documented rewrites (hop-by-hop fields removed,
X-Forwarded-*, Forwarded and Via set, Host from :authority, cookie crumbs
joined, the body re-framed); and nothing is logged as an error.
"""

from __future__ import annotations

import h2.exceptions
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from test_h2 import AUTHORITY, H2Client, LogWatch
from test_h2_corpus import parseRequests

from txbalancer.headers import HOP_BY_HOP
from txbalancer.proxy import REQUEST_DROP
from txbalancer.testing import InMemoryBalancer

# What the balancer writes itself, or re-frames, on the way upstream.
REWRITTEN = frozenset(
    [b"host", b"content-length", b"transfer-encoding", b"te", b"cookie"]
) | HOP_BY_HOP | REQUEST_DROP

LOWER_TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"

# -- well-formed pieces

goodNames = st.one_of(
    st.text(LOWER_TOKEN, min_size=1, max_size=10).map(str.encode).filter(
        lambda n: n not in (b"host", b"expect", b"content-length", b"te",
                            b"transfer_encoding", b"content_length", b"connection",
                            b"keep-alive", b"proxy-connection", b"transfer-encoding",
                            b"upgrade")
    ),
    st.sampled_from([b"cookie", b"via", b"x-forwarded-for", b"forwarded", b"trailer",
                     b"proxy-authorization", b"http2-settings", b"accept"]),
)
# Visible characters, 8-bit bytes, and SP or HTAB inside (not at either end).
goodValues = st.binary(max_size=12).map(
    lambda b: bytes(c for c in b if c >= 0x21 and c != 0x7f)
) | st.sampled_from([b"", b"a b", b"a\tb", b"caf\xc3\xa9", b"x=1; y=2"])
goodFields = st.lists(st.tuples(goodNames, goodValues), max_size=5)
goodPaths = st.binary(max_size=12).map(
    lambda b: b"/" + bytes(c for c in b if c > 0x20 and c != 0x7f)
)


@st.composite
def goodBlocks(draw):
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH",
                                   b"OPTIONS", b"get", b"PROPFIND"]))
    block = [
        (b":method", method),
        (b":scheme", draw(st.sampled_from([b"https", b"http"]))),
        (b":authority", draw(st.sampled_from([AUTHORITY, b"a.example:8443",
                                              b"[::1]:443"]))),
        (b":path", b"*" if method == b"OPTIONS" and draw(st.booleans())
         else draw(goodPaths)),
    ]
    block = draw(st.permutations(block)) + draw(goodFields)
    if draw(st.booleans()):
        block.append((b"te", b"trailers"))
    return block


# -- broken pieces

badNames = st.sampled_from([
    b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"keep-alive",
    b"proxy-connection", b"host", b"expect", b"te", b"transfer_encoding",
    b"content_length", b"transfer-encoding;", b"x(y", b"X-Up", b"x y", b" x", b"x ",
    b"x:y", b"",
]) | st.binary(max_size=8)
badValues = st.sampled_from([
    b"chunked", b"gzip", b"0", b"3", b"05", b"5, 5", b"+5", b"100-continue",
    b"close", AUTHORITY, b"other.example", b" a", b"a ", b"a\x00b", b"a\rb",
    b"a\nb", b"a\x01", b"\x7f",
]) | st.binary(max_size=12)
badPseudo = {
    b":method": st.sampled_from([b"CONNECT", b"GET /admin HTTP/1.1", b"", b"G\x00T",
                                 b"GET\t"]) | st.binary(max_size=8),
    b":scheme": st.sampled_from([b"ht tp", b"", b"1http"]) | st.binary(max_size=6),
    b":authority": st.sampled_from([b"user@a", b"a b", b"a\x01", b""])
    | st.binary(max_size=10),
    b":path": st.sampled_from([b"*", b"http://evil/", b"evil:443", b"", b"/a b",
                               b"/a\tb", b"/\r\n"]) | st.binary(max_size=12),
}


@st.composite
def mutation(draw, block):
    """
    C{block} with one thing broken.
    """
    block = list(block)
    kind = draw(st.integers(0, 5))
    pseudo = [i for i, (n, _) in enumerate(block) if n[:1] == b":"]
    if kind == 0:  # a bad pseudo-header value
        i = draw(st.sampled_from(pseudo))
        name = block[i][0]
        block[i] = (name, draw(badPseudo[name]))
    elif kind == 1:  # a pseudo-header dropped
        del block[draw(st.sampled_from(pseudo))]
    elif kind == 2:  # one repeated, misplaced or unknown
        extra = draw(st.sampled_from([(b":status", b"200"), (b":foo", b"1"),
                                      (b":protocol", b"websocket"),
                                      (b":path", b"/again"), (b":method", b"GET")]))
        block.insert(draw(st.integers(0, len(block))), extra)
    else:  # a bad field
        field = (draw(badNames), draw(badValues | goodValues))
        block.insert(draw(st.integers(len(pseudo), len(block))), field)
    return block


@st.composite
def headerBlocks(draw):
    """
    A request header block: well formed, or with one to three things
    broken.
    """
    block = draw(goodBlocks())
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        block = draw(mutation(block))
    assume(block)  # h2 cannot send an empty header block
    return block


@st.composite
def requests(draw):
    """
    A header block and the body's DATA frames (L{None}: no body), with a
    content-length that is right, wrong or absent.
    """
    block = draw(headerBlocks())
    frames = draw(st.none() | st.lists(st.binary(max_size=40), min_size=1, max_size=3))
    length = len(b"".join(frames or ()))
    choice = draw(st.sampled_from(["none", "right", "right", "wrong"]))
    if choice == "right" and (frames or not length):
        block.append((b"content-length", b"%d" % length))
    elif choice == "wrong":
        block.append((b"content-length", b"%d" % (length + draw(st.integers(1, 3)))))
    return block, frames


def expectedFields(block):
    """
    The regular fields of C{block} as the backend must see them.
    """
    kept = [(n, v) for n, v in block if n[:1] != b":" and n.lower() not in REWRITTEN]
    cookies = [v for n, v in block if n == b"cookie"]
    if cookies:
        kept.append((b"cookie", b"; ".join(cookies)))
    return kept


def upstreamFields(parsed):
    """
    The fields the backend got, less those the balancer writes itself.
    """
    return [(n, v) for n, v in parsed.headers
            if n == b"cookie" or n.lower() not in REWRITTEN]


def test_refusedOrForwardedFaithfully():
    """Whatever header block and body a client sends, the stream is refused
    with nothing sent upstream, or the backend gets exactly one request
    equal to it modulo the documented rewrites; no error is logged."""
    # Unhandled errors in Deferreds are logged when garbage is collected:
    # once for the whole run (a collection per example would be most of
    # the run time); errors logged at once are checked per example.
    with LogWatch() as watch:
        _faithful()
    assert watch.failures() == []


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(request=requests())
def _faithful(request):
    block, frames = request
    balancer = InMemoryBalancer(["127.0.0.1:3001"], secure=True)
    with LogWatch(collect=False) as watch:
        client = H2Client(balancer, lenient=True)
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, block, end_stream=frames is None)
        client.flush()
        for i, data in enumerate(frames or ()):
            try:
                client.conn.send_data(sid, data, end_stream=i == len(frames) - 1)
            except h2.exceptions.ProtocolError:
                # The server ended the stream or the connection first.
                break
            # Reading the answer must never fail: the server's frames are
            # checked by the client state machine.
            client.flush()
        pending = balancer.pendingConnects()
        status = client.status(sid)
        refused = (
            client.goaway() is not None
            or client.reset(sid) is not None
            or (status is not None and status >= 400)
        )
        event("refused" if refused else "forwarded")
        if refused:
            assert pending == []
            balancer.flush()
            assert balancer.forwarder.inFlight == 0
        else:
            assert status is None and len(pending) == 1
            backend = balancer.acceptConnect()
            client.flush()
            (parsed, body), = parseRequests(backend.received())[0]
            pseudo = dict(n_v for n_v in block if n_v[0][:1] == b":")
            hosts = [v for n, v in block if n == b"host"]
            assert parsed.method == pseudo[b":method"]
            assert parsed.target == pseudo[b":path"]
            assert parsed.host == pseudo.get(b":authority", hosts[0] if hosts else None)
            assert upstreamFields(parsed) == expectedFields(block)
            assert body == b"".join(frames or ())
            assert parsed.teTrailers == ((b"te", b"trailers") in block)
            backend.respond(b"HTTP/1.1 204 No Content\r\n\r\n")
            client.flush()
            assert client.status(sid) == 204 and client.response(sid)[2]
    assert watch.failures() == []

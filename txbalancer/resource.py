"""
The balancer as a twisted.web resource: a front end for your own C{Site}.

    root = Resource()
    root.putChild(b"static", File("public"))
    root.putChild(b"api", balancer.resource())
    site = Site(root)           # request bodies are spooled, then sent on
    site = StreamingSite(root)  # request bodies stream to the backend

L{BalancerResource} is a leaf resource: every request that reaches it is
proxied, and the backend sees the path below the mount point with the
query byte-exact as the client sent it.  For each request it builds an
L{IRequestHead} (a L{txbalancer.downstream.Request}) from the twisted.web
request and asks the balancer's handler for an exchange, which answers
through a L{ResourceDownstream}: the L{IDownstream} of one twisted.web
request.  Response bodies stream with backpressure: the exchange is
registered as the request's producer, so a slow client pauses the backend.

twisted.web's C{HTTPChannel} reads the whole request body (into memory
below 100 kB, into a temporary file above) before it renders anything.
The body is then read back from that file in pieces, no faster than the
backend takes it.  L{StreamingSite} does better: its requests find their
resource as soon as the head is in, and when it is a L{BalancerResource}
the exchange starts at once and the body streams to the backend as it
arrives, with the client paused while the backend reads slowly.  To see
the head that early it reads the request line from three attributes of
C{HTTPChannel} that are private (C{_command}, C{_path}, C{_version}); if a
Twisted release drops them, it falls back to spooling.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Optional
from urllib.parse import quote, unquote_to_bytes

from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.web import server
from twisted.web.http import parse_qs
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from zope.interface import implementer

from txbalancer.framing import NO_BODY_STATUSES, REASONS, errorResponse, refusalMessage
from txbalancer.request import Request
from txbalancer.headers import connectionTokens
from txbalancer.interfaces import IDownstream

__all__ = [
    "BalancerResource",
    "ResourceDownstream",
    "StreamingRequest",
    "StreamingSite",
]

log = Logger()

# How much of a spooled request body is read back at a time.
BODY_CHUNK = 64 * 1024

# What ends a client connection as a client leaving, not as a bug.
_CONNECTION_ENDED = (
    error.ConnectionDone,
    error.ConnectionLost,
    error.ConnectionAborted,
)

# The states of a ResourceDownstream.
_WAITING = "waiting"  # no response yet
_RESPONDING = "responding"  # the head is sent, the body goes on
_DONE = "done"  # finished, aborted, or the client left


@implementer(IDownstream)
class ResourceDownstream:
    """
    The client's side of one exchange, on one twisted.web request.

    Its C{_state} is one of:

        - C{"waiting"}: no response yet;
        - C{"responding"}: the head is sent, the body goes on;
        - C{"done"}: the response is finished or aborted, or the client
          left; nothing more is written, and no more request body is
          passed to the exchange.

    The request body comes either from the file twisted.web spooled it
    into (L{sendSpooledBody}), read in pieces while the exchange does not
    hold it back, or from the network as it arrives (L{bodyChunk} and
    L{bodyComplete}, from a L{StreamingRequest}), with the client's
    transport paused while the exchange holds it back.

    @ivar exchange: the L{txbalancer.interfaces.IExchange} it answers for.
    @param whenDone: called with it once it is done.
    """

    def __init__(
        self,
        request: Any,
        reactor: Any,
        streaming: bool = False,
        maxBodySize: Optional[int] = None,
        whenDone: Optional[Callable[[ResourceDownstream], None]] = None,
    ) -> None:
        self.request = request
        self._whenDone = whenDone
        self.exchange: Any = None
        self._reactor = reactor
        self._state = _WAITING
        self._gone = False
        self._pauses: set[str] = set()
        self._streaming = streaming
        self._bodyArrived = not streaming
        self._finishWhenArrived = False
        self._closeEarly = False
        self._maxBodySize = maxBodySize
        self._bodySeen = 0
        self._spooled: Any = None
        self._pumpCall: Any = None

    def _done(self) -> None:
        if self._state != _DONE:
            self._state = _DONE
            if self._whenDone is not None:
                self._whenDone(self)

    @property
    def answered(self) -> bool:
        """
        Whether a response has begun (or the client has left).
        """
        return self._state != _WAITING

    def watch(self, exchange: Any) -> None:
        """
        Serve C{exchange}; tell it when the client leaves first.
        """
        self.exchange = exchange
        d = self.request.notifyFinish()
        d.addErrback(self._clientLeft)
        d.addErrback(lambda f: log.failure("error while the client left", f))

    def _clientLeft(self, reason: Any) -> None:
        if not reason.check(*_CONNECTION_ENDED):
            log.failure("client connection ended unexpectedly", reason)
        self._gone = True
        self._done()
        self._stopBody()
        self.exchange.clientGone()

    # -- the request body

    def sendSpooledBody(self, content: Any) -> None:
        """
        Pass the body twisted.web has read into C{content} (a file) to the
        exchange, a piece at a time, while it does not hold it back.
        """
        content.seek(0, 0)
        self._spooled = content
        self._pump()

    def _pump(self) -> None:
        self._pumpCall = None
        while self._spooled is not None and not self._pauses and self._state != _DONE:
            data = self._spooled.read(BODY_CHUNK)
            if not data:
                self._spooled = None
                self.exchange.bodyFinished()
                return
            self.exchange.bodyReceived(data)

    def bodyChunk(self, data: bytes) -> None:
        """
        More of a streamed request body has arrived.
        """
        if self._state == _DONE:
            return
        if self._maxBodySize is not None:
            self._bodySeen += len(data)
            if self._bodySeen > self._maxBodySize:
                self.exchange.clientGone()
                self.refuse(413, "request body too large")
                return
        if self._pauses:
            # The channel resumed the transport on its own (its producer
            # logic knows nothing of ours): hold it back again.
            self._transportOf().pauseProducing()
        self.exchange.bodyReceived(data)

    def bodyComplete(self) -> None:
        """
        The whole streamed request body has arrived; twisted.web is ready
        to see the request finished.
        """
        self._bodyArrived = True
        if self._state != _DONE:
            self.exchange.bodyFinished()
        if self._finishWhenArrived:
            self._finishWhenArrived = False
            if not self._gone:
                self.request.finish()

    def _stopBody(self) -> None:
        """
        No more request body goes to the exchange: stop reading the spool,
        or let the rest of a streamed body drain (and be dropped), so that
        twisted.web can finish the request.
        """
        self._spooled = None
        call, self._pumpCall = self._pumpCall, None
        if call is not None and call.active():
            call.cancel()
        if self._pauses:
            self._pauses.clear()
            if self._streaming and not self._gone:
                self._transportOf().resumeProducing()

    def _transportOf(self) -> Any:
        request = self.request
        # An HTTP/2 stream stands in for the transport as the channel.
        return request.transport if request.transport is not None else request.channel

    def pauseReading(self, reason: str) -> None:
        """
        Hold the request body back for C{reason}: the spool is not read, or
        a streaming client is paused.
        """
        if self._state == _DONE:
            return
        if not self._pauses and self._streaming:
            self._transportOf().pauseProducing()
        self._pauses.add(reason)

    def resumeReading(self, reason: str) -> None:
        if reason not in self._pauses:
            return
        self._pauses.discard(reason)
        if self._pauses or self._state == _DONE:
            return
        if self._streaming:
            self._transportOf().resumeProducing()
        elif self._spooled is not None and self._pumpCall is None:
            # Later, not now: the exchange resumes from inside its own
            # bookkeeping (and registers its producer just after).
            self._pumpCall = self._reactor.callLater(0, self._pump)

    def sendContinue(self) -> None:
        """
        Nothing to do: twisted.web answers C{Expect: 100-continue} itself,
        as soon as the head is in.
        """

    # -- the response

    def startResponse(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        length: Optional[int],
    ) -> None:
        """
        Send the response head: the backend's end-to-end headers, and its
        C{Content-Length} when known (else twisted.web chunks the body, or
        closes the connection after it for an HTTP/1.0 client).  twisted.web's
        own C{Server} and C{Date} are removed: the backend's pass through.
        """
        if self._state != _WAITING or self._gone:
            return
        self._state = _RESPONDING
        request = self.request
        request.setResponseCode(status, reason or REASONS.get(status))
        out = request.responseHeaders
        out.removeHeader(b"server")
        out.removeHeader(b"date")
        for name, value in headers:
            out.addRawHeader(name, value)
        if length is not None and (
            status not in NO_BODY_STATUSES or request.method == b"HEAD"
        ):
            out.setRawHeaders(b"content-length", [b"%d" % (length,)])
        request.write(b"")

    def writeBody(self, data: bytes) -> None:
        if self._state == _RESPONDING and data and not self._gone:
            self.request.write(data)

    def finishResponse(self) -> None:
        if self._state != _RESPONDING:
            return
        self._done()
        self._stopBody()
        if self._gone:
            return
        if self._bodyArrived:
            self.request.finish()
        elif self._closeEarly:
            self._transportOf().loseConnection()
        else:
            # twisted.web reads the next request only after the whole of
            # this one: the request is finished once its body is in.
            self._finishWhenArrived = True

    def abortResponse(self) -> None:
        """
        The response broke off: abort the client's connection, so that a
        short body never looks complete.
        """
        if self._state == _DONE:
            return
        self._done()
        self._stopBody()
        if not self._gone:
            self._transportOf().abortConnection()

    def respond(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        self.startResponse(status, reason, headers, len(body))
        self.writeBody(body)
        self.finishResponse()

    def sendError(
        self,
        status: int,
        message: str,
        headers: Optional[list[tuple[bytes, bytes]]] = None,
    ) -> None:
        """
        Answer with a short plain-text error, as the native listener does
        (or abort, if the response has begun).
        """
        if self._state == _RESPONDING:
            self.abortResponse()
            return
        if self._state == _DONE:
            return
        self.respond(status, *errorResponse(status, message, headers))

    def refuse(self, status: int, reason: str) -> None:
        """
        Answer a request that is not forwarded.  A streamed body still
        arriving is not read: the connection closes after the answer, as
        on the native listener.
        """
        log.info(
            "refused request from {peer}: {status} {reason}",
            peer=_peerOf(self.request),
            status=status,
            reason=reason,
        )
        self._closeEarly = True
        self.sendError(status, refusalMessage(status, reason))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._state == _RESPONDING and not self._gone:
            self.request.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        request = self.request
        # After the request is finished or lost it has no channel left.
        if request.producer is not None and getattr(request, "channel", None):
            request.unregisterProducer()


class _ArrivalOrderHeaders(Headers):
    """
    Request headers that also keep the order they arrived in
    (C{inArrivalOrder}), which twisted.web's L{Headers} groups by name.
    Names are as twisted.web canonicalized them.
    """

    __slots__ = ["inArrivalOrder"]

    def __init__(self, rawHeaders: Any = None) -> None:
        self.inArrivalOrder: list[tuple[bytes, bytes]] = []
        Headers.__init__(self, rawHeaders)

    def addRawHeader(self, name: Any, value: Any) -> None:
        Headers.addRawHeader(self, name, value)
        name = _asBytes(name)
        self.inArrivalOrder.append((name, self.getRawHeaders(name)[-1]))

    def setRawHeaders(self, name: Any, values: Any) -> None:
        Headers.setRawHeaders(self, name, values)
        self._replace(_asBytes(name))

    def removeHeader(self, name: Any) -> None:
        Headers.removeHeader(self, name)
        self._replace(_asBytes(name))

    def _replace(self, name: bytes) -> None:
        lname = name.lower()
        kept = [h for h in self.inArrivalOrder if h[0].lower() != lname]
        kept.extend((name, v) for v in self.getRawHeaders(name, []))
        self.inArrivalOrder = kept


def _asBytes(name: Any) -> bytes:
    return name.encode("latin-1") if isinstance(name, str) else name


def _headersOf(request: Any) -> list[tuple[bytes, bytes]]:
    """
    The request headers as C{(name, value)} pairs: in arrival order when
    the request recorded it, else grouped by name in the order each name
    first arrived (all twisted.web's L{Headers} keeps).
    """
    ordered = getattr(request.requestHeaders, "inArrivalOrder", None)
    if ordered is not None:
        return list(ordered)
    return [
        (name, value)
        for name, values in request.requestHeaders.getAllRawHeaders()
        for value in values
    ]


# What a path segment may hold unquoted (RFC 3986 pchar, less "%").
_PCHAR_SAFE = "!$&'()*+,;=:@-._~"


def _targetBelow(request: Any) -> bytes:
    """
    The request target below the mount point: the path segments that
    twisted.web has not consumed (C{postpath}), as the client spelled them
    in C{request.uri}, and the query byte-exact.
    """
    path, sep, query = request.uri.partition(b"?")
    postpath = request.postpath or []
    segments = path[1:].split(b"/") if path[:1] == b"/" else []
    if len(postpath) <= len(segments):
        rest = segments[len(segments) - len(postpath) :] if postpath else []
    else:
        # A resource above rewrote the path: quote what is left of it.
        rest = [quote(s, safe=_PCHAR_SAFE).encode("ascii") for s in postpath]
    return b"/" + b"/".join(rest) + sep + query


class BalancerResource(Resource):
    """
    A leaf resource that proxies every request reaching it through the
    balancer's handler.

    @param handler: C{handler(request, downstream)} returns the
        L{txbalancer.interfaces.IExchange} for a request
        (L{txbalancer.Balancer.handler}).
    @param reactor: for C{received} times and for reading a spooled body.
    @param maxBodySize: larger request bodies get 413, or L{None}.
    """

    isLeaf = True

    def __init__(
        self, handler: Any, reactor: Any, maxBodySize: Optional[int] = None
    ) -> None:
        Resource.__init__(self)
        self.handler = handler
        self.reactor = reactor
        self.maxBodySize = maxBodySize
        self.inFlight: set[ResourceDownstream] = set()
        self._drained: list[defer.Deferred[None]] = []

    def _downstream(self, request: Any, **kw: Any) -> ResourceDownstream:
        downstream = ResourceDownstream(
            request, self.reactor, whenDone=self._ended, **kw
        )
        self.inFlight.add(downstream)
        return downstream

    def _ended(self, downstream: ResourceDownstream) -> None:
        self.inFlight.discard(downstream)
        if not self.inFlight and self._drained:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def drain(self, timeout: float) -> defer.Deferred[None]:
        """
        Wait for the requests in flight through this resource to be
        answered, and abort those still going after C{timeout} seconds.

        @return: a Deferred that fires when none is left.
        """
        d: defer.Deferred[None] = defer.Deferred()
        if not self.inFlight:
            d.callback(None)
            return d
        self._drained.append(d)

        def giveUp() -> None:
            log.warn("drain timeout: aborting {n} requests", n=len(self.inFlight))
            for downstream in list(self.inFlight):
                downstream.abortResponse()

        call = self.reactor.callLater(timeout, giveUp)
        d.addBoth(lambda result: (call.active() and call.cancel(), result)[1])
        return d

    def render(self, request: Any) -> Any:
        """
        Proxy C{request}, whose body twisted.web has already read.
        """
        content = request.content
        content.seek(0, 2)
        length = content.tell()
        downstream = self._downstream(request)
        head = self._head(request, downstream, length, chunked=False)
        if head is not None:
            exchange = self.handler(head, downstream)
            downstream.watch(exchange)
            if length:
                exchange.start()
                downstream.sendSpooledBody(content)
            else:
                exchange.bodyFinished()
                exchange.start()
        return server.NOT_DONE_YET

    def startStreaming(self, request: Any, length: Optional[int]) -> ResourceDownstream:
        """
        Proxy C{request} from its head on: the body will come through the
        returned downstream's C{bodyChunk} and C{bodyComplete}.

        @param length: the body's length, or L{None} when chunked.
        """
        downstream = self._downstream(
            request, streaming=True, maxBodySize=self.maxBodySize
        )
        head = self._head(request, downstream, length, chunked=length is None)
        if head is not None:
            exchange = self.handler(head, downstream)
            downstream.watch(exchange)
            exchange.start()
        return downstream

    def _head(
        self, request: Any, downstream: ResourceDownstream, length: Optional[int],
        chunked: bool,
    ) -> Optional[Request]:
        """
        The L{IRequestHead} of C{request}, or L{None} when it has been
        refused (answered with a 4xx through C{downstream}).
        """
        # The backend's Content-Type, or none: not twisted.web's text/html.
        request.defaultContentType = None
        headers = _headersOf(request)
        hosts = [v for n, v in headers if n.lower() == b"host"]
        version = request.clientproto
        refusal = None
        if len(hosts) > 1:
            refusal = (400, "more than one Host header")
        elif not hosts and version == b"HTTP/1.1":
            refusal = (400, "missing Host header")
        elif (
            self.maxBodySize is not None
            and length is not None
            and length > self.maxBodySize
        ):
            refusal = (413, "request body too large")
        if refusal is not None:
            downstream.refuse(*refusal)
            return None
        head = Request()
        head.method = request.method
        head.target = _targetBelow(request)
        head.version = version
        head.headers = headers
        head.host = hosts[0] if hosts else None
        head.chunked = chunked
        if chunked or not (length or _announcesBody(headers)):
            head.contentLength = None
        else:
            head.contentLength = length
        tokens = connectionTokens(v for n, v in headers if n.lower() == b"connection")
        if version == b"HTTP/1.1":
            head.keepAlive = b"close" not in tokens
        else:
            head.keepAlive = b"keep-alive" in tokens and b"close" not in tokens
        # twisted.web has sent 100 Continue already; it cannot send
        # trailers, nor hand over the connection for an upgrade.
        head.expectContinue = False
        head.upgrade = False
        head.teTrailers = False
        head.peer = _peerOf(request)
        head.secure = bool(request.isSecure())
        head.received = self.reactor.seconds()
        return head


def _announcesBody(headers: list[tuple[bytes, bytes]]) -> bool:
    """
    Whether the client said a body follows (maybe an empty one).
    """
    framing = (b"content-length", b"transfer-encoding")
    return any(name.lower() in framing for name, value in headers)


def _peerOf(request: Any) -> str:
    return getattr(request.getClientAddress(), "host", "") or ""


class StreamingRequest(server.Request):
    """
    A twisted.web request that finds its resource as soon as its head is
    in.  When that is a L{BalancerResource}, the exchange starts then and
    the body streams to it as it arrives; for any other resource it is an
    ordinary request.  The request headers also keep their arrival order.

    Used by L{StreamingSite}, which renders the resource found here
    without looking it up a second time.
    """

    def __init__(self, channel: Any, *args: Any, **kw: Any) -> None:
        server.Request.__init__(self, channel, *args, **kw)
        self.requestHeaders = _ArrivalOrderHeaders()
        self._streamedTo: Optional[ResourceDownstream] = None
        self._lookedUp: Any = None

    def gotLength(self, length: Optional[int]) -> None:
        resrc = self._lookUpEarly()
        if isinstance(resrc, BalancerResource):
            self._lookedUp = None
            self.content = io.BytesIO()
            self._streamedTo = streamedTo = resrc.startStreaming(self, length)
            if streamedTo.answered:
                # The answer is final already (a 503, a 400): twisted.web
                # must not send 100 Continue after it.
                self.requestHeaders.removeHeader(b"expect")
        else:
            server.Request.gotLength(self, length)

    def _lookUpEarly(self) -> Any:
        """
        Look up the resource of this request from its head: what
        C{requestReceived} and C{process} would do once the body is in.
        """
        channel = self.channel
        site = getattr(channel, "site", None)
        try:
            command, uri, version = channel._command, channel._path, channel._version
        except AttributeError:
            return None
        if not isinstance(site, StreamingSite):
            return None
        path, sep, query = uri.partition(b"?")
        if path == b"*":
            return None
        self.method, self.uri, self.clientproto = command, uri, version
        self.path = path
        self.args = parse_qs(query, 1) if sep else {}
        self.site = site
        self.prepath = []
        self.postpath = [unquote_to_bytes(s) for s in path[1:].split(b"/")]
        try:
            resrc = server.Site.getResourceFor(site, self)
        except Exception:
            # twisted.web looks it up again once the body is in, and
            # answers (and logs) the error then, as it always does.
            return None
        self._lookedUp = (resrc, self.prepath, self.postpath, self.sitepath)
        return resrc

    def handleContentChunk(self, data: bytes) -> None:
        streamedTo = self._streamedTo
        if streamedTo is not None:
            streamedTo.bodyChunk(data)
        else:
            server.Request.handleContentChunk(self, data)

    def process(self) -> None:
        streamedTo = self._streamedTo
        if streamedTo is not None:
            streamedTo.bodyComplete()
        else:
            server.Request.process(self)


class StreamingSite(server.Site):
    """
    A L{twisted.web.server.Site} whose requests stream their bodies to a
    L{BalancerResource} mounted anywhere in it (other resources see
    ordinary requests, their bodies read in full first).
    """

    requestFactory = StreamingRequest

    def getResourceFor(self, request: Any) -> Any:
        lookedUp = getattr(request, "_lookedUp", None)
        if lookedUp is not None:
            # Found from the head already: the same answer, once.
            request._lookedUp = None
            resrc, request.prepath, request.postpath, request.sitepath = lookedUp
            request.site = self
            return resrc
        return server.Site.getResourceFor(self, request)

"""
The contracts between the parts, as zope interfaces.

A front end (the HTTP/1.1 protocol in downstream.py, an HTTP/2 stream in
h2.py, the twisted.web resource in resource.py) parses a request into an
L{IRequestHead} and asks a handler for an L{IExchange}; the exchange (the
proxy's, proxy.py) answers through the front end's L{IDownstream}::

    exchange = handler(request, downstream)   # head parsed, body not yet read
    exchange.start()                          # go: pick a backend, connect
    exchange.bodyReceived(data)               # zero or more times
    exchange.bodyFinished()                   # the whole body has arrived
    exchange.clientGone()                     # the client went away first

The strategies of choosers.py provide L{IStrategy}.  Every implementation,
and every fake in L{txbalancer.testing}, is checked with C{verifyObject}
in the tests.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IRequestHead(Interface):
    """
    The parsed head of one request, as the proxy needs it.
    """

    method = Attribute("The method, bytes (b'GET').")
    target = Attribute("The request target in origin form, bytes, query included.")
    version = Attribute("b'HTTP/1.1' or b'HTTP/1.0' (h2 requests say b'HTTP/1.1').")
    headers = Attribute(
        "Every header as (name, value) bytes pairs, in arrival order, names "
        "as the client spelled them."
    )
    host = Attribute("The Host (or :authority), bytes, or None.")
    contentLength = Attribute("The body's length, or None when chunked or absent.")
    chunked = Attribute("Whether the body's length is not known in advance.")
    keepAlive = Attribute("Whether the client keeps the connection after this.")
    expectContinue = Attribute("Whether the client waits for 100 Continue.")
    upgrade = Attribute("Whether the client asked for a protocol upgrade.")
    websocket = Attribute(
        "Whether the request is a WebSocket handshake the balancer forwards "
        "as an upgrade (only HTTP/1.1 front ends set it)."
    )
    teTrailers = Attribute("Whether the client accepts trailers (TE: trailers).")
    clientCert = Attribute("The subject of a verified TLS client certificate, or None.")
    peer = Attribute("The client's address (the TCP peer), str.")
    secure = Attribute("Whether the request came over TLS.")
    received = Attribute("When the head was complete, in reactor seconds.")
    addresses = Attribute(
        "The client connection's (peer, host) IAddress pair (the PROXY "
        "header sent upstream names them), or None."
    )


class IExchange(Interface):
    """
    One request on its way through the balancer, as its front end drives it.
    """

    def start() -> None:
        """
        The head is parsed (and the first body bytes checked): go.
        """

    def bodyReceived(data: bytes) -> None:
        """
        More of the request body (already de-chunked).
        """

    def bodyFinished() -> None:
        """
        The whole request body has arrived.
        """

    def clientGone() -> None:
        """
        The client left (or sent something unforwardable) before the
        response was finished: stop the work done on its behalf.
        """


class IDownstream(Interface):
    """
    The client's side of one exchange: how the proxy answers.  Provided by
    every front end.
    """

    def pauseReading(reason: str) -> None:
        """
        Stop reading the request body for C{reason} until resumed for it.
        """

    def resumeReading(reason: str) -> None:
        """
        C{reason} no longer holds the request body back.
        """

    def sendContinue() -> None:
        """
        Tell a client waiting on C{Expect: 100-continue} to send its body.
        """

    def startResponse(status: int, reason: bytes, headers: list, length: object) -> None:
        """
        Send the response head: C{headers} are end-to-end headers only;
        the front end frames the body itself (C{length} bytes, or unknown
        when L{None}).
        """

    def writeBody(data: bytes) -> None:
        """
        More of the response body.
        """

    def finishResponse() -> None:
        """
        The response is complete.
        """

    def abortResponse() -> None:
        """
        The response broke off half-way: the client must not mistake what
        it got for the whole of it.
        """

    def respond(status: int, reason: bytes, headers: list, body: bytes) -> None:
        """
        A whole small response at once.
        """

    def sendError(status: int, message: str, headers: object = None) -> None:
        """
        Answer with a short plain-text error (or abort, if a response has
        already begun).
        """

    def registerProducer(producer: object, streaming: bool) -> None:
        """
        Let C{producer} (the exchange) be paused while the client reads
        slowly, as C{ITransport.registerProducer}.
        """

    def unregisterProducer() -> None:
        """
        The producer registered with L{registerProducer} is done.
        """


class IFrontEndConnection(Interface):
    """
    A client connection, as a graceful stop sees it.
    """

    def isIdle() -> bool:
        """
        Whether no request is in progress on it (so it can be closed now).
        """


class IStrategy(Interface):
    """
    How a pool picks one backend among those that may take a request.
    Pure: no I/O, no reactor; randomness and time come in as parameters.
    """

    description = Attribute("One line for --help.")

    def choose(candidates: list, key: object) -> object:
        """
        One of C{candidates} (the backends that may take the request), or
        L{None} when there is none.  C{key} is the client's address for
        strategies that hash it, else L{None}.
        """

    def observe(backend: object, seconds: float) -> None:
        """
        C{backend} took C{seconds} to start its answer.
        """

    def forget(backend: object) -> None:
        """
        C{backend} left the pool: drop what is kept about it.
        """


class IHTTP11Downstream(IDownstream):
    """
    What only the HTTP/1.1 front end offers: interim responses, trailers,
    and handing the connection over to a tunnel after a WebSocket upgrade.
    """

    tunnel = Attribute("The tunnel the connection became part of, or None.")

    def sendInterim(status: int, reason: bytes, headers: list) -> None:
        """
        Pass on an interim (1xx) response, to HTTP/1.1 clients only.
        """

    def setTrailers(trailers: list) -> None:
        """
        End the chunked response with these trailer fields, if the client
        accepts trailers (C{TE: trailers}); otherwise they are dropped.
        """

    def switchProtocols(reason: bytes, headers: list) -> tuple:
        """
        Write the C{101} head, stop speaking HTTP, and return the transport
        and the bytes already read past the request head.
        """

    def attachTunnel(tunnel: object) -> None:
        """
        What the client sends from now on goes to C{tunnel}, as its side A.
        """

"""
Tiny demo backends: one HTTP server per port, each saying which port it is.

    python -m txbalancer.demo 3001 3002 3003

Every request (any method, any path) gets C{200 text/plain} with the body
C{Response from server on port N}; connections are kept alive.  Ctrl-C or
SIGTERM stops all of them.  Port 0 picks a free port; the line printed when
listening gives the real one.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import IO

from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Request, Site


class PortResource(Resource):
    """
    Answers every request with C{Response from server on port N}.
    """

    isLeaf = True

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    def render(self, request: Request) -> bytes:
        body = f"Response from server on port {self.port}\n".encode("ascii")
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/plain")
        # twisted.web sets Content-Length for a bytes result and drops the
        # body of a HEAD response itself.
        return body


class Options(usage.Options):
    synopsis = "Usage: python -m txbalancer.demo [--host HOST] PORT [PORT ...]"
    longdesc = "Start one tiny HTTP server per PORT, each answering with its port."
    optParameters = [  # noqa: RUF012 (the usage.Options idiom)
        ["host", None, "127.0.0.1", "Address to listen on."],
    ]

    def parseArgs(self, *ports: str) -> None:
        if not ports:
            raise usage.UsageError("give at least one port, e.g. 3001 3002 3003")
        numbers = []
        for port in ports:
            if not port.isascii() or not port.isdigit() or int(port) > 65535:
                raise usage.UsageError(f"not a port number (0-65535): {port!r}")
            numbers.append(int(port))
        self["ports"] = numbers


def listen(reactor, ports: Sequence[int], host: str, out: IO[str]) -> list[object]:
    """
    Listen on each port with its own L{PortResource}; print one line per port.

    @return: the listening ports (L{IListeningPort} providers).
    """
    listening = []
    for port in ports:
        resource = PortResource(port)
        site = Site(resource)
        site.noisy = False
        listener = reactor.listenTCP(port, site, interface=host)
        # With port 0 the kernel picked one: answer and report the real port.
        resource.port = listener.getHost().port
        shown = f"[{host}]" if ":" in host else host
        print(f"Listening on http://{shown}:{resource.port}/", file=out, flush=True)
        listening.append(listener)
    return listening


def main(argv: Sequence[str] | None = None, reactor=None) -> int:
    """
    Run the demo servers until Ctrl-C or SIGTERM; return the exit status.
    """
    options = Options()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        print(f"{options.synopsis}\ntxbalancer.demo: {e}", file=sys.stderr)
        return 2
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    from twisted.internet.error import CannotListenError

    try:
        listen(reactor, options["ports"], options["host"], sys.stdout)
    except CannotListenError as e:
        print(f"txbalancer.demo: cannot listen: {e}", file=sys.stderr)
        return 1
    # reactor.run() handles SIGINT and SIGTERM by stopping the reactor.
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

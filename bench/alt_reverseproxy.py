"""
The Twisted alternative: twisted.web.proxy.ReverseProxyResource, round robin.

    python alt_reverseproxy.py --port N --backends 127.0.0.1:A,127.0.0.1:B,...

A plain twisted.web Site whose root hands each request to the next backend's
ReverseProxyResource.  That resource opens a new upstream connection for every
request (HTTP/1.0 client, no pooling); that is what is being measured.  The
access log is off, like every other proxy in the bench.
"""

from __future__ import annotations

import argparse
import itertools
import sys

from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import Resource
from twisted.web.server import Site


class RoundRobin(Resource):
    """Hand each request to the next backend's ReverseProxyResource."""

    def __init__(self, backends: list[tuple[str, int]]) -> None:
        super().__init__()
        self._next = itertools.cycle(
            [ReverseProxyResource(host, port, b"") for host, port in backends]
        )

    def getChild(self, path, request):
        return next(self._next).getChild(path, request)

    def render(self, request):
        return next(self._next).render(request)


class QuietSite(Site):
    """A Site without an access log."""

    def log(self, request) -> None:
        pass


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backends", required=True, help="host:port,host:port,...")
    args = parser.parse_args(argv)
    backends = []
    for item in args.backends.split(","):
        host, _, port = item.rpartition(":")
        backends.append((host, int(port)))

    from twisted.internet import reactor

    reactor.listenTCP(args.port, QuietSite(RoundRobin(backends)), interface="127.0.0.1")
    print(f"listening {args.port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])

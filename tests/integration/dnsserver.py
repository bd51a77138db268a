"""
A DNS server for the integration tests, on UDP 127.0.0.1 (twisted.names).

    python dnsserver.py RECORDS.json

It prints "listening PORT" once it serves.  Every query reads RECORDS.json
again, so a test changes the answers by rewriting the file:

    {"_http._tcp.app.test": {"ttl": 1, "records": [
        {"target": "b1.app.test", "port": 3001, "weight": 1, "priority": 0,
         "address": "127.0.0.1"}]}}

An SRV query for a name in the file gets its records, with an A record per
target that has an "address" in the additional section; any other name is
NXDOMAIN.  It serves UDP and TCP on the same port (answers too big for UDP
are truncated, and clients ask again over TCP).
"""

from __future__ import annotations

import json
import sys

from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError
from twisted.names import common, dns, error, server


class FileAuthority(common.ResolverBase):
    def __init__(self, path: str) -> None:
        common.ResolverBase.__init__(self)
        self.path = path

    def _lookup(self, name, cls, type, timeout=None):
        with open(self.path) as f:
            zone = json.load(f)
        key = name.decode("ascii").rstrip(".").lower()
        entry = zone.get(key)
        if entry is None or type not in (dns.SRV, dns.ALL_RECORDS):
            return defer.fail(error.DomainError(name))
        ttl = entry.get("ttl", 1)
        answers, additional = [], []
        for r in entry["records"]:
            answers.append(dns.RRHeader(
                name=name, type=dns.SRV, ttl=ttl, auth=True,
                payload=dns.Record_SRV(
                    r.get("priority", 0), r.get("weight", 1), r["port"], r["target"],
                    ttl=ttl,
                ),
            ))
            if r.get("address"):
                additional.append(dns.RRHeader(
                    name=r["target"], type=dns.A, ttl=ttl, auth=True,
                    payload=dns.Record_A(r["address"], ttl=ttl),
                ))
        return defer.succeed((answers, [], additional))


class LoggingFactory(server.DNSServerFactory):
    """
    Says on stderr how each query came: "query NAME over UDP" or "over
    TCP"; truncates UDP answers over 512 bytes.
    """

    def handleQuery(self, message, protocol, address):
        over = "UDP" if isinstance(protocol, dns.DNSDatagramProtocol) else "TCP"
        for query in message.queries:
            print(f"query {query.name} over {over}", file=sys.stderr, flush=True)
        return server.DNSServerFactory.handleQuery(self, message, protocol, address)

    def sendReply(self, protocol, message, address):
        # As real servers do: an answer over 512 bytes does not go over UDP,
        # a truncated empty one does, and the client asks again over TCP.
        if isinstance(protocol, dns.DNSDatagramProtocol) and len(message.toStr()) > 512:
            message.answers, message.authority, message.additional = [], [], []
            message.trunc = 1
        return server.DNSServerFactory.sendReply(self, protocol, message, address)


def main(path: str) -> None:
    factory = LoggingFactory(authorities=[FileAuthority(path)])
    # UDP and TCP on the same port: a client asks again over TCP when the
    # UDP answer is truncated (more than 512 bytes).
    for _ in range(20):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        number = udp.getHost().port
        try:
            reactor.listenTCP(number, factory, interface="127.0.0.1")
        except CannotListenError:
            udp.stopListening()
            continue
        print(f"listening {number}", flush=True)
        reactor.run()
        return
    raise SystemExit("no port free for both UDP and TCP")


if __name__ == "__main__":
    main(sys.argv[1])

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
NXDOMAIN.
"""

from __future__ import annotations

import json
import sys

from twisted.internet import defer, reactor
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


def main(path: str) -> None:
    factory = server.DNSServerFactory(authorities=[FileAuthority(path)])
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    print(f"listening {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1])

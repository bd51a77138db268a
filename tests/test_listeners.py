"""
Tests for the listeners of L{txbalancer.Balancer}: every endpoint string
goes to Twisted's parser, so unix:, systemd: and endpoint plugins work.
"""

from __future__ import annotations

import os

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from txbalancer.balancer import Balancer
from txbalancer.downstream import HTTPServerFactory
from txbalancer.settings import ListenerConfig, PoolConfig, build
from txbalancer.testing import backendSpecs


def balancerListeningOn(*endpoints: str) -> tuple[Balancer, MemoryReactorClock]:
    """A started balancer on a fake reactor, listening on C{endpoints}."""
    reactor = MemoryReactorClock()
    config = build(
        [PoolConfig(backends=backendSpecs("127.0.0.1:3001"))],
        {"no-health-checks": True},
        [ListenerConfig(e) for e in endpoints],
    )
    balancer = Balancer(config=config, reactor=reactor)
    balancer.listen()
    balancer.startService()
    return balancer, reactor


class UNIXListenerTests(SynchronousTestCase):
    def test_unixEndpoint(self) -> None:
        """A unix: listener listens on that path with its mode, serving the balancer's HTTP."""
        path = os.path.join(self.mktemp(), "lb.sock")
        balancer, reactor = balancerListeningOn(f"unix:{path}:mode=660:lockfile=0")
        (address, factory, backlog, mode, wantPID) = reactor.unixServers[0]
        self.assertEqual((address, mode, wantPID), (path, 0o660, False))
        self.assertIsInstance(factory, HTTPServerFactory)
        self.assertEqual(len(reactor.tcpServers), 0)
        self.successResultOf(balancer.stopService())

    def test_unixBesideTCP(self) -> None:
        """A unix: listener and a tcp: one work side by side, each with its own factory."""
        path = os.path.join(self.mktemp(), "lb.sock")
        balancer, reactor = balancerListeningOn(f"unix:{path}", "tcp:8080:interface=127.0.0.1")
        self.assertEqual(reactor.unixServers[0][0], path)
        self.assertEqual(reactor.tcpServers[0][0], 8080)
        self.assertEqual(reactor.tcpServers[0][3], "127.0.0.1")
        self.assertIsNot(reactor.unixServers[0][1], reactor.tcpServers[0][1])
        self.successResultOf(balancer.stopService())

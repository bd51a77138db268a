"""
Tests for txbalancer.diff: what changed between two configurations.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from txbalancer.config import parse_backends
from txbalancer.diff import diffBackends, diffConfigs
from txbalancer.settings import BalancerConfig, PoolConfig, RouteConfig


def specs(text: str, filename: str = "b.txt"):
    return parse_backends(text.replace(";", "\n") + "\n", filename)


def addresses(items) -> list[str]:
    return [
        (item[1] if isinstance(item, tuple) else item).address for item in items
    ]


# (old lines, new lines, added, removed, changed, unchanged); ";" separates lines
BACKEND_CASES = [
    ("a:1", "a:1", [], [], [], ["a:1"]),
    ("a:1", "a:1;b:2", ["b:2"], [], [], ["a:1"]),
    ("a:1;b:2", "b:2", [], ["a:1"], [], ["b:2"]),
    ("a:1", "a:1 weight=3", [], [], ["a:1"], []),
    ("a:1", "a:1 max_conns=10", [], [], ["a:1"], []),
    ("a:1", "a:1 backup", [], [], ["a:1"], []),
    ("a:1", "a:1 priority=2", [], [], ["a:1"], []),
    ("a:1 backup", "a:1 priority=1", [], [], [], ["a:1"]),
    ("https://a:1", "https://a:1 tls_verify=off", [], [], ["a:1"], []),
    ("http://a:1", "https://a:1", ["a:1"], ["a:1"], [], []),
    ("A:1", "a:1", [], [], [], ["a:1"]),
    ("a:1;b:2;c:3", "c:3 weight=2;d:4;a:1", ["d:4"], ["b:2"], ["c:3"], ["a:1"]),
    ("a:1", "# moved down;;a:1", [], [], [], ["a:1"]),
]


@pytest.mark.parametrize("old, new, added, removed, changed, unchanged", BACKEND_CASES)
def test_diffBackends(old, new, added, removed, changed, unchanged) -> None:
    """Backends are matched by scheme, host and port; a different weight, max_conns, priority or tls_verify is a change, a different line is not."""
    diff = diffBackends(specs(old), specs(new))
    assert addresses(diff.added) == added
    assert addresses(diff.removed) == removed
    assert addresses(diff.changed) == changed
    assert addresses(diff.unchanged) == unchanged
    assert diff.empty == (not added and not removed and not changed)


def test_changedPairsOldAndNew() -> None:
    """A changed backend comes as its old spec and its new one."""
    diff = diffBackends(specs("a:1"), specs("a:1 weight=5"))
    ((old, new),) = diff.changed
    assert (old.weight, new.weight) == (1, 5)


def config(pools=(), routes=(), **settings) -> BalancerConfig:
    return BalancerConfig(pools=tuple(pools), routes=tuple(routes), **settings)


def pool(name: str, lines: str = "a:1", **settings) -> PoolConfig:
    return PoolConfig(name=name, backends=specs(lines), **settings)


# (old config, new config, added pools, removed pools, changed pools,
#  routes changed, balancer settings changed)
CONFIG_CASES = [
    (config([pool("web")]), config([pool("web")]), [], [], {}, False, ()),
    (config([pool("web")]), config([pool("web"), pool("api")]), ["api"], [], {}, False, ()),
    (config([pool("web"), pool("api")]), config([pool("web")]), [], ["api"], {}, False, ()),
    (
        config([pool("web")]),
        config([pool("web", "a:1;b:2")]),
        [], [], {"web": ("+1 -0 ~0 =1", ())}, False, (),
    ),
    (
        config([pool("web")]),
        config([pool("web", strategy="least-conn", backendTimeout=5.0)]),
        [], [], {"web": ("+0 -0 ~0 =1", ("strategy", "backendTimeout"))}, False, (),
    ),
    (
        config([pool("web")]),
        config([pool("web", source="srv:_http._tcp.web.test")]),
        [], [], {"web": ("+0 -0 ~0 =1", ("source",))}, False, (),
    ),
    (
        config([pool("web"), pool("api")], [RouteConfig("api", path="/api/")]),
        config([pool("web"), pool("api")], [RouteConfig("api", path="/v2/")]),
        [], [], {}, True, (),
    ),
    (
        config([pool("web"), pool("api")],
               [RouteConfig("api", path="/api/"), RouteConfig("web")]),
        config([pool("web"), pool("api")],
               [RouteConfig("web"), RouteConfig("api", path="/api/")]),
        [], [], {}, True, (),
    ),
    (
        config([pool("web")], [RouteConfig("web", filename="a.toml", lineno=3)]),
        config([pool("web")], [RouteConfig("web", filename="a.toml", lineno=9)]),
        [], [], {}, False, (),
    ),
    (
        config([pool("web")]),
        config([pool("web")], clientTimeout=5.0, hsts=60),
        [], [], {}, False, ("clientTimeout", "hsts"),
    ),
    (
        config([pool("web")]),
        config([pool("web")], configFile="other.toml"),
        [], [], {}, False, (),
    ),
]


@pytest.mark.parametrize(
    "old, new, added, removed, changed, routes, settings", CONFIG_CASES
)
def test_diffConfigs(old, new, added, removed, changed, routes, settings) -> None:
    """Pools are matched by name, their backends and settings compared; routes are compared in order, ignoring where they were written; balancer settings by value."""
    diff = diffConfigs(old, new)
    assert [p.name for p in diff.added] == added
    assert [p.name for p in diff.removed] == removed
    assert {
        c.name: (c.backends.describe(), c.settings) for c in diff.changed
    } == changed
    assert diff.routes == routes
    assert diff.settings == settings
    assert diff.empty == (
        not added and not removed and not changed and not routes and not settings
    )


def test_poolLookup() -> None:
    """ConfigDiff.pool names the change of one pool, or None when it did not change."""
    diff = diffConfigs(
        config([pool("web"), pool("api")]),
        config([pool("web", "a:1 weight=2"), pool("api")]),
    )
    assert diff.pool("web").backends.describe() == "+0 -0 ~1 =0"
    assert diff.pool("api") is None


def test_pure() -> None:
    """Importing the diff imports no reactor."""
    code = (
        "import sys, txbalancer.diff; "
        "sys.exit('twisted.internet.reactor' in sys.modules)"
    )
    assert subprocess.call([sys.executable, "-c", code]) == 0

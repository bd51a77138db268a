"""
What changed between the configuration that runs and a new one.

A reload (SIGHUP, C{POST /reload}) and a change of DNS SRV records both
end here: L{diffConfigs} compares two L{txbalancer.settings.BalancerConfig}
values, L{diffBackends} two sets of backends, and the balancer applies the
result in place (L{txbalancer.balancer.Balancer.apply}).

Backends are compared by their identity (L{txbalancer.config.BackendSpec.key}:
scheme, host, port).  A backend with the same identity whose C{weight},
C{max_conns}, C{priority} or C{tls_verify} differ is I{changed} (updated in
place, keeping its health, counters and connections); where it was written
(file, line) does not count.

Pure: no reactor, no I/O.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from txbalancer.config import BackendSpec

__all__ = [
    "BackendsDiff",
    "ConfigDiff",
    "PoolDiff",
    "diffBackends",
    "diffConfigs",
    "diffPools",
]

# What a backend's spec says about how to treat it; a difference here is a
# change, anything else of the spec (where it was written) is not.
_BACKEND_FIELDS = ("weight", "max_conns", "priority", "tls_verify")

# PoolConfig fields that are not settings of the pool but its backends.
_NOT_POOL_SETTINGS = ("name", "backends")

# BalancerConfig fields that are not balancer-wide settings: the pools and
# routes are compared on their own, and which file it came from is no
# setting.
_NOT_BALANCER_SETTINGS = ("pools", "routes", "configFile")


@dataclass(frozen=True)
class BackendsDiff:
    """
    How one pool's backends changed.

    @ivar added: specs of the new backends, in the new order.
    @ivar removed: specs of the backends that are gone, in the old order.
    @ivar changed: C{(old, new)} specs of the same backend whose treatment
        differs.
    @ivar unchanged: C{(old, new)} specs of the same backend treated the
        same (the new spec may say another line).
    """

    added: tuple[BackendSpec, ...] = ()
    removed: tuple[BackendSpec, ...] = ()
    changed: tuple[tuple[BackendSpec, BackendSpec], ...] = ()
    unchanged: tuple[tuple[BackendSpec, BackendSpec], ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def describe(self) -> str:
        """
        C{"+1 -2 ~1 =3"}: how many were added, removed, changed, unchanged.
        """
        return (
            f"+{len(self.added)} -{len(self.removed)} "
            f"~{len(self.changed)} ={len(self.unchanged)}"
        )


@dataclass(frozen=True)
class PoolDiff:
    """
    How one pool present in both configurations changed.

    @ivar settings: the names (L{txbalancer.settings.PoolConfig} attributes)
        of the settings whose values differ, in declaration order.
    """

    name: str
    backends: BackendsDiff = BackendsDiff()
    settings: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self.backends.empty and not self.settings


@dataclass(frozen=True)
class ConfigDiff:
    """
    How a whole configuration changed.

    @ivar added: the new pools' configs.
    @ivar removed: the configs of the pools that are gone.
    @ivar changed: a L{PoolDiff} for each pool in both whose backends or
        settings differ (pools that did not change are left out).
    @ivar routes: whether the table of routes differs (order counts: the
        first match wins).
    @ivar settings: the names of the balancer-wide settings
        (L{txbalancer.settings.BalancerConfig} attributes, listeners
        included) whose values differ.
    """

    added: tuple[Any, ...] = ()
    removed: tuple[Any, ...] = ()
    changed: tuple[PoolDiff, ...] = ()
    routes: bool = False
    settings: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (
            self.added or self.removed or self.changed or self.routes or self.settings
        )

    def summary(self) -> dict[str, Any]:
        """
        What changed, as plain data (the answer of C{POST /reload}): pool
        names added and removed, per changed pool the addresses added,
        removed and changed and the settings that changed, whether the
        routes changed, and the balancer settings that changed.
        """
        return {
            "pools_added": [p.name for p in self.added],
            "pools_removed": [p.name for p in self.removed],
            "pools_changed": {
                change.name: {
                    "added": [s.address for s in change.backends.added],
                    "removed": [s.address for s in change.backends.removed],
                    "changed": [new.address for _, new in change.backends.changed],
                    "settings": list(change.settings),
                }
                for change in self.changed
            },
            "routes_changed": self.routes,
            "settings_changed": list(self.settings),
        }

    def pool(self, name: str) -> Optional[PoolDiff]:
        """
        The L{PoolDiff} of the pool called C{name}, or L{None} when it did
        not change (or is not in both).
        """
        for change in self.changed:
            if change.name == name:
                return change
        return None


def _treatment(spec: BackendSpec) -> tuple[Any, ...]:
    return tuple(getattr(spec, name) for name in _BACKEND_FIELDS)


def diffBackends(
    old: Iterable[BackendSpec], new: Iterable[BackendSpec]
) -> BackendsDiff:
    """
    How the backends C{new} differ from C{old}, matched by identity.
    """
    old = tuple(old)
    new = tuple(new)
    before = {spec.key: spec for spec in old}
    after = {spec.key: spec for spec in new}
    added = tuple(spec for spec in new if spec.key not in before)
    removed = tuple(spec for spec in old if spec.key not in after)
    changed = []
    unchanged = []
    for spec in new:
        previous = before.get(spec.key)
        if previous is None:
            continue
        if _treatment(previous) != _treatment(spec):
            changed.append((previous, spec))
        else:
            unchanged.append((previous, spec))
    return BackendsDiff(added, removed, tuple(changed), tuple(unchanged))


def _fieldsThatDiffer(old: Any, new: Any, skip: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(
        f.name
        for f in dataclasses.fields(old)
        if f.name not in skip and getattr(old, f.name) != getattr(new, f.name)
    )


def diffPools(old: Any, new: Any) -> PoolDiff:
    """
    How pool config C{new} differs from C{old} (the same pool by name).
    """
    return PoolDiff(
        new.name,
        diffBackends(old.backends, new.backends),
        _fieldsThatDiffer(old, new, _NOT_POOL_SETTINGS),
    )


def _routeKey(route: Any) -> tuple[Any, ...]:
    # Where a route was written is no part of what it does.
    return (route.pool, route.host, route.path, route.stripPrefix)


def diffConfigs(old: Any, new: Any) -> ConfigDiff:
    """
    How configuration C{new} differs from C{old}: pools by name, backends
    by identity, routes in order, settings by value.
    """
    oldPools = {pool.name: pool for pool in old.pools}
    newPools = {pool.name: pool for pool in new.pools}
    added = tuple(pool for pool in new.pools if pool.name not in oldPools)
    removed = tuple(pool for pool in old.pools if pool.name not in newPools)
    changed = []
    for pool in new.pools:
        if pool.name in oldPools:
            change = diffPools(oldPools[pool.name], pool)
            if not change.empty:
                changed.append(change)
    routes = [_routeKey(r) for r in old.routes] != [_routeKey(r) for r in new.routes]
    return ConfigDiff(
        added,
        removed,
        tuple(changed),
        routes,
        _fieldsThatDiffer(old, new, _NOT_BALANCER_SETTINGS),
    )

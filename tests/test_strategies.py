"""
Tests for the strategies in txbalancer.choosers, each alone and all of them
against the same properties.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any, Callable

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from txbalancer.backend import Backend
from txbalancer.choosers import (
    STRATEGIES,
    IPHash,
    LeastConn,
    LeastTime,
    PowerOfTwoChoices,
    Random,
    RoundRobin,
    hrwScore,
)
from txbalancer.config import BackendSpec

NAMES = ["round-robin", "least-conn", "ip-hash", "random", "p2c", "least-time"]


class FakeSpec:
    def __init__(self, weight: float) -> None:
        self.weight = weight


class FakeBackend:
    """
    What a strategy may read of a backend, and nothing else.
    """

    def __init__(self, address: str, weight: float = 1, active: int = 0) -> None:
        self.address = address
        self.weight = weight
        self.active = active
        self.spec = FakeSpec(weight)

    def __repr__(self) -> str:
        return f"<FakeBackend {self.address} w={self.weight} a={self.active}>"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def pool(*weights: float, active: Sequence[int] = ()) -> list[Any]:
    backends = [FakeBackend(f"127.0.0.1:{3001 + i}", w) for i, w in enumerate(weights)]
    for backend, n in zip(backends, active):
        backend.active = n
    return backends


def letters(picks: Sequence[Any], backends: Sequence[Any]) -> str:
    return " ".join("abcdefghijklmnop"[backends.index(b)] for b in picks)


def build(name: str, seed: int = 0, clock: FakeClock | None = None) -> Any:
    return STRATEGIES[name](random=random.Random(seed), clock=clock or FakeClock())


def keys(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [
        f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}."
        f"{rng.randrange(1, 255)}"
        for _ in range(n)
    ]


def runLoad(
    strategy: Any,
    backends: Sequence[Any],
    requests: int,
    latency: Callable[[Any], float],
    clock: FakeClock,
    interval: float = 0.001,
    keyList: Sequence[str] | None = None,
) -> Counter:
    """
    One request every C{interval} seconds; each holds its backend's
    C{active} for C{latency(backend)} seconds and is then observed.
    """
    inFlight: list[tuple[float, Any, float]] = []
    counts: Counter = Counter()
    for i in range(requests):
        clock.advance(interval)
        still = []
        for done, backend, took in inFlight:
            if done <= clock.now:
                backend.active -= 1
                strategy.observe(backend, took)
            else:
                still.append((done, backend, took))
        inFlight = still
        backend = strategy.choose(backends, keyList[i] if keyList else None)
        backend.active += 1
        counts[backend] += 1
        took = latency(backend)
        inFlight.append((clock.now + took, backend, took))
    return counts


# -- the registry and the interface


def test_registry_names() -> None:
    """The registry holds the six --strategy names, each class under its own name."""
    assert sorted(STRATEGIES) == sorted(NAMES)
    for name, cls in STRATEGIES.items():
        assert cls.name == name


def test_descriptions_are_one_line() -> None:
    """Every strategy has a short one-line description for --help."""
    for cls in STRATEGIES.values():
        assert cls.description
        assert "\n" not in cls.description
        assert len(cls.description) < 100


@pytest.mark.parametrize("name", NAMES)
def test_uniform_construction(name: str) -> None:
    """Every strategy builds with no arguments and with random= and clock=."""
    for strategy in (
        STRATEGIES[name](),
        STRATEGIES[name](random=random.Random(1), clock=FakeClock()),
    ):
        backends = pool(1, 2)
        assert strategy.choose(backends, "127.0.0.9") in backends
        assert strategy.choose(backends) in backends
        strategy.observe(backends[0], 0.01)
        strategy.forget(backends[0])
        strategy.forget(backends[0])


@pytest.mark.parametrize("name", NAMES)
def test_real_backends(name: str) -> None:
    """Strategies work on real Backend objects built from BackendSpec."""
    backends = [
        Backend(BackendSpec(host="127.0.0.1", port=3001 + i, weight=w))
        for i, w in enumerate([1, 2, 3])
    ]
    strategy = build(name)
    for key in keys(20):
        choice = strategy.choose(backends, key)
        assert choice in backends
        strategy.observe(choice, 0.01)


def test_import_is_pure() -> None:
    """Importing choosers leaves the reactor (and the rest of txbalancer) unimported."""
    code = (
        "import sys, json, txbalancer.choosers; "
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.startswith(('twisted', 'txbalancer')))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    modules = json.loads(out)
    assert "twisted.internet.reactor" not in modules
    assert sorted(modules) == ["txbalancer", "txbalancer.choosers", "txbalancer.interfaces"]


# -- round robin


def test_round_robin_ignores_key() -> None:
    """Round robin gives the same smooth sequence whatever the key."""
    backends = pool(5, 1, 1)
    rr = RoundRobin()
    picks = [rr.choose(backends, k) for k in keys(7)]
    assert letters(picks, backends) == "a a b a c a a"


def test_round_robin_float_weights() -> None:
    """Round robin honours fractional effective weights (slow start)."""
    backends = pool(0.5, 1.5)
    rr = RoundRobin()
    counts = Counter(rr.choose(backends) for _ in range(400))
    assert counts[backends[0]] == 100
    assert counts[backends[1]] == 300


# -- least-conn


def test_least_conn_idle_rotates() -> None:
    """With nothing in flight, least-conn takes the backends in turn."""
    backends = pool(1, 1, 1)
    lc = LeastConn()
    picks = [lc.choose(backends) for _ in range(7)]
    assert letters(picks, backends) == "a b c a b c a"


def test_least_conn_ties_rotate_not_list_order() -> None:
    """Tied backends take turns, the busy one gets none and its turn is not its neighbour's."""
    backends = pool(1, 1, 1, 1, active=[0, 3, 0, 0])
    lc = LeastConn()
    picks = [lc.choose(backends) for _ in range(7)]
    assert letters(picks, backends) == "a c d a c d a"


def test_least_conn_per_weight() -> None:
    """In flight is divided by weight: 3 in flight at weight 4 beats 1 at weight 1."""
    backends = pool(1, 4, active=[1, 3])
    lc = LeastConn()
    assert [lc.choose(backends) for _ in range(3)] == [backends[1]] * 3


def test_least_conn_exact_under_load() -> None:
    """Picks that stay in flight fill the backends in proportion to weight."""
    backends = pool(1, 2, 3)
    lc = LeastConn()
    for _ in range(60):
        lc.choose(backends).active += 1
    assert [b.active for b in backends] == [10, 20, 30]


def test_least_conn_shares_under_load() -> None:
    """Under steady load, least-conn's shares follow the weights."""
    backends = pool(1, 2, 3)
    counts = runLoad(LeastConn(), backends, 6000, lambda b: 0.06, FakeClock())
    for backend in backends:
        assert counts[backend] / 6000 == pytest.approx(backend.weight / 6, abs=0.02)


# -- ip-hash


def test_ip_hash_sticky() -> None:
    """The same key always goes to the same backend."""
    backends = pool(1, 1, 1, 1)
    ih = IPHash()
    for key in keys(50):
        first = ih.choose(backends, key)
        assert all(ih.choose(backends, key) is first for _ in range(5))


def test_ip_hash_matches_reference_score() -> None:
    """The fast path picks the candidate with the highest hrwScore."""
    backends = pool(1, 2, 3, 1, 5)
    ih = IPHash()
    for key in keys(300):
        best = max(backends, key=lambda b: hrwScore(key, b.address, b.weight))
        assert ih.choose(backends, key) is best


def test_ip_hash_known_values() -> None:
    """The hash is pinned: these keys map to these backends in every version and process."""
    backends = [FakeBackend(f"127.0.0.1:{3001 + i}") for i in range(4)]
    backends.append(FakeBackend("[::1]:3005", 2))
    ih = IPHash()
    expected = {
        "127.0.0.2": "[::1]:3005",
        "127.0.0.3": "[::1]:3005",
        "127.0.0.4": "127.0.0.1:3004",
        "10.0.0.1": "127.0.0.1:3002",
        "192.0.2.7": "127.0.0.1:3001",
        "2001:db8::1": "127.0.0.1:3003",
    }
    assert {k: ih.choose(backends, k).address for k in expected} == expected


def test_ip_hash_two_instances_agree() -> None:
    """Two instances over separately built backends send every key to the same address."""
    one = pool(1, 2, 1, 3, 1)
    two = pool(1, 2, 1, 3, 1)
    a, b = IPHash(), IPHash()
    for key in keys(2000):
        assert a.choose(one, key).address == b.choose(two, key).address


def test_ip_hash_two_processes_agree() -> None:
    """Processes with different hash seeds send every key to the same address."""
    keyList = keys(300)
    code = (
        "import json, sys\n"
        "from txbalancer.choosers import IPHash\n"
        "class B:\n"
        "    def __init__(self, address, weight):\n"
        "        self.address, self.weight, self.active = address, weight, 0\n"
        "keys = json.loads(sys.stdin.read())\n"
        "bs = [B(f'127.0.0.1:{3001 + i}', 1 + i % 3) for i in range(7)]\n"
        "ih = IPHash()\n"
        "print(json.dumps([ih.choose(bs, k).address for k in keys]))\n"
    )
    results = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(keyList),
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout
        results.append(json.loads(out))
    here = IPHash()
    local = [FakeBackend(f"127.0.0.1:{3001 + i}", 1 + i % 3) for i in range(7)]
    assert results[0] == results[1] == [here.choose(local, k).address for k in keyList]


def test_ip_hash_adding_a_backend_moves_few_keys() -> None:
    """An 11th backend takes at most 1.5/11 of 10,000 keys, and only for itself."""
    ten = pool(*[1] * 10)
    eleven = ten + [FakeBackend("127.0.0.1:4000")]
    ih = IPHash()
    keyList = keys(10000)
    moved = 0
    for key in keyList:
        before = ih.choose(ten, key)
        after = ih.choose(eleven, key)
        if after is not before:
            moved += 1
            assert after is eleven[-1]
    assert moved <= 10000 * 1.5 / 11
    assert moved >= 10000 * 0.5 / 11


def test_ip_hash_removing_a_backend_moves_only_its_keys() -> None:
    """Removing a backend moves only its own keys, each to that key's second choice."""
    backends = pool(1, 2, 1, 1, 3)
    gone = backends[1]
    rest = [b for b in backends if b is not gone]
    ih = IPHash()
    for key in keys(3000):
        before = ih.choose(backends, key)
        after = ih.choose(rest, key)
        if before is gone:
            ranked = sorted(backends, key=lambda b: hrwScore(key, b.address, b.weight))
            assert after is ranked[-2]
        else:
            assert after is before


def test_ip_hash_down_and_back() -> None:
    """While its backend is out of the candidates a client goes to its next choice, then returns."""
    backends = pool(1, 1, 1, 1)
    ih = IPHash()
    key = "192.0.2.44"
    first = ih.choose(backends, key)
    without = [b for b in backends if b is not first]
    second = ih.choose(without, key)
    assert second is not first
    assert ih.choose(without, key) is second
    assert ih.choose(backends, key) is first


def test_ip_hash_spreads_evenly() -> None:
    """Ten equal backends each get about a tenth of 10,000 keys."""
    backends = pool(*[1] * 10)
    ih = IPHash()
    counts = Counter(ih.choose(backends, k) for k in keys(10000))
    for backend in backends:
        assert 850 <= counts[backend] <= 1150


def test_ip_hash_weighted() -> None:
    """Weights 1, 2, 3 give about 1/6, 2/6, 3/6 of the keys."""
    backends = pool(1, 2, 3)
    ih = IPHash()
    counts = Counter(ih.choose(backends, k) for k in keys(12000))
    for backend in backends:
        assert counts[backend] / 12000 == pytest.approx(backend.weight / 6, abs=0.02)


def test_ip_hash_without_key_is_round_robin() -> None:
    """Without a client address ip-hash falls back to smooth weighted round robin."""
    backends = pool(5, 1, 1)
    ih = IPHash()
    picks = [ih.choose(backends) for _ in range(7)]
    assert letters(picks, backends) == "a a b a c a a"


def test_ip_hash_many_backends() -> None:
    """Hundreds of backends still give a valid, stable choice."""
    backends = [FakeBackend(f"10.0.{i // 250}.{i % 250}:8080") for i in range(500)]
    ih = IPHash()
    for key in keys(20):
        assert ih.choose(backends, key) is ih.choose(list(reversed(backends)), key)


# -- random


def test_random_seeded_is_repeatable() -> None:
    """Two random strategies with the same seed make the same picks."""
    backends = pool(1, 2, 3)
    a = Random(random=random.Random(7))
    b = Random(random=random.Random(7))
    assert [a.choose(backends) for _ in range(50)] == [
        b.choose(backends) for _ in range(50)
    ]


def test_random_weighted_shares() -> None:
    """Weights 1, 2, 3 give about 1/6, 2/6, 3/6 of the picks."""
    backends = pool(1, 2, 3)
    r = Random(random=random.Random(3))
    counts = Counter(r.choose(backends) for _ in range(30000))
    for backend in backends:
        assert counts[backend] / 30000 == pytest.approx(backend.weight / 6, abs=0.015)


def test_random_float_weights() -> None:
    """Fractional weights shape the share the same way."""
    backends = pool(0.1, 0.9)
    r = Random(random=random.Random(3))
    counts = Counter(r.choose(backends) for _ in range(20000))
    assert counts[backends[0]] / 20000 == pytest.approx(0.1, abs=0.015)


# -- p2c


def test_p2c_two_candidates_lighter_wins() -> None:
    """With two candidates both are always drawn, so the lighter always wins."""
    backends = pool(1, 1, active=[5, 0])
    p = PowerOfTwoChoices(random=random.Random(1))
    assert all(p.choose(backends) is backends[1] for _ in range(50))


def test_p2c_load_per_weight() -> None:
    """Load is counted per weight: 4 in flight at weight 8 beats 1 at weight 1."""
    backends = pool(1, 8, active=[1, 4])
    p = PowerOfTwoChoices(random=random.Random(1))
    assert all(p.choose(backends) is backends[1] for _ in range(50))


def test_p2c_never_picks_the_busiest() -> None:
    """The single busiest backend loses every comparison, so it is never picked."""
    backends = pool(1, 1, 1, 1, active=[2, 9, 2, 2])
    p = PowerOfTwoChoices(random=random.Random(5))
    counts = Counter(p.choose(backends) for _ in range(3000))
    assert counts[backends[1]] == 0
    for i in (0, 2, 3):
        assert counts[backends[i]] == pytest.approx(1000, abs=120)


def test_p2c_tie_goes_to_first_pick() -> None:
    """With equal load the first (weighted) draw wins, so shares follow weight."""
    backends = pool(1, 3)
    p = PowerOfTwoChoices(random=random.Random(2))
    counts = Counter(p.choose(backends) for _ in range(20000))
    assert counts[backends[1]] / 20000 == pytest.approx(0.75, abs=0.015)


def test_p2c_seeded_is_repeatable() -> None:
    """Two p2c strategies with the same seed make the same picks."""
    backends = pool(1, 2, 3, active=[1, 0, 2])
    a = PowerOfTwoChoices(random=random.Random(9))
    b = PowerOfTwoChoices(random=random.Random(9))
    assert [a.choose(backends) for _ in range(50)] == [
        b.choose(backends) for _ in range(50)
    ]


# -- least-time


def test_least_time_without_samples_is_least_conn() -> None:
    """Before any sample every cost is zero, so in flight per weight, then rotation, decide."""
    backends = pool(1, 1, 1, active=[0, 3, 0])
    lt = LeastTime(clock=FakeClock())
    picks = [lt.choose(backends) for _ in range(6)]
    assert letters(picks, backends) == "a c a c a c"


def test_least_time_prefers_faster() -> None:
    """The backend with the lower latency estimate wins."""
    backends = pool(1, 1)
    lt = LeastTime(clock=FakeClock())
    lt.observe(backends[0], 0.2)
    lt.observe(backends[1], 0.02)
    assert [lt.choose(backends) for _ in range(3)] == [backends[1]] * 3


def test_least_time_counts_in_flight_and_weight() -> None:
    """Cost is latency x (in flight + 1) / weight."""
    fast, slow = pool(1, 1)
    lt = LeastTime(clock=FakeClock())
    lt.observe(fast, 0.02)
    lt.observe(slow, 0.1)
    fast.active = 5  # 0.02 * 6 = 0.12 > 0.1
    assert lt.choose([fast, slow]) is slow
    slow.weight = 0.5  # 0.1 * 1 / 0.5 = 0.2 > 0.12
    assert lt.choose([fast, slow]) is fast


def test_least_time_peak_resets_at_once() -> None:
    """A sample above the estimate replaces it immediately."""
    clock = FakeClock()
    (b,) = pool(1)
    lt = LeastTime(clock=clock)
    lt.observe(b, 0.01)
    clock.advance(1)
    lt.observe(b, 0.5)
    assert lt.latency(b) == 0.5


def test_least_time_lower_samples_pull_down() -> None:
    """A lower sample moves the estimate by 1 - exp(-elapsed/decay)."""
    clock = FakeClock()
    (b,) = pool(1)
    lt = LeastTime(clock=clock, decay=10.0)
    lt.observe(b, 1.0)
    clock.advance(10.0)
    lt.observe(b, 0.5)
    w = math.exp(-1)
    assert lt.latency(b) == pytest.approx(1.0 * w + 0.5 * (1 - w))


def test_least_time_estimate_decays() -> None:
    """Left alone, an estimate decays towards zero with the time constant."""
    clock = FakeClock()
    (b,) = pool(1)
    lt = LeastTime(clock=clock, decay=10.0)
    assert lt.latency(b) is None
    lt.observe(b, 1.0)
    clock.advance(20.0)
    assert lt.latency(b) == pytest.approx(math.exp(-2))


def test_least_time_slow_backend_is_retried() -> None:
    """A backend that was slow and left alone is tried again once its estimate decays."""
    clock = FakeClock()
    slow, fast = pool(1, 1)
    lt = LeastTime(clock=clock, decay=10.0)
    lt.observe(slow, 1.0)
    lt.observe(fast, 0.1)
    picks = []
    for _ in range(60):
        clock.advance(1.0)
        choice = lt.choose([slow, fast])
        picks.append(choice)
        lt.observe(choice, 0.1)
    assert slow not in picks[:10]
    assert slow in picks


def test_least_time_new_backend_starts_at_median() -> None:
    """A backend without samples counts as the median of the others: not flooded, not starved."""
    clock = FakeClock()
    a, b, c, new = pool(1, 1, 1, 1)
    lt = LeastTime(clock=clock)
    lt.observe(a, 0.1)
    lt.observe(b, 0.2)
    lt.observe(c, 0.3)
    assert lt.choose([a, c, new]) is a
    a.active = 2  # 0.1 * 3 = 0.3
    assert lt.choose([a, c, new]) is new
    new.active = 1  # 0.2 * 2 = 0.4
    assert lt.choose([a, c, new]) in (a, c)


def test_least_time_forget() -> None:
    """Forgetting a backend drops its estimate."""
    (b,) = pool(1)
    lt = LeastTime(clock=FakeClock())
    lt.observe(b, 0.3)
    lt.forget(b)
    assert lt.latency(b) is None
    lt.forget(b)


def test_least_time_shares_under_load() -> None:
    """With equal latencies, least-time's shares follow the weights."""
    backends = pool(1, 2, 3)
    clock = FakeClock()
    lt = LeastTime(clock=clock)
    counts = runLoad(lt, backends, 6000, lambda b: 0.06, clock)
    for backend in backends:
        assert counts[backend] / 6000 == pytest.approx(backend.weight / 6, abs=0.03)


@pytest.mark.parametrize("name", ["least-conn", "p2c", "least-time"])
def test_load_aware_avoid_slow_backend(name: str) -> None:
    """A backend 50 ms slower than the others gets far less than round robin's third."""
    backends = pool(1, 1, 1)
    clock = FakeClock()
    strategy = build(name, seed=4, clock=clock)
    slow = backends[1]
    counts = runLoad(
        strategy,
        backends,
        5000,
        lambda b: 0.055 if b is slow else 0.005,
        clock,
        interval=0.002,
    )
    assert counts[slow] / 5000 < 0.2


# -- properties of every strategy

weightsSt = st.lists(
    st.one_of(
        st.integers(min_value=1, max_value=1000),
        st.floats(min_value=0.001, max_value=1000),
    ),
    min_size=0,
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    weights=weightsSt,
    seed=st.integers(min_value=0, max_value=2**32),
    data=st.data(),
)
def test_choice_is_a_candidate(
    name: str, weights: list[float], seed: int, data
) -> None:
    """Whatever the weights, load, key, history and mask, the choice is a candidate, None if none."""
    backends = pool(*weights)
    clock = FakeClock()
    strategy = build(name, seed, clock)
    key = st.one_of(st.none(), st.text(max_size=40))
    for _ in range(data.draw(st.integers(min_value=1, max_value=15))):
        for b in backends:
            b.active = data.draw(st.integers(min_value=0, max_value=50))
        mask = data.draw(
            st.lists(st.booleans(), min_size=len(backends), max_size=len(backends))
        )
        candidates = [b for b, keep in zip(backends, mask) if keep]
        choice = strategy.choose(candidates, data.draw(key))
        if candidates:
            assert choice in candidates
            clock.advance(data.draw(st.floats(min_value=0, max_value=100)))
            strategy.observe(choice, data.draw(st.floats(min_value=0, max_value=60)))
        else:
            assert choice is None
        if backends and data.draw(st.booleans()):
            strategy.forget(data.draw(st.sampled_from(backends)))


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    weights=st.lists(st.integers(min_value=1, max_value=8), min_size=2, max_size=5),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_weights_shape_the_share(name: str, weights: list[int], seed: int) -> None:
    """Under steady load, a backend with 3x another's weight gets clearly more requests."""
    heavy = max(range(len(weights)), key=weights.__getitem__)
    light = min(range(len(weights)), key=weights.__getitem__)
    assume(weights[heavy] >= 3 * weights[light])
    backends = pool(*weights)
    clock = FakeClock()
    strategy = build(name, seed, clock)
    counts = runLoad(
        strategy,
        backends,
        3000,
        lambda b: 0.08,
        clock,
        keyList=keys(3000, seed),
    )
    assert counts[backends[heavy]] > 1.5 * counts[backends[light]]


@settings(max_examples=300, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(
            st.one_of(
                st.integers(min_value=1, max_value=100),
                st.floats(min_value=0.01, max_value=100),
            ),
            st.integers(min_value=0, max_value=100),
        ),
        min_size=1,
        max_size=10,
    ),
    turns=st.integers(min_value=0, max_value=20),
)
def test_least_conn_never_picks_a_busier_backend(
    pairs: list[tuple[float, int]], turns: int
) -> None:
    """Least-conn never picks a backend with more in flight per weight than another candidate."""
    backends = [
        FakeBackend(f"127.0.0.1:{3001 + i}", w, a) for i, (w, a) in enumerate(pairs)
    ]
    lc = LeastConn()
    for _ in range(turns):
        lc.choose(backends)
    choice = lc.choose(backends)
    load = choice.active / choice.weight
    assert all(load <= b.active / b.weight * (1 + 1e-12) for b in backends)

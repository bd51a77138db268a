"""
Tests for txbalancer.choosers: smooth weighted round robin.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from txbalancer.backend import Backend
from txbalancer.choosers import STRATEGIES, RoundRobin
from txbalancer.config import BackendSpec


def backends(*weights: int) -> list[Backend]:
    return [
        Backend(BackendSpec(host="127.0.0.1", port=3001 + i, weight=w))
        for i, w in enumerate(weights)
    ]


def names(picks: list[Backend], pool: list[Backend]) -> str:
    return " ".join("abcdefghij"[pool.index(b)] for b in picks)


def test_smooth_weights_5_1_1() -> None:
    """Weights 5, 1, 1 give exactly a a b a c a a, and repeat."""
    pool = backends(5, 1, 1)
    rr = RoundRobin()
    picks = [rr.choose(pool) for _ in range(14)]
    assert names(picks, pool) == "a a b a c a a a a b a c a a"


def test_equal_weights_rotate() -> None:
    """Equal weights rotate through the backends in order."""
    pool = backends(1, 1, 1)
    rr = RoundRobin()
    assert names([rr.choose(pool) for _ in range(7)], pool) == "a b c a b c a"


def test_empty_gives_none() -> None:
    """No candidates, no choice."""
    assert RoundRobin().choose([]) is None


def test_single_candidate() -> None:
    """A single candidate is always chosen."""
    pool = backends(3)
    rr = RoundRobin()
    assert [rr.choose(pool) for _ in range(3)] == pool * 3


def test_excluded_backends_never_chosen() -> None:
    """A backend left out of the candidates (already tried) is never picked."""
    pool = backends(1, 1, 1)
    rr = RoundRobin()
    candidates = [pool[0], pool[2]]
    picks = [rr.choose(candidates) for _ in range(10)]
    assert pool[1] not in picks
    assert set(picks) == {pool[0], pool[2]}


def test_forget_drops_state() -> None:
    """Forgetting a backend drops its running score."""
    pool = backends(1, 1)
    rr = RoundRobin()
    rr.choose(pool)
    rr.forget(pool[0])
    rr.forget(pool[0])
    assert id(pool[0]) not in rr._current


def test_registered() -> None:
    """round-robin is the name the command line uses."""
    assert STRATEGIES["round-robin"] is RoundRobin


weightLists = st.lists(st.integers(min_value=1, max_value=20), min_size=0, max_size=8)


@given(weightLists, st.integers(min_value=0, max_value=50), st.data())
def test_choice_is_a_candidate(weights: list[int], warmup: int, data) -> None:
    """Whatever the set and history, the choice is one of the candidates, None if empty."""
    pool = backends(*weights)
    rr = RoundRobin()
    for _ in range(warmup):
        if pool:
            rr.choose(pool)
    mask = data.draw(st.lists(st.booleans(), min_size=len(pool), max_size=len(pool)))
    candidates = [b for b, keep in zip(pool, mask) if keep]
    choice = rr.choose(candidates)
    if candidates:
        assert choice in candidates
    else:
        assert choice is None


@given(st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=8),
       st.integers(min_value=1, max_value=4))
def test_shares_exact_per_cycle(weights: list[int], cycles: int) -> None:
    """Over each full cycle of sum(weights) picks, every backend gets exactly its weight."""
    pool = backends(*weights)
    rr = RoundRobin()
    total = sum(weights)
    for _ in range(cycles):
        counts = Counter(rr.choose(pool) for _ in range(total))
        assert [counts[b] for b in pool] == weights

"""Selection rules against brute force over small random fronts."""
import itertools
import random

import pytest

from pyevo.search.local import BlockSearchResult, Candidate, pareto_front
from pyevo.search.select import BudgetError, select_block_budget, select_budget, select_diffnas


def _result(name: str, rng: random.Random, size: int = 7) -> BlockSearchResult:
    evaluated = [Candidate((i,), f"g{i}", rng.uniform(0.001, 1.0), rng.uniform(0.1, 5.0)) for i in range(size)]
    teacher = max(evaluated, key=lambda c: c.latency_ms)
    return BlockSearchResult(name, teacher, pareto_front(evaluated), evaluated, [])


def test_pareto_front_is_the_non_dominated_set():
    rng = random.Random(1)
    cands = [Candidate((i,), str(i), rng.random(), rng.random()) for i in range(40)]
    front = pareto_front(cands)
    dominated = {c for c in cands for d in cands
                 if d.nsr <= c.nsr and d.latency_ms <= c.latency_ms and (d.nsr, d.latency_ms) != (c.nsr, c.latency_ms)}
    assert set(front) == set(cands) - dominated
    assert [c.latency_ms for c in front] == sorted(c.latency_ms for c in front)


@pytest.mark.parametrize("seed", range(6))
def test_budget_knapsack_matches_brute_force(seed):
    rng = random.Random(seed)
    results = {f"b{i}": _result(f"b{i}", rng) for i in range(4)}
    budget = rng.uniform(3.0, 10.0)
    best = None
    for combo in itertools.product(*(r.evaluated for r in results.values())):
        if sum(c.latency_ms for c in combo) <= budget:
            value = sum(c.nsr for c in combo)
            best = value if best is None else min(best, value)
    if best is None:
        with pytest.raises(BudgetError):
            select_budget(results, budget)
        return
    picks = select_budget(results, budget, resolution=20000)
    assert sum(p.latency_ms for p in picks.values()) <= budget
    # Rounding latencies up to the grid may cost a little optimality, never feasibility.
    assert sum(p.nsr for p in picks.values()) <= best + 0.05


def test_budget_below_the_fastest_student_is_an_error():
    rng = random.Random(3)
    results = {f"b{i}": _result(f"b{i}", rng) for i in range(3)}
    fastest = sum(r.front[0].latency_ms for r in results.values())
    with pytest.raises(BudgetError, match="impossible"):
        select_budget(results, 0.9 * fastest)


def test_diffnas_picks_the_fastest_candidate_within_slack():
    t = Candidate((0,), "t", 0.10, 4.0)
    cands = [t, Candidate((1,), "a", 0.14, 2.0), Candidate((2,), "b", 0.20, 1.0), Candidate((3,), "c", 0.05, 3.0)]
    result = BlockSearchResult("x", t, pareto_front(cands), cands, [])
    assert select_diffnas({"x": result}, slack=1.5)["x"].code == "a"
    assert select_diffnas({"x": result}, slack=2.0)["x"].code == "b"
    assert select_diffnas({"x": result}, slack=1.0)["x"].code == "c"


def test_block_budget_picks_lowest_nsr_under_the_fraction():
    t = Candidate((0,), "t", 0.10, 4.0)
    cands = [t, Candidate((1,), "a", 0.14, 2.0), Candidate((2,), "b", 0.20, 1.0)]
    result = BlockSearchResult("x", t, pareto_front(cands), cands, [])
    assert select_block_budget({"x": result}, 0.5)["x"].code == "a"
    assert select_block_budget({"x": result}, 0.3)["x"].code == "b"
    with pytest.raises(BudgetError, match="x"):
        select_block_budget({"x": result}, 0.2)

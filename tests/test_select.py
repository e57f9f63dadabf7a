"""Selection rules against brute force over small random fronts."""
import itertools
import math
import random

import pytest

from pyevo.search.local import BlockSearchResult, Candidate, pareto_front
from pyevo.search.select import (BudgetError, Cost, LatencyGuard, meet_cost_caps, select_block_budget, select_budget,
                                 select_diffnas)


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
            value = sum(c.nsr / r.teacher.nsr for c, r in zip(combo, results.values()))
            best = value if best is None else min(best, value)
    if best is None:
        with pytest.raises(BudgetError):
            select_budget(results, budget)
        return
    picks = select_budget(results, budget, resolution=20000)
    assert sum(p.latency_ms for p in picks.values()) <= budget
    # Rounding latencies up to the grid may cost a little optimality, never feasibility.
    assert sum(p.nsr / results[n].teacher.nsr for n, p in picks.items()) <= best + 0.05


def test_budget_weighs_each_blocks_nsr_against_its_teacher_shaped_candidates():
    # Block a's supernet is ten times noisier than b's: b's fast candidate adds less raw NSR than a's but
    # triples b's, so under one scale b keeps its teacher shape.
    a_teacher, b_teacher = Candidate((0,), "at", 1.0, 2.0), Candidate((0,), "bt", 0.1, 2.0)
    a_fast, b_fast = Candidate((1,), "af", 1.5, 1.0), Candidate((1,), "bf", 0.3, 1.0)
    results = {"a": BlockSearchResult("a", a_teacher, pareto_front([a_teacher, a_fast]), [a_teacher, a_fast], []),
               "b": BlockSearchResult("b", b_teacher, pareto_front([b_teacher, b_fast]), [b_teacher, b_fast], [])}
    # 3.1 ms: one block keeps its teacher shape. Raw NSR would keep a's (1.0 + 0.3 < 1.5 + 0.1); relative NSR
    # keeps b's (1.0 + 3.0 > 1.5 + 1.0).
    assert select_budget(results, 3.1) == {"a": a_fast, "b": b_teacher}


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


def _costed(rng: random.Random, blocks: int = 4, size: int = 7):
    results = {f"b{i}": _result(f"b{i}", rng, size) for i in range(blocks)}
    costs = {(name, c.code): Cost(rng.randint(10, 100), rng.randint(10, 100))
             for name, r in results.items() for c in r.evaluated}
    return results, (lambda name, c: costs[(name, c.code)])


def _brute_force(results, cost, stem, limit, guard, ceiling_ms):
    """The least summed relative NSR over every choice that meets the caps, guard and ceiling."""
    best = None
    for combo in itertools.product(*(r.evaluated for r in results.values())):
        picks = dict(zip(results, combo))
        total = stem + sum((cost(n, c) for n, c in picks.items()), Cost(0, 0))
        if (total.macs > limit.macs or total.params > limit.params
                or not all(guard.block_ok(n, c) for n, c in picks.items())
                or sum(c.latency_ms for c in combo) > ceiling_ms):
            continue
        value = sum(c.nsr / results[n].teacher.nsr for n, c in picks.items())
        best = value if best is None else min(best, value)
    return best


def _relative_nsr(picks, results):
    return sum(c.nsr / results[n].teacher.nsr for n, c in picks.items())


def test_cost_caps_choose_the_least_nsr_choice_brute_force_finds():
    """Exact against brute force over 40 small random problems: the caps met, and the summed
    relative NSR the least any choice of evaluated candidates reaches; an impossible one raises.
    Half of them at a resolution of whole units of the room (the knapsack's rounding is exact), half
    at a coarse one (the rounding loses fits, which the polish after it must win back)."""
    feasible_count = 0
    for seed in range(40):
        rng = random.Random(seed)
        results, cost = _costed(rng, blocks=3, size=6)
        picks = {name: r.teacher for name, r in results.items()}
        stem, room = Cost(50, 50), rng.randint(60, 200)
        limit = stem + Cost(room, room)
        resolution = room if seed % 2 else 16
        over = stem + sum((cost(n, c) for n, c in picks.items()), Cost(0, 0))
        if over.macs <= limit.macs and over.params <= limit.params:
            continue  # already within: returned unchanged (tested below)
        expected = _brute_force(results, cost, stem, limit, LatencyGuard(), math.inf)
        if expected is None:
            with pytest.raises(BudgetError, match="no evaluated genome meets the caps"):
                meet_cost_caps(picks, results, cost, stem, limit, None, math.inf, resolution=resolution)
            continue
        feasible_count += 1
        met = meet_cost_caps(picks, results, cost, stem, limit, None, math.inf, resolution=resolution)
        total = stem + sum((cost(n, c) for n, c in met.items()), Cost(0, 0))
        assert total.macs <= limit.macs and total.params <= limit.params
        assert all(met[n] in results[n].evaluated for n in results)
        if resolution == room:
            assert _relative_nsr(met, results) == pytest.approx(expected)
        else:
            assert _relative_nsr(met, results) <= expected * 1.25
    assert feasible_count >= 15


def test_cost_caps_with_a_budget_guard_match_brute_force():
    """The budget rule's summed-latency promise, in units of exactly 1 ms (a 64 ms budget)."""
    checked = 0
    for seed in range(30):
        rng = random.Random(100 + seed)
        results, cost = _costed(rng, blocks=3, size=6)
        results = {n: BlockSearchResult(r.block, r.teacher, r.front,
                                        [Candidate(c.genome, c.code, c.nsr, float(rng.randint(5, 40)))
                                         for c in r.evaluated], []) for n, r in results.items()}
        results = {n: BlockSearchResult(r.block, r.evaluated[0], pareto_front(r.evaluated), r.evaluated, [])
                   for n, r in results.items()}
        picks = {n: max(r.evaluated, key=lambda c: cost(n, c).params) for n, r in results.items()}
        stem, room = Cost(50, 50), rng.randint(60, 200)
        limit = stem + Cost(room, room)
        guard = LatencyGuard(total_ms=64.0)
        expected = _brute_force(results, cost, stem, limit, guard, 64.0)
        over = stem + sum((cost(n, c) for n, c in picks.items()), Cost(0, 0))
        if expected is None or (over.macs <= limit.macs and over.params <= limit.params):
            continue
        met = meet_cost_caps(picks, results, cost, stem, limit, guard, math.inf, resolution=room)
        assert sum(c.latency_ms for c in met.values()) <= 64.0
        assert _relative_nsr(met, results) == pytest.approx(expected)
        checked += 1
    assert checked >= 10


def test_cost_caps_choice_does_not_depend_on_the_rules_picks():
    """Two runs whose rules picked differently (timing noise) but whose searches evaluated the same
    candidates end with the same student once the caps decide (a greedy repair from the picks did not)."""
    rng = random.Random(7)
    results, cost = _costed(rng, blocks=4, size=7)
    stem = Cost(50, 50)
    limit = stem + Cost(150, 150)
    chosen = set()
    for start in range(5):
        picks = {n: max(r.evaluated, key=lambda c, i=i: (cost(n, c).params + start * i) % 97)
                 for i, (n, r) in enumerate(results.items())}
        assert stem.params + sum(cost(n, c).params for n, c in picks.items()) > limit.params
        met = meet_cost_caps(picks, results, cost, stem, limit, None, math.inf, resolution=150)
        chosen.add(tuple(c.code for c in met.values()))
    assert len(chosen) == 1


def test_cost_caps_keep_picks_that_already_fit_and_respect_the_guard():
    rng = random.Random(3)
    results, cost = _costed(rng)
    picks = {name: r.teacher for name, r in results.items()}
    total = sum((cost(n, c) for n, c in picks.items()), Cost(0, 0))
    assert meet_cost_caps(picks, results, cost, Cost(0, 0), total) == picks  # already within: unchanged
    # A guard that forbids every candidate makes a tighter cap impossible.
    tighter = Cost(total.macs - 1, total.params)
    with pytest.raises(BudgetError, match="no evaluated genome meets the caps"):
        meet_cost_caps(picks, results, cost, Cost(0, 0), tighter, LatencyGuard(lambda *_: False))


def test_cost_caps_prefer_the_cheapest_nsr_loss():
    # Two blocks; cutting 10 params costs NSR +0.5 (relative) in a, +0.1 in b: b is cut.
    a = [Candidate((0,), "a0", 1.0, 1.0), Candidate((1,), "a1", 1.5, 1.0)]
    b = [Candidate((0,), "b0", 1.0, 1.0), Candidate((1,), "b1", 1.1, 1.0)]
    results = {"a": BlockSearchResult("a", a[0], pareto_front(a), a, []),
               "b": BlockSearchResult("b", b[0], pareto_front(b), b, [])}
    costs = {"a0": Cost(10, 20), "a1": Cost(10, 10), "b0": Cost(10, 20), "b1": Cost(10, 10)}
    met = meet_cost_caps({"a": a[0], "b": b[0]}, results, lambda n, c: costs[c.code], Cost(0, 0), Cost(100, 30))
    assert met == {"a": a[0], "b": b[1]}


def _two_block_problem():
    """Block a must be cut (a0 -> a1 or a2); a2 loses less NSR. Block b's b1 (same latency, more
    params) and b2 (lower NSR, slower) can use the room left. The rule's picks take 4 ms."""
    a = [Candidate((0,), "a0", 1.0, 2.0), Candidate((1,), "a1", 1.6, 1.0), Candidate((2,), "a2", 1.3, 1.0)]
    b = [Candidate((0,), "b0", 1.5, 2.0), Candidate((1,), "b1", 1.0, 2.0), Candidate((2,), "b2", 0.9, 5.0)]
    results = {"a": BlockSearchResult("a", a[0], pareto_front(a), a, []),
               "b": BlockSearchResult("b", b[1], pareto_front(b), b, [])}
    costs = {"a0": Cost(1, 100), "a1": Cost(1, 60), "a2": Cost(1, 20), "b0": Cost(1, 10), "b1": Cost(1, 40),
             "b2": Cost(1, 10)}
    return a, b, results, (lambda name, c: costs[c.code])


def test_cost_caps_spend_the_room_on_nsr_within_the_rules_latency():
    a, b, results, cost = _two_block_problem()
    met = meet_cost_caps({"a": a[0], "b": b[0]}, results, cost, Cost(0, 0), Cost(10, 65))
    # b2 would lower NSR further but a2 + b2 take 6 ms, over the rule's summed latency (4 ms).
    assert met == {"a": a[2], "b": b[1]}


def test_cost_caps_latency_slack_lets_the_room_buy_slower_better_candidates():
    a, b, results, cost = _two_block_problem()
    # With slack 2 the room may reach 8 ms of summed latency: b2 fits.
    met = meet_cost_caps({"a": a[0], "b": b[0]}, results, cost, Cost(0, 0), Cost(10, 65), latency_slack=2.0)
    assert met == {"a": a[2], "b": b[2]}


def test_cost_caps_drop_the_latency_slack_before_giving_up():
    # Every candidate that meets the params cap is slower than the rule's picks: the slack is a
    # preference, so the caps are met anyway (the guard, a promise, would not be broken).
    a = [Candidate((0,), "a0", 1.0, 1.0), Candidate((1,), "a1", 1.2, 3.0)]
    results = {"a": BlockSearchResult("a", a[0], pareto_front(a), a, [])}
    costs = {"a0": Cost(1, 100), "a1": Cost(1, 10)}
    met = meet_cost_caps({"a": a[0]}, results, lambda n, c: costs[c.code], Cost(0, 0), Cost(10, 50))
    assert met == {"a": a[1]}
    with pytest.raises(BudgetError):
        meet_cost_caps({"a": a[0]}, results, lambda n, c: costs[c.code], Cost(0, 0), Cost(10, 50),
                       LatencyGuard(total_ms=2.0))


def test_global_selection_is_the_least_summed_nsr_under_the_caps_whatever_the_latency():
    """``rule: global`` (DNA-style) against brute force: exact at whole-unit resolution, latency ignored
    (the least-NSR choice even where it is the slowest), and an error where nothing fits."""
    from pyevo.search.select import select_global

    checked = 0
    for seed in range(20):
        rng = random.Random(100 + seed)
        results, cost = _costed(rng, blocks=3, size=6)
        stem, room = Cost(50, 50), rng.randint(60, 200)
        limit = stem + Cost(room, room)
        expected = _brute_force(results, cost, stem, limit, LatencyGuard(), math.inf)
        if expected is None:
            with pytest.raises(BudgetError, match="no evaluated genome meets the caps"):
                select_global(results, cost, stem, limit, resolution=room)
            continue
        checked += 1
        picks = select_global(results, cost, stem, limit, resolution=room)
        total = stem + sum((cost(n, c) for n, c in picks.items()), Cost(0, 0))
        assert total.macs <= limit.macs and total.params <= limit.params
        assert _relative_nsr(picks, results) == pytest.approx(expected)
    assert checked >= 8
    # Caps off: every block's least-NSR candidate, however slow.
    rng = random.Random(7)
    results, cost = _costed(rng, blocks=3, size=6)
    picks = select_global(results, cost, Cost(0, 0), Cost(10 ** 9, 10 ** 9))
    assert picks == {n: min(r.evaluated, key=lambda c: c.nsr) for n, r in results.items()}

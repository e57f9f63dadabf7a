"""Selection rules: pick one genome per block from the blocks' Pareto fronts.

- ``diffnas`` (the paper's rule): per block, the lowest-latency candidate whose NSR is at most the
  teacher-shaped candidate's NSR times ``slack``.
- ``block-budget``: per block, the lowest-NSR candidate at most ``fraction`` of the teacher block's
  latency.
- ``budget``: a whole-network latency budget split across blocks by a multiple-choice knapsack
  over the fronts (minimise the sum of NSRs subject to the summed latency).

Any rule's picks can then be held to caps on the student's MACs and parameters
(:func:`meet_cost_caps`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

from pyevo.search.local import BlockSearchResult, Candidate


class BudgetError(ValueError):
    """No genome meets the latency budget a user asked for."""


def select_diffnas(results: Mapping[str, BlockSearchResult], slack: float) -> dict[str, Candidate]:
    picks = {}
    for name, result in results.items():
        allowed = [c for c in result.evaluated if c.nsr <= result.teacher.nsr * slack]
        # The teacher-shaped candidate always qualifies, so `allowed` is never empty.
        picks[name] = min(allowed, key=lambda c: (c.latency_ms, c.nsr))
    return picks


def select_block_budget(results: Mapping[str, BlockSearchResult], fraction: float) -> dict[str, Candidate]:
    picks = {}
    for name, result in results.items():
        limit = fraction * result.teacher.latency_ms
        allowed = [c for c in result.front if c.latency_ms <= limit]
        if not allowed:
            fastest = result.front[0]
            raise BudgetError(f"block budget {fraction:g} x teacher is impossible for {name}: "
                              f"its fastest candidate takes {fastest.latency_ms / result.teacher.latency_ms:.2f} "
                              f"x the teacher block ({fastest.latency_ms:.3f} ms)")
        picks[name] = min(allowed, key=lambda c: (c.nsr, c.latency_ms))
    return picks


def select_budget(results: Mapping[str, BlockSearchResult], budget_ms: float, resolution: int = 4000
                  ) -> dict[str, Candidate]:
    """Multiple-choice knapsack: one candidate per block, summed latency <= ``budget_ms``, least summed NSR.

    Latencies are rounded *up* to ``budget_ms / resolution`` so a returned pick never exceeds the
    budget; dynamic programming over the rounded costs is then exact.
    """
    names = list(results)
    fastest = sum(results[n].front[0].latency_ms for n in names)
    if budget_ms <= 0 or fastest > budget_ms:
        raise BudgetError(f"latency budget {budget_ms:.3f} ms is impossible: the fastest student's blocks "
                          f"take {fastest:.3f} ms")
    unit = budget_ms / resolution
    infinity = math.inf
    # best[c] = least NSR sum of the blocks so far with rounded cost exactly c; choice keeps the path.
    best = [0.0] + [infinity] * resolution
    choices: list[list[tuple[int, int]]] = []
    for name in names:
        front = results[name].front
        nxt = [infinity] * (resolution + 1)
        back = [(-1, -1)] * (resolution + 1)
        for cost_so_far, value in enumerate(best):
            if value == infinity:
                continue
            for index, candidate in enumerate(front):
                cost = cost_so_far + math.ceil(candidate.latency_ms / unit - 1e-9)
                if cost <= resolution and value + candidate.nsr < nxt[cost]:
                    nxt[cost] = value + candidate.nsr
                    back[cost] = (cost_so_far, index)
        choices.append(back)
        best = nxt
    end = min(range(resolution + 1), key=lambda c: best[c])
    if best[end] == infinity:
        raise BudgetError(f"latency budget {budget_ms:.3f} ms is impossible at this resolution")
    picks = {}
    for name, back in zip(reversed(names), reversed(choices)):
        previous, index = back[end]
        picks[name] = results[name].front[index]
        end = previous
    return {name: picks[name] for name in names}


@dataclass(frozen=True)
class Cost:
    """Multiply-accumulates (batch 1) and parameters of a block or a network."""

    macs: int
    params: int

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.macs + other.macs, self.params + other.params)

    def __sub__(self, other: "Cost") -> "Cost":
        return Cost(self.macs - other.macs, self.params - other.params)


def cap_excess(total: Cost, limit: Cost) -> float:
    """How far ``total`` is over ``limit``, relative, summed over MACs and params (0 = within)."""
    return max(0.0, total.macs / limit.macs - 1.0) + max(0.0, total.params / limit.params - 1.0)


def meet_cost_caps(picks: Mapping[str, Candidate], results: Mapping[str, BlockSearchResult],
                   cost: Callable[[str, Candidate], Cost], stem: Cost, limit: Cost,
                   allowed: Callable[[str, Candidate, dict[str, Candidate]], bool] = lambda *_: True,
                   latency_slack: float = 1.0) -> dict[str, Candidate]:
    """Swap picks for cheaper evaluated candidates until the network's MACs and params meet ``limit``.

    A latency rule alone can leave MACs or parameters above what a user asked for (fast blocks at
    high resolution hold few parameters). Greedy repair: each round makes the one swap, in any
    block, that buys the most excess reduction per unit of NSR given up (NSR relative to the
    block's teacher-shaped NSR, so blocks compare on one scale); swaps that lower the NSR too come
    first. ``allowed(name, candidate, picks)`` vetoes swaps (e.g. ones that break a latency budget).
    Once the caps are met, room left under them goes back into NSR (:func:`_spend_slack`), never
    past ``latency_slack`` x the summed block latency of the rule's own picks, or the repaired
    picks' latency if that is larger. Picks that meet the caps from the start are returned unchanged.
    Raises ``BudgetError`` when no swap gets closer and the caps are still not met.
    """
    picks = dict(picks)
    total = stem + sum((cost(n, c) for n, c in picks.items()), Cost(0, 0))
    if cap_excess(total, limit) == 0:
        return picks
    ceiling_ms = latency_slack * sum(c.latency_ms for c in picks.values())
    while (excess := cap_excess(total, limit)) > 0:
        best, best_key = None, None
        for name, result in results.items():
            current = cost(name, picks[name])
            for candidate in result.evaluated:
                after = total - current + cost(name, candidate)
                gain = excess - cap_excess(after, limit)
                if gain <= 1e-12 or not allowed(name, candidate, picks):
                    continue
                loss = (candidate.nsr - picks[name].nsr) / result.teacher.nsr
                key = (True, gain - loss) if loss <= 0 else (False, gain / loss)
                if best_key is None or key > best_key:
                    best, best_key = (name, candidate, after), key
        if best is None:
            raise BudgetError(f"no evaluated genome meets the caps: the student stays at {total.macs / limit.macs:.2f} x "
                              f"the MACs cap and {total.params / limit.params:.2f} x the params cap")
        name, candidate, total = best
        picks[name] = candidate
    ceiling_ms = max(ceiling_ms, sum(c.latency_ms for c in picks.values()))
    return _spend_slack(picks, results, cost, total, limit, allowed, ceiling_ms)


def _spend_slack(picks: dict[str, Candidate], results: Mapping[str, BlockSearchResult],
                 cost: Callable[[str, Candidate], Cost], total: Cost, limit: Cost,
                 allowed: Callable[[str, Candidate, dict[str, Candidate]], bool], ceiling_ms: float
                 ) -> dict[str, Candidate]:
    """Greedy repair moves in whole candidates, so it tends to land well under the caps: spend
    what is left on the swaps that lower the NSR most (relative), within the caps, the rule's
    guard and ``ceiling_ms`` of summed block latency."""
    while True:
        best, best_key = None, None
        latency = sum(c.latency_ms for c in picks.values())
        for name, result in results.items():
            current = cost(name, picks[name])
            for candidate in result.evaluated:
                gain = (picks[name].nsr - candidate.nsr) / result.teacher.nsr
                after = total - current + cost(name, candidate)
                if (gain <= 1e-12 or cap_excess(after, limit) > 0 or not allowed(name, candidate, picks)
                        or latency - picks[name].latency_ms + candidate.latency_ms > ceiling_ms):
                    continue
                if best_key is None or gain > best_key:
                    best, best_key = (name, candidate, after), gain
        if best is None:
            return picks
        name, candidate, total = best
        picks[name] = candidate


def latency_guard(rule: str, results: Mapping[str, BlockSearchResult], budget: float, budget_ms: float
                  ) -> Callable[[str, Candidate, dict[str, Candidate]], bool]:
    """The swaps :func:`meet_cost_caps` may make under ``rule`` without breaking its latency promise.

    ``diffnas``: no block slower than the teacher's; ``block-budget``: each block within ``budget``
    x its teacher block; ``budget``: the blocks' summed latency within ``budget_ms``.
    """
    if rule == "diffnas":
        return lambda name, candidate, picks: candidate.latency_ms <= results[name].teacher.latency_ms
    if rule == "block-budget":
        return lambda name, candidate, picks: candidate.latency_ms <= budget * results[name].teacher.latency_ms
    return lambda name, candidate, picks: (
        candidate.latency_ms + sum(c.latency_ms for n, c in picks.items() if n != name) <= budget_ms)

"""Selection rules: pick one genome per block from the blocks' Pareto fronts.

- ``diffnas`` (the paper's rule): per block, the lowest-latency candidate whose NSR is at most the
  teacher-shaped candidate's NSR times ``slack``.
- ``block-budget``: per block, the lowest-NSR candidate at most ``fraction`` of the teacher block's
  latency.
- ``budget``: a whole-network latency budget split across blocks by a multiple-choice knapsack
  over the fronts (minimise the sum of NSRs subject to the summed latency).
"""
from __future__ import annotations

import math
from typing import Mapping

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

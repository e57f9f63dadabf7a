"""Selection rules: pick one genome per block from the blocks' Pareto fronts.

- ``diffnas`` (the paper's rule): per block, the lowest-latency candidate whose NSR is at most the
  teacher-shaped candidate's NSR times ``slack``.
- ``block-budget``: per block, the lowest-NSR candidate at most ``fraction`` of the teacher block's
  latency.
- ``budget``: a whole-network latency budget split across blocks by a multiple-choice knapsack
  over the fronts (minimise the summed relative NSR subject to the summed latency).

Wherever NSRs of several blocks are summed, each is relative to its block's teacher-shaped
candidate's NSR, so that blocks compare on one scale (a block's raw NSR depends on how hard its
supernet was to distil, not only on what a candidate loses).
- ``global`` (DNA-style, the ablation of the local rules): the least summed NSR over every block's
  evaluated candidates under the MACs and params caps, latency not considered (:func:`select_global`).

Where a rule's picks break the caps on the student's MACs and parameters, :func:`meet_cost_caps`
replaces them with the least-NSR choice under the caps that keeps the rule's latency promise.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

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
    """Multiple-choice knapsack: one candidate per block, summed latency <= ``budget_ms``, least summed relative
    NSR (each block's NSR over its teacher-shaped candidate's).

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
    # best[c] = least relative NSR sum of the blocks so far with rounded cost exactly c; choice keeps the path.
    best = [0.0] + [infinity] * resolution
    choices: list[list[tuple[int, int]]] = []
    for name in names:
        front, scale = results[name].front, results[name].teacher.nsr
        nxt = [infinity] * (resolution + 1)
        back = [(-1, -1)] * (resolution + 1)
        for cost_so_far, value in enumerate(best):
            if value == infinity:
                continue
            for index, candidate in enumerate(front):
                cost = cost_so_far + math.ceil(candidate.latency_ms / unit - 1e-9)
                if cost <= resolution and value + candidate.nsr / scale < nxt[cost]:
                    nxt[cost] = value + candidate.nsr / scale
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


def meet_cost_caps(picks: Mapping[str, Candidate], results: Mapping[str, BlockSearchResult],
                   cost: Callable[[str, Candidate], Cost], stem: Cost, limit: Cost,
                   guard: "LatencyGuard | None" = None, latency_slack: float = 1.0, resolution: int = 200
                   ) -> dict[str, Candidate]:
    """The least-NSR picks whose network meets ``limit`` on MACs and params, when the rule's do not.

    A latency rule alone can leave MACs or parameters above what a user asked for (fast blocks at
    high resolution hold few parameters). Then one evaluated candidate per block is chosen that
    minimises the summed NSR (each relative to its block's teacher-shaped NSR, so blocks compare on
    one scale) subject to the caps, the rule's ``guard``, and a summed block latency of at most
    ``latency_slack`` x the rule's own picks' (dropped where no choice meets it: the caps and the
    guard are promises, the slack a preference). The choice is exact over the evaluated candidates
    (:func:`_least_nsr_under_caps`), so the caps' room goes to quality first: two runs whose
    timings differ by noise pick alike wherever their searches evaluated alike. Picks that meet the
    caps from the start are returned unchanged. Raises ``BudgetError`` when no choice meets the caps.
    """
    guard = guard or LatencyGuard()
    total = stem + sum((cost(n, c) for n, c in picks.items()), Cost(0, 0))
    if total.macs <= limit.macs and total.params <= limit.params:
        return dict(picks)
    preferred_ms = min(guard.total_ms, latency_slack * sum(c.latency_ms for c in picks.values()))
    for ceiling_ms in dict.fromkeys((preferred_ms, guard.total_ms)):
        # A tight fit can be lost to the rounding: then once more on a finer grid.
        for grid in (resolution, 8 * resolution):
            chosen = _least_nsr_under_caps(results, cost, limit - stem, guard, ceiling_ms, grid)
            if chosen is not None:
                return _polish(chosen, results, cost, limit - stem, guard, ceiling_ms)
    raise BudgetError(f"no evaluated genome meets the caps: the rule's picks have {total.macs / limit.macs:.2f} x "
                      f"the MACs cap and {total.params / limit.params:.2f} x the params cap, and no choice of "
                      "evaluated candidates within its latency promise gets under both")


def select_global(results: Mapping[str, BlockSearchResult], cost: Callable[[str, Candidate], Cost], stem: Cost,
                  limit: Cost, resolution: int = 200) -> dict[str, Candidate]:
    """One evaluated candidate per block with the least summed relative NSR (each block's NSR over its
    teacher-shaped candidate's) whose network meets ``limit``: the caps' knapsack of
    :func:`meet_cost_caps` without any latency promise. Raises ``BudgetError`` when nothing fits."""
    unbounded = LatencyGuard()
    for grid in (resolution, 8 * resolution):
        chosen = _least_nsr_under_caps(results, cost, limit - stem, unbounded, math.inf, grid)
        if chosen is not None:
            return _polish(chosen, results, cost, limit - stem, unbounded, math.inf)
    raise BudgetError("no evaluated genome meets the caps (max_macs / max_params): raise them")


@dataclass(frozen=True)
class LatencyGuard:
    """What a selection rule promised about latency, which meeting the cost caps must keep."""

    block_ok: Callable[[str, Candidate], bool] = lambda name, candidate: True  # per block
    total_ms: float = math.inf  # on the blocks' summed latency


def latency_guard(rule: str, results: Mapping[str, BlockSearchResult], budget: float, budget_ms: float
                  ) -> LatencyGuard:
    """``diffnas``: no block slower than the teacher's; ``block-budget``: each block within ``budget``
    x its teacher block; ``budget``: the blocks' summed latency within ``budget_ms``; ``global``: nothing."""
    if rule == "global":
        return LatencyGuard()
    if rule == "diffnas":
        return LatencyGuard(lambda name, candidate: candidate.latency_ms <= results[name].teacher.latency_ms)
    if rule == "block-budget":
        return LatencyGuard(lambda name, candidate: candidate.latency_ms <= budget * results[name].teacher.latency_ms)
    return LatencyGuard(total_ms=budget_ms)


def _least_nsr_under_caps(results: Mapping[str, BlockSearchResult], cost: Callable[[str, Candidate], Cost],
                          room: Cost, guard: LatencyGuard, ceiling_ms: float, resolution: int
                          ) -> dict[str, Candidate] | None:
    """One candidate per block: least summed relative NSR within ``room`` and ``ceiling_ms``.

    A multiple-choice knapsack in MACs and params by dynamic programming, each candidate's share of
    the room rounded *up* to whole units of ``room / resolution`` so that a returned choice never
    exceeds it (:func:`_polish` then wins back fits the rounding lost). The summed latency is held
    under ``ceiling_ms`` by a Lagrange multiplier on it, found by bisection, since timings are not
    on a grid. None when nothing fits.
    """
    if room.macs < 0 or room.params < 0:
        return None

    def units(value: float, whole: float) -> int:
        if value <= 0:
            return 0
        return math.ceil(value / whole * resolution - 1e-9) if whole > 0 else resolution + 1

    names, options = list(results), []
    for name in names:
        block = []
        for candidate in results[name].evaluated:
            c = cost(name, candidate)
            m, p = units(c.macs, room.macs), units(c.params, room.params)
            if guard.block_ok(name, candidate) and m <= resolution and p <= resolution:
                block.append((m, p, candidate.nsr / results[name].teacher.nsr, candidate))
        if not block:
            return None
        options.append(block)
    size = resolution + 1

    def solve(weight: float) -> dict[str, Candidate] | None:
        """Least sum of relative NSR + ``weight`` x latency / ceiling."""
        best = np.full((size, size), np.inf)
        best[0, 0] = 0.0
        choices = []
        for block in options:
            following = np.full((size, size), np.inf)
            choice = np.full((size, size), -1, dtype=np.int32)
            for index, (m, p, value, candidate) in enumerate(block):
                scaled_ms = candidate.latency_ms / ceiling_ms if math.isfinite(ceiling_ms) else 0.0
                reached = best[:size - m, :size - p] + (value + weight * scaled_ms)
                region = following[m:, p:]
                better = reached < region
                region[better] = reached[better]
                choice[m:, p:][better] = index
            choices.append(choice)
            best = following
        if not np.isfinite(best).any():
            return None
        cell = np.unravel_index(int(np.argmin(best)), best.shape)
        picks = {}
        for name, block, choice in zip(reversed(names), reversed(options), reversed(choices)):
            m, p, _, candidate = block[int(choice[cell])]
            picks[name] = candidate
            cell = (int(cell[0]) - m, int(cell[1]) - p)
        return {name: picks[name] for name in names}

    def fits(picks) -> bool:
        return sum(c.latency_ms for c in picks.values()) <= ceiling_ms

    def relative(picks) -> float:
        return sum(c.nsr / results[n].teacher.nsr for n, c in picks.items())

    chosen = solve(0.0)
    if chosen is None or fits(chosen):
        return chosen
    low, high = 0.0, 1.0
    while not fits(solved := solve(high)):
        if high > 1e6:
            return None  # even the fastest choice under the caps is over the ceiling
        low, high = high, high * 4
    feasible = [solved]
    for _ in range(16):
        middle = (low + high) / 2
        picks = solve(middle)
        if fits(picks):
            high = middle
            feasible.append(picks)
        else:
            low = middle
    return min(feasible, key=relative)


def _polish(picks: dict[str, Candidate], results: Mapping[str, BlockSearchResult],
            cost: Callable[[str, Candidate], Cost], room: Cost, guard: LatencyGuard, ceiling_ms: float
            ) -> dict[str, Candidate]:
    """Swaps in one block, or in two at once, that lower the summed relative NSR and still fit,
    on exact costs, until none is left."""
    picks = dict(picks)
    names = list(results)
    options = {n: [c for c in results[n].evaluated if guard.block_ok(n, c)] for n in names}

    def relative(name, candidate):
        return candidate.nsr / results[name].teacher.nsr

    while True:
        used = sum((cost(n, c) for n, c in picks.items()), Cost(0, 0))
        used_ms = sum(c.latency_ms for c in picks.values())
        best, best_gain = None, 1e-12
        for i, first in enumerate(names):
            for second in [None] + names[i + 1:]:
                swapped = [first] if second is None else [first, second]
                base = used - sum((cost(n, picks[n]) for n in swapped), Cost(0, 0))
                base_ms = used_ms - sum(picks[n].latency_ms for n in swapped)
                base_value = sum(relative(n, picks[n]) for n in swapped)
                for combo in itertools.product(*(options[n] for n in swapped)):
                    gain = base_value - sum(relative(n, c) for n, c in zip(swapped, combo))
                    if gain <= best_gain:
                        continue
                    total = base + sum((cost(n, c) for n, c in zip(swapped, combo)), Cost(0, 0))
                    if (total.macs <= room.macs and total.params <= room.params
                            and base_ms + sum(c.latency_ms for c in combo) <= ceiling_ms):
                        best, best_gain = dict(zip(swapped, combo)), gain
        if best is None:
            return picks
        picks.update(best)

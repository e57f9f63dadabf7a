"""Per-block local search (DEAP NSGA-II), the selection rules, and the ``python -m pyevo.search`` CLI."""
from pyevo.search.local import BlockSearchResult, Candidate, pareto_front, search_block
from pyevo.search.select import BudgetError, select_block_budget, select_budget, select_diffnas

__all__ = ["BlockSearchResult", "BudgetError", "Candidate", "pareto_front", "search_block",
           "select_block_budget", "select_budget", "select_diffnas"]

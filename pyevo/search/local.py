"""Local search of one block: DEAP NSGA-II over the block's integer genomes.

Two objectives, both minimised: the block's NSR on the fixed held-out set, and its latency measured
on the run's device. Fitness is cached by genome; one JSON checkpoint per generation (no pickle)
lets an interrupted search resume where it stopped and end with the same result.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Callable

from deap import base, creator, tools
from tqdm.auto import tqdm

from pyevo.config import SearchConfig
from pyevo.runfolder import atomic_write_json, read_json
from pyevo.training import check_finite

log = logging.getLogger(__name__)

# DEAP's creator classes are global; create them once.
if not hasattr(creator, "PyevoFitness"):
    creator.create("PyevoFitness", base.Fitness, weights=(-1.0, -1.0))
if not hasattr(creator, "PyevoGenome"):
    creator.create("PyevoGenome", list, fitness=creator.PyevoFitness)


@dataclass(frozen=True)
class Candidate:
    genome: tuple[int, ...]
    code: str  # the genome's stable string form
    nsr: float
    latency_ms: float

    def to_dict(self) -> dict:
        return {"genome": self.code, "nsr": self.nsr, "latency_ms": self.latency_ms}


@dataclass
class BlockSearchResult:
    block: str
    teacher: Candidate  # the teacher-shaped candidate
    front: list[Candidate]  # Pareto front over every evaluated genome, by latency
    evaluated: list[Candidate]
    logbook: list[dict]

    def to_dict(self) -> dict:
        return {"block": self.block, "teacher": self.teacher.to_dict(),
                "front": [c.to_dict() for c in self.front],
                "evaluated": [c.to_dict() for c in self.evaluated], "logbook": self.logbook}

    @classmethod
    def from_dict(cls, data: dict, space) -> "BlockSearchResult":
        def candidate(item):
            return Candidate(space.decode(item["genome"]), item["genome"], item["nsr"], item["latency_ms"])

        return cls(data["block"], candidate(data["teacher"]), [candidate(c) for c in data["front"]],
                   [candidate(c) for c in data["evaluated"]], data["logbook"])


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """The non-dominated candidates (lower NSR and lower latency are better), by latency."""
    front: list[Candidate] = []
    for candidate in sorted(candidates, key=lambda c: (c.latency_ms, c.nsr)):
        if not front or candidate.nsr < front[-1].nsr:
            front.append(candidate)
    return front


def search_block(space, evaluate: Callable[[tuple[int, ...]], tuple[float, float]], config: SearchConfig,
                 seed: int, checkpoint_dir: Path | None = None, progress: bool = True) -> BlockSearchResult:
    """NSGA-II over ``space``'s genomes; ``evaluate(genome) -> (nsr, latency_ms)``; if ``evaluate`` also
    has ``many(genomes) -> [(nsr, latency_ms), ...]``, each generation's new genomes go through it at once."""
    if config.population % 4:
        raise ValueError(f"search.population must be a multiple of 4 (NSGA-II tournament), got {config.population}")
    counts = space.num_choices
    toolbox = base.Toolbox()
    toolbox.register("mate", tools.cxUniform, indpb=0.5)
    toolbox.register("mutate", tools.mutUniformInt, low=[0] * len(counts), up=[c - 1 for c in counts],
                     indpb=max(1.0 / len(counts), 0.2))
    toolbox.register("select", tools.selNSGA2)

    cache: dict[str, tuple[float, float]] = {}
    logbook: list[dict] = []

    def scored(genome, values) -> tuple[float, float]:
        nsr, latency = map(float, values)
        where = f"search: block {getattr(space, 'name', '?')}, genome {space.encode(genome)}"
        check_finite(nsr, f"{where}: its NSR", "the supernet's distillation diverged: lower distill.lr and "
                     "re-run (with --resume, distillation and what follows run again)")
        check_finite(latency, f"{where}: its latency", "re-run the search with --resume")
        return nsr, latency

    def assess(individuals) -> int:
        fresh = 0
        # --- batched evaluation: an evaluator with a `many` method (pyevo.search.population.
        # PopulationEvaluator) scores all of a generation's new genomes of the block in one call.
        if hasattr(evaluate, "many"):
            new = {}
            for individual in individuals:
                code = space.encode(tuple(individual))
                if code not in cache:
                    new.setdefault(code, tuple(individual))
            for (code, genome), values in zip(new.items(), evaluate.many(list(new.values())) if new else []):
                cache[code] = scored(genome, values)
            fresh = len(new)
        # --- end of batched evaluation
        for individual in individuals:
            code = space.encode(tuple(individual))
            if code not in cache:
                cache[code] = scored(tuple(individual), evaluate(tuple(individual)))
                fresh += 1
            individual.fitness.values = cache[code]
        return fresh

    def record(generation: int, population, fresh: int) -> None:
        nsr = [ind.fitness.values[0] for ind in population]
        latency = [ind.fitness.values[1] for ind in population]
        logbook.append({"gen": generation, "evals": fresh, "nsr_min": min(nsr), "nsr_median": median(nsr),
                        "latency_min_ms": min(latency), "latency_median_ms": median(latency),
                        "front_size": len(tools.sortNondominated(population, len(population), True)[0])})

    start, population = 0, None
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        state = _latest_checkpoint(checkpoint_dir, space.name)
        if state is not None:
            cache = {k: tuple(v) for k, v in state["cache"].items()}
            logbook = state["logbook"]
            population = [creator.PyevoGenome(genes) for genes in state["population"]]
            assess(population)
            # NSGA-II's tournament reads the crowding distances of the last selection: restore them.
            for individual, distance in zip(population, state["crowding"]):
                individual.fitness.crowding_dist = distance
            random.setstate(_random_state_from_json(state["random_state"]))
            start = state["generation"] + 1
            log.info("%s: resuming the search at generation %d", space.name, start)
    if population is None:
        # DEAP's operators draw from the global `random`; seed it per block.
        random.seed(seed)
        rng = random.Random(seed)
        # The minimal genome bounds every budget and cap a selection can meet: always evaluate it.
        # The narrow one is where parameter caps usually land.
        seeds = [space.teacher_genome(), space.largest_genome(), space.smallest_genome(), space.minimal_genome(),
                 space.narrow_genome()]
        seeds += [space.random_genome(rng) for _ in range(config.population - len(seeds))]
        population = [creator.PyevoGenome(list(genome)) for genome in seeds[:config.population]]
        fresh = assess(population)
        population = toolbox.select(population, len(population))  # assigns crowding distances
        record(0, population, fresh)
        _checkpoint(checkpoint_dir, 0, population, cache, logbook)
        start = 1

    bar = tqdm(range(start, config.generations + 1), desc=f"search {space.name}", disable=not progress)
    for generation in bar:
        offspring = [toolbox.clone(ind) for ind in tools.selTournamentDCD(population, len(population))]
        for first, second in zip(offspring[::2], offspring[1::2]):
            if random.random() <= config.crossover_prob:
                toolbox.mate(first, second)
                del first.fitness.values, second.fitness.values
            for child in (first, second):
                if random.random() <= config.mutation_prob:
                    toolbox.mutate(child)
                    del child.fitness.values
        fresh = assess([ind for ind in offspring if not ind.fitness.valid])
        population = toolbox.select(population + offspring, config.population)
        record(generation, population, fresh)
        _checkpoint(checkpoint_dir, generation, population, cache, logbook)
        bar.set_postfix(evaluated=len(cache))

    teacher_code = space.encode(space.teacher_genome())
    evaluated = [Candidate(space.decode(code), code, nsr, latency) for code, (nsr, latency) in sorted(cache.items())]
    teacher = next(c for c in evaluated if c.code == teacher_code)
    return BlockSearchResult(space.name, teacher, pareto_front(evaluated), evaluated, logbook)


def _checkpoint(folder: Path | None, generation: int, population, cache, logbook) -> None:
    if folder is None:
        return
    state = {
        "generation": generation,
        "population": [list(ind) for ind in population],
        "crowding": [ind.fitness.crowding_dist for ind in population],
        "cache": {k: list(v) for k, v in cache.items()},
        "logbook": logbook,
        "random_state": _random_state_to_json(random.getstate()),
    }
    atomic_write_json(folder / f"gen_{generation:04d}.json", state | {"sha256": _state_digest(state)})


def _state_digest(state: dict) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _latest_checkpoint(folder: Path, block: str) -> dict | None:
    """The newest generation checkpoint in ``folder`` that reads back whole (its sha256 matches); a damaged
    one is passed over with a log line, for the generation before it (or a search from the start)."""
    for path in sorted(folder.glob("gen_*.json"), reverse=True):
        try:
            state = read_json(path)
            digest = state.pop("sha256", None)  # checkpoints written before digests have none
            if digest is not None and digest != _state_digest(state):
                raise ValueError("its sha256 differs")
            state["generation"], state["population"], state["cache"]  # noqa: B018 - the fields a resume reads
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            log.warning("%s: the search checkpoint %s is damaged (%s); ignored", block, path, error)
            continue
        return state
    return None


def _random_state_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _random_state_from_json(data) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)

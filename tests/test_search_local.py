"""NSGA-II local search: determinism, resume from a generation checkpoint, the front."""
import shutil

import pytest
from diffusers import UNet2DModel

from pyevo.config import SearchConfig
from pyevo.search.local import pareto_front, search_block
from pyevo.space import unet_space


@pytest.fixture(scope="module")
def space():
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                       layers_per_block=2, norm_num_groups=8, attention_head_dim=16,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return {s.name: s for s in unet_space(unet)}["down_blocks.1"]


def synthetic_objectives(space):
    """A deterministic trade-off: bigger architectures are slower and more accurate."""
    calls = []

    def evaluate(genome):
        calls.append(space.encode(genome))
        size = sum(g * (i % 3 + 1) for i, g in enumerate(genome)) + 1
        return 1.0 / size + 0.01 * (genome[0] % 2), 0.1 * size

    return evaluate, calls


def test_same_seed_same_result_and_fitness_cached(space, tmp_path):
    config = SearchConfig(population=8, generations=4)
    evaluate, calls = synthetic_objectives(space)
    first = search_block(space, evaluate, config, seed=5, checkpoint_dir=tmp_path / "a", progress=False)
    assert len(calls) == len(set(calls)) == len(first.evaluated)  # each genome evaluated once
    evaluate, _ = synthetic_objectives(space)
    second = search_block(space, evaluate, config, seed=5, checkpoint_dir=tmp_path / "b", progress=False)
    assert first.to_dict() == second.to_dict()
    assert len(first.logbook) == config.generations + 1
    assert first.front == pareto_front(first.evaluated)
    assert first.teacher.code == space.encode(space.teacher_genome())
    assert len(sorted((tmp_path / "a").glob("gen_*.json"))) == config.generations + 1


def test_resume_from_a_generation_checkpoint_ends_the_same(space, tmp_path):
    config = SearchConfig(population=8, generations=4)
    evaluate, _ = synthetic_objectives(space)
    whole = search_block(space, evaluate, config, seed=2, checkpoint_dir=tmp_path / "whole", progress=False)
    (tmp_path / "cut").mkdir()
    for name in ("gen_0000.json", "gen_0001.json", "gen_0002.json"):
        shutil.copy(tmp_path / "whole" / name, tmp_path / "cut" / name)
    evaluate, calls = synthetic_objectives(space)
    resumed = search_block(space, evaluate, config, seed=2, checkpoint_dir=tmp_path / "cut", progress=False)
    assert resumed.to_dict() == whole.to_dict()
    assert len(calls) < len(whole.evaluated)  # the cached fitness came back from the checkpoint


def test_population_must_suit_the_tournament(space):
    evaluate, _ = synthetic_objectives(space)
    with pytest.raises(ValueError, match="multiple of 4"):
        search_block(space, evaluate, SearchConfig(population=6), seed=0, progress=False)


def test_a_non_finite_nsr_stops_the_search_naming_block_and_genome(space):
    from pyevo.training import NonFiniteError

    def evaluate(genome):
        return (float("nan") if genome[0] == 0 else 0.1), 1.0

    with pytest.raises(NonFiniteError, match=r"search: block down_blocks\.1, genome .*: its NSR is nan"):
        search_block(space, evaluate, SearchConfig(population=16, generations=2), seed=0, progress=False)

"""CPU microbenchmarks of the population ops: K candidates of one layer in one call ("pyevo")
against one call per candidate ("loop": slice + ``.contiguous()`` + ``F.group_norm`` + ``F.silu``
/ SDPA), and one generation's NSRs with work shared between candidates against the per-candidate
path.

    .venv/bin/python -m pytest tests/bench --benchmark-only

On the CPU the population ops are loops over the single ops, so these mostly show what the loop
costs; ``python -m pyevo.bench`` on a GPU is where the one-launch kernels are measured. The
population conv is a loop of single convs on every device, so it has no case here: its work
sharing is measured by ``test_generation_nsrs``. No time assertions.
"""
from __future__ import annotations

import pytest
import torch

import pyevo  # noqa: F401
from pyevo.bench import population_attention_case, population_group_norm_case

DEVICE = torch.device("cpu")


def bench_case(benchmark, case, impl):
    tensors = case.make(DEVICE, case.dtype, torch.Generator().manual_seed(0))
    if impl == "pyevo":
        fn = case.ours
    else:
        extra = case.prepare(tensors) if case.prepare else {}
        tensors = {**tensors, **extra}
        fn = case.baselines[impl]
    benchmark.group = f"{case.op} {case.shape}"

    def step():
        with torch.inference_mode():
            return fn(tensors)

    benchmark(step)


@pytest.mark.parametrize("impl", ["pyevo", "loop"])
def test_population_group_norm_silu(benchmark, impl):
    case = population_group_norm_case("DDPM down0", 8, 128, 32, 8, DEVICE, torch.float32)
    bench_case(benchmark, case, impl)


@pytest.mark.parametrize("impl", ["pyevo", "loop sdpa"])
def test_population_attention(benchmark, impl):
    case = population_attention_case("DDPM attn", 4, 256, 256, 4, 64, 8, DEVICE, torch.float32)
    bench_case(benchmark, case, impl)


@pytest.fixture(scope="module")
def digits_generation():
    """A random-init digits teacher's supernet, a held-out set of 32 samples per block, and one
    generation of 8 random genomes per block."""
    import random

    from diffusers import DDPMScheduler, UNet2DModel

    from pyevo.diffusion import ImageSet
    from pyevo.distill import heldout_calls
    from pyevo.supernet import build_supernet
    from unet_configs import DIGITS_CONFIG

    torch.manual_seed(0)
    teacher = UNet2DModel(**DIGITS_CONFIG).eval().requires_grad_(False)
    supernet = build_supernet(teacher).eval()
    images = torch.rand(32, 1, 16, 16) * 2 - 1
    calls = heldout_calls(teacher, ImageSet(images), DDPMScheduler(num_train_timesteps=1000), size=32, seed=0)
    rng = random.Random(0)
    genomes = {name: [supernet[name].space.random_genome(rng) for _ in range(8)] for name in calls}
    return supernet, calls, genomes


@pytest.mark.parametrize("impl", ["population", "per-candidate"])
@pytest.mark.parametrize("block_name", ["down_blocks.0", "up_blocks.1"])
def test_generation_nsrs(benchmark, digits_generation, block_name, impl):
    # One generation's NSRs: the population path (work shared at the block's first resnet) against
    # set_genome + block_nsr per candidate, which is what the CPU search runs.
    from pyevo.distill import block_nsr
    from pyevo.search.population import population_nsr

    supernet, calls, genomes = digits_generation
    block, call = supernet[block_name], calls[block_name]
    benchmark.group = f"generation NSRs digits {block_name} K=8"

    def per_candidate():
        nsrs = []
        for genome in genomes[block_name]:
            block.set_genome(genome)
            nsrs.append(block_nsr(block, call))
        return nsrs

    run = (lambda: population_nsr(block, call, genomes[block_name])) if impl == "population" else per_candidate
    with torch.inference_mode():
        benchmark(run)

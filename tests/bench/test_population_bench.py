"""CPU microbenchmarks of the population ops: K candidates of one layer in one call ("pyevo")
against one call per candidate ("loop": slice + ``.contiguous()`` + ``F.conv2d`` /
``F.group_norm`` + ``F.silu`` / SDPA) and, for convolutions, every candidate zero-padded into one
grouped conv ("padded").

    .venv/bin/python -m pytest tests/bench --benchmark-only

On the CPU the population ops are loops over the single ops, so these mostly show what the loop
costs; ``python -m pyevo.bench`` on a GPU is where the one-launch kernels are measured. No time
assertions.
"""
from __future__ import annotations

import pytest
import torch

import pyevo  # noqa: F401
from pyevo.bench import (population_attention_case, population_conv_case,
                         population_group_norm_case)

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


@pytest.mark.parametrize("impl", ["pyevo", "loop", "padded-grouped"])
@pytest.mark.parametrize("shared_input", [True, False], ids=["shared-input", "own-inputs"])
def test_population_conv2d(benchmark, shared_input, impl):
    case = population_conv_case("DDPM down1", 4, 128, 16, 8, shared_input, torch.float32)
    bench_case(benchmark, case, impl)


@pytest.mark.parametrize("impl", ["pyevo", "loop"])
def test_population_group_norm_silu(benchmark, impl):
    case = population_group_norm_case("DDPM down0", 8, 128, 32, 8, torch.float32)
    bench_case(benchmark, case, impl)


@pytest.mark.parametrize("impl", ["pyevo", "loop sdpa"])
def test_population_attention(benchmark, impl):
    case = population_attention_case("DDPM attn", 4, 256, 256, 4, 64, 8, DEVICE, torch.float32)
    bench_case(benchmark, case, impl)

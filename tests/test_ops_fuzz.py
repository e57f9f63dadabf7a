"""Property-based tests (hypothesis) of every op and population op against plain PyTorch.

The hand-picked and seeded cases of tests/test_ops.py and tests/test_population_ops.py fix the
shapes once; here hypothesis draws them: batch, channels and their shared maxima (the crops),
kernel and shared kernel (the centre crop of a larger kernel), stride, odd image sizes down to
1x1, biases present or not, memory layouts (contiguous, channels-last, sliced views, a permuted
weight), dtypes, and for the population ops the number of candidates and their widths. Each drawn
case goes through the same check as the fixed cases (forward and, for the single ops, backward,
against float32/float64 PyTorch), on the CPU and, where a GPU is present, through the CUDA checks.

Profiles (``HYPOTHESIS_PROFILE``, registered in conftest.py): ``ci`` (the default) draws a fixed,
derandomized set so CI is reproducible; ``fuzz`` draws many more, freshly each run; ``device``
fresh ones within the device script's time (its CUDA part). A failure prints the drawn case,
which can be pasted into the fixed lists.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pyevo  # noqa: F401,E402  (registers torch.ops.pyevo)
# Imported as modules: test functions imported by name would be collected here a second time.
import test_ops as single
import test_population_ops as population
from test_ops import AttentionCase, ConvCase, GroupNormCase
from test_population_ops import AttentionPopulation, ConvPopulation, NormPopulation

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CPU_DTYPES = st.sampled_from([torch.float32, torch.float64])
CUDA_DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])
KERNELS = (1, 3, 5, 7)


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


@st.composite
def conv_cases(draw, max_channels: int = 12, max_size: int = 12) -> ConvCase:
    shared_kernel = draw(st.sampled_from(KERNELS))
    in_max, out_max = draw(st.integers(1, max_channels)), draw(st.integers(1, max_channels))
    return ConvCase(batch=draw(st.integers(1, 3)), in_channels=draw(st.integers(1, in_max)), in_channels_max=in_max,
                    out_channels=draw(st.integers(1, out_max)), out_channels_max=out_max, shared_kernel=shared_kernel,
                    kernel_size=draw(st.sampled_from([k for k in KERNELS if k <= shared_kernel])),
                    stride=draw(st.sampled_from([1, 2])), height=draw(st.integers(1, max_size)),
                    width=draw(st.integers(1, max_size)), bias=draw(st.booleans()),
                    layout=draw(st.sampled_from(["contiguous", "channels_last", "sliced", "weight_permuted"])))


SPATIALS = st.one_of(st.just(()), st.tuples(st.integers(1, 9)), st.tuples(st.integers(1, 17), st.integers(1, 17)),
                     st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)))


def _one_value_per_group(channels_per_group: int, spatial: tuple) -> bool:
    # PyTorch's group_norm (the reference) refuses groups of a single value.
    size = 1
    for s in spatial:
        size *= s
    return channels_per_group * size == 1


@st.composite
def group_norm_cases(draw) -> GroupNormCase:
    spatial = draw(SPATIALS)
    channels_per_group = draw(st.sampled_from([1, 2, 3, 4, 8]).filter(lambda c: not _one_value_per_group(c, spatial)))
    layout = draw(st.sampled_from(["contiguous", "sliced"] + (["channels_last"] if len(spatial) == 2 else [])))
    return GroupNormCase(batch=draw(st.integers(1, 3)), channels_per_group=channels_per_group,
                         groups=draw(st.integers(1, 6)), extra_channels=draw(st.sampled_from([0, 1, 5])),
                         spatial=spatial, eps=draw(st.sampled_from([1e-5, 1e-6, 1e-3])), layout=layout)


@st.composite
def attention_cases(draw) -> AttentionCase:
    heads_max = draw(st.integers(1, 4))
    cross = draw(st.none() | st.tuples(st.integers(1, 9), st.integers(1, 12)))
    return AttentionCase(batch=draw(st.integers(1, 3)), seq=draw(st.integers(1, 12)), channels=draw(st.integers(1, 12)),
                         cross=cross, heads=draw(st.integers(1, heads_max)), heads_max=heads_max,
                         head_dim=draw(st.integers(1, 8)), biases=draw(st.tuples(*[st.booleans()] * 4)),
                         sliced_input=draw(st.booleans()))


@st.composite
def conv_populations(draw) -> ConvPopulation:
    shared_kernel = draw(st.sampled_from([3, 5]))
    in_max, out_max = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    candidate = st.tuples(st.integers(1, in_max), st.integers(1, out_max),
                          st.sampled_from([k for k in (1, 3, 5) if k <= shared_kernel]))
    return ConvPopulation(batch=draw(st.integers(1, 3)), height=draw(st.integers(1, 11)), width=draw(st.integers(1, 11)),
                          in_channels_max=in_max, out_channels_max=out_max, shared_kernel=shared_kernel,
                          stride=draw(st.sampled_from([1, 2])), bias=draw(st.booleans()),
                          shared_input=draw(st.booleans()),
                          layout=draw(st.sampled_from(["contiguous", "sliced", "channels_last"])),
                          candidates=tuple(draw(st.lists(candidate, min_size=1, max_size=5))))


@st.composite
def norm_populations(draw) -> NormPopulation:
    spatial = draw(SPATIALS)
    channels_per_group = draw(st.sampled_from([1, 2, 3, 4]).filter(lambda c: not _one_value_per_group(c, spatial)))
    return NormPopulation(batch=draw(st.integers(1, 3)), channels_per_group=channels_per_group,
                          groups=tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))),
                          extra_channels=draw(st.sampled_from([0, 3])), spatial=spatial,
                          eps=draw(st.sampled_from([1e-5, 1e-6])), sliced=draw(st.booleans()))


@st.composite
def attention_populations(draw) -> AttentionPopulation:
    heads_max = draw(st.integers(1, 4))
    return AttentionPopulation(batch=draw(st.integers(1, 3)), seq=draw(st.integers(1, 9)),
                               channels=draw(st.integers(1, 10)), heads_max=heads_max, head_dim=draw(st.integers(1, 8)),
                               heads=tuple(draw(st.lists(st.integers(1, heads_max), min_size=1, max_size=4))),
                               biases=draw(st.tuples(*[st.booleans()] * 4)), shared_input=draw(st.booleans()),
                               sliced=draw(st.booleans()))


# ---------------------------------------------------------------------------------------------
# CPU: every op against plain PyTorch, forward and backward
# ---------------------------------------------------------------------------------------------


@given(case=conv_cases(), dtype=CPU_DTYPES)
def test_shared_conv2d_fuzz(case, dtype):
    single.check_shared_conv2d(case, dtype)


@given(case=group_norm_cases(), dtype=CPU_DTYPES)
def test_shared_group_norm_silu_fuzz(case, dtype):
    single.check_shared_group_norm_silu(case, dtype)


@given(case=attention_cases(), dtype=CPU_DTYPES)
def test_shared_attention_fuzz(case, dtype):
    single.check_shared_attention(case, dtype)


@given(case=conv_populations(), dtype=CPU_DTYPES, explicit_in_channels=st.booleans())
def test_population_conv2d_fuzz(case, dtype, explicit_in_channels):
    population.test_population_conv2d_matches_single_op_and_reference(case, dtype, explicit_in_channels)


@given(case=norm_populations(), dtype=CPU_DTYPES)
def test_population_group_norm_silu_fuzz(case, dtype):
    population.test_population_group_norm_silu_matches_single_op_and_reference(case, dtype)


@given(case=attention_populations(), dtype=CPU_DTYPES)
def test_population_attention_fuzz(case, dtype):
    population.test_population_attention_matches_single_op_and_reference(case, dtype)


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): the same draws through the CUDA checks, in every CUDA dtype
# ---------------------------------------------------------------------------------------------


@CUDA
@given(case=conv_cases(max_channels=40, max_size=20), dtype=CUDA_DTYPES)
def test_cuda_shared_conv2d_fuzz(case, dtype):
    single._cuda_conv_check(case, dtype)


@CUDA
@given(case=group_norm_cases(), dtype=CUDA_DTYPES)
def test_cuda_shared_group_norm_silu_fuzz(case, dtype):
    single.test_cuda_group_norm_silu_fused_backward(case, dtype)
    if dtype != torch.float64:  # the forward check's tolerances are for float32 and below
        single.test_cuda_group_norm_silu_forward(case, dtype, misaligned=False)


@CUDA
@given(case=attention_cases())
def test_cuda_shared_attention_fuzz(case):
    single.test_cuda_shared_attention_matches_cpu(case)


@CUDA
@given(case=conv_populations(), dtype=CUDA_DTYPES)
def test_cuda_population_conv2d_fuzz(case, dtype):
    population.test_cuda_population_conv2d(case, dtype)


@CUDA
@given(case=norm_populations(), dtype=CUDA_DTYPES)
def test_cuda_population_group_norm_silu_fuzz(case, dtype):
    population.test_cuda_population_group_norm_silu(case, dtype)

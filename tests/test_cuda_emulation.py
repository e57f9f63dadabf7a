"""The CUDA kernels' logic, checked on the CPU: the real device code of the GroupNorm+SiLU and
attention kernels (kernels/group_norm_silu.cu, kernels/flash_attention.cu) and the torch-side glue
of csrc/cuda/*_runner.h, compiled with g++ against a host emulation of CUDA
(tests/cuda_emulation/emulation.h: a block's threads are std::threads, __syncthreads a barrier,
WMMA fragments whole tiles), run on CPU tensors and compared with PyTorch.

This checks indexing, tiling, masking, reductions, the population descriptor tables and the use
of the WMMA API on any machine with g++ and the CUDA headers; it does not check what only a GPU
can show (the real fragment layouts, memory ordering between warps, speed). Outputs start as NaN
(PYEVO_POISON_OUTPUTS), so an element no block writes fails the comparison.
"""
from __future__ import annotations

import os
import pathlib
import random
import shutil
import tempfile

import pytest
import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_INCLUDE = pathlib.Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"

pytestmark = [pytest.mark.emulation, pytest.mark.skipif(
    shutil.which("g++") is None or not (CUDA_INCLUDE / "cuda_fp16.h").is_file(),
    reason="the host emulation needs g++ and the CUDA headers (CUDA_HOME)")]


@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load

    build = pathlib.Path(os.environ.get(
        "PYEVO_EMULATION_BUILD", pathlib.Path(tempfile.gettempdir()) / f"pyevo_emulation_{os.getuid()}"))
    build.mkdir(parents=True, exist_ok=True)
    here = ROOT / "tests" / "cuda_emulation"
    module = load(name="pyevo_cuda_emulation", sources=[str(here / "harness.cpp")],
                  extra_cflags=["-std=c++20", "-O1", "-w", "-DPYEVO_HOST_EMULATION",
                                "-DPYEVO_POISON_OUTPUTS", "-include", str(here / "emulation.h"),
                                f"-I{CUDA_INCLUDE}", f"-I{ROOT / 'kernels'}", f"-I{ROOT / 'csrc'}",
                                f"-I{ROOT / 'csrc' / 'cuda'}"],
                  extra_ldflags=["-lpthread"], build_directory=str(build), verbose=False)
    return module


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (NaN in actual gives inf)."""
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_close_to(actual, expected, reduced_precision_reference=None, tolerance=None):
    """Our error against a float64 reference: within `tolerance`, or at most twice PyTorch's own
    error in the same precision (`reduced_precision_reference`, computed by PyTorch on the CPU)."""
    ours = relative_error(actual, expected)
    if reduced_precision_reference is not None:
        theirs = relative_error(reduced_precision_reference, expected)
        assert ours <= 2 * theirs + 1e-6, f"error {ours:.3g} vs PyTorch's {theirs:.3g}"
    else:
        assert ours <= tolerance, f"error {ours:.3g} > {tolerance:.3g}"


FP_TOLERANCE = {torch.float32: 2e-6, torch.float64: 1e-13}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def check(actual, reference_fn, inputs, dtype):
    """Compare with reference_fn in float64; float16/bfloat16 against PyTorch's own error in the
    same precision (PyTorch's CPU ops on the same inputs; where PyTorch has no such CPU kernel, the
    float32 result rounded to the dtype, the least error any kernel can have)."""
    expected = reference_fn(*[t.double() if torch.is_tensor(t) else t for t in inputs])
    if dtype in (torch.float16, torch.bfloat16):
        try:
            theirs = reference_fn(*inputs)
        except RuntimeError:
            theirs = reference_fn(*[t.float() if torch.is_tensor(t) else t for t in inputs]).to(dtype)
        assert_close_to(actual, expected, reduced_precision_reference=theirs)
    else:
        assert_close_to(actual, expected, tolerance=FP_TOLERANCE[dtype])


# ---------------------------------------------------------------------------------------------
# GroupNorm + SiLU
# ---------------------------------------------------------------------------------------------


def group_norm_silu_reference(x, weight, bias, channels_per_group, eps):
    c = x.shape[1]
    return F.silu(F.group_norm(x, c // channels_per_group, weight[:c], bias[:c], eps))


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_silu_population_forward(emu, dtype):
    generator = torch.Generator().manual_seed(random.getrandbits(32))
    weight = (1 + 0.5 * torch.randn(40, generator=generator)).to(dtype)
    bias = (0.5 * torch.randn(40, generator=generator)).to(dtype)
    # packed (HxW multiple of the pack) and scalar inputs, 1-D spatial, one wide group
    inputs = [(3 * torch.randn(2, 8, 5, 6, generator=generator) + 0.5).to(dtype),
              (3 * torch.randn(3, 12, 4, 4, generator=generator)).to(dtype),
              torch.randn(1, 40, 7, generator=generator).to(dtype),
              torch.randn(2, 4, 33, 17, generator=generator)[:, :, 1:].to(dtype)]
    outputs = emu.group_norm_silu_forward(inputs, weight, bias, 4, 1e-5)
    for out, x in zip(outputs, inputs):
        assert out.shape == x.shape and out.is_contiguous()
        check(out, lambda x, w, b: group_norm_silu_reference(x, w, b, 4, 1e-5), [x, weight, bias], dtype)
    # One input alone: the single-op path (problem passed by value; packed loads here, where the
    # population launch above has to use scalar loads for all, so only rounding differs).
    single = emu.group_norm_silu_forward(inputs[1:2], weight, bias, 4, 1e-5)[0]
    check(single, lambda x, w, b: group_norm_silu_reference(x, w, b, 4, 1e-5),
          [inputs[1], weight, bias], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,channels_per_group", [
    ((2, 8, 5, 6), 4), ((3, 12, 4, 4), 4), ((1, 40, 7), 8), ((2, 4, 33, 17), 4),
    ((2, 64, 3, 3), 64), ((2, 4, 64, 64), 1), ((2, 6, 1, 1), 3)], ids=str)
def test_group_norm_silu_backward(emu, dtype, shape, channels_per_group):
    generator = torch.Generator().manual_seed(random.getrandbits(32))
    channels = shape[1]
    x = (2 * torch.randn(shape, generator=generator) + 0.3).to(dtype)
    weight = (1 + 0.5 * torch.randn(channels + 3, generator=generator)).to(dtype)
    bias = (0.5 * torch.randn(channels + 3, generator=generator)).to(dtype)
    grad_output = torch.randn(shape, generator=generator).to(dtype)
    grads = emu.group_norm_silu_backward(grad_output, x, weight, bias, channels_per_group, 1e-5)

    def reference(x, w, b, g, index):
        x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
        out = group_norm_silu_reference(x, w, b, channels_per_group, 1e-5)
        return torch.autograd.grad(out, [x, w, b], g)[index]

    for index, grad in enumerate(grads):
        check(grad, lambda x, w, b, g: reference(x, w, b, g, index), [x, weight, bias, grad_output],
              dtype)
    assert (grads[1][channels:] == 0).all() and (grads[2][channels:] == 0).all()


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def attention_core_reference(q, k, v, heads, head_dim):
    batch, seq, _ = q.shape

    def split(t):
        return t.reshape(batch, t.shape[1], heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,seq,kv_seq,heads,head_dim", [
    (2, 70, 70, 3, 32), (1, 5, 130, 2, 64), (2, 129, 17, 1, 8), (1, 64, 64, 2, 40)], ids=str)
def test_attention_core(emu, dtype, batch, seq, kv_seq, heads, head_dim):
    generator = torch.Generator().manual_seed(random.getrandbits(32))
    q, k, v = (torch.randn(batch, s, heads * head_dim, generator=generator).to(dtype)
               for s in (seq, kv_seq, kv_seq))
    out = emu.attention_cores([q], [k], [v], [heads], head_dim)[0]
    check(out, lambda q, k, v: attention_core_reference(q, k, v, heads, head_dim), [q, k, v], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_cores_of_a_population_in_one_launch(emu, dtype):
    generator = torch.Generator().manual_seed(random.getrandbits(32))
    head_counts = (1, 2, 4)
    qkv = [[torch.randn(2, 40, h * 32, generator=generator).to(dtype) for _ in range(3)]
           for h in head_counts]
    outputs = emu.attention_cores(*[list(t) for t in zip(*qkv)], list(head_counts), 32)
    for out, (q, k, v), h in zip(outputs, qkv, head_counts):
        check(out, lambda q, k, v: attention_core_reference(q, k, v, h, 32), [q, k, v], dtype)


def attention_reference(x, q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, heads, head_dim):
    inner = heads * head_dim
    project = lambda w, b: F.linear(x, w[:inner], None if b is None else b[:inner])  # noqa: E731
    attended = attention_core_reference(project(q_w, q_b), project(k_w, k_b), project(v_w, v_b),
                                        heads, head_dim)
    return F.linear(attended, o_w[:, :inner], o_b)


@pytest.mark.parametrize("shared_input", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_population_attention(emu, dtype, shared_input):
    generator = torch.Generator().manual_seed(random.getrandbits(32))
    channels, head_dim, heads = 48, 16, [3, 1, 3, 2]
    weights = [torch.randn(3 * head_dim, channels, generator=generator) / channels ** 0.5,
               torch.randn(3 * head_dim, generator=generator),
               torch.randn(3 * head_dim, channels, generator=generator) / channels ** 0.5, None,
               torch.randn(3 * head_dim, channels, generator=generator) / channels ** 0.5,
               torch.randn(3 * head_dim, generator=generator),
               torch.randn(channels, 3 * head_dim, generator=generator) / 48 ** 0.5,
               torch.randn(channels, generator=generator)]
    weights = [None if w is None else w.to(dtype) for w in weights]
    count = 1 if shared_input else len(heads)
    inputs = [torch.randn(2, 21, channels, generator=generator).to(dtype) for _ in range(count)]
    outputs = emu.population_attention(inputs, *weights, heads, head_dim)
    assert len(outputs) == len(heads)
    assert len({o.data_ptr() for o in outputs}) == len(outputs)  # no output aliases another
    for i, (out, h) in enumerate(zip(outputs, heads)):
        x = inputs[0 if shared_input else i]
        check(out, lambda x, *w: attention_reference(x, *w, h, head_dim), [x, *weights], dtype)

"""Tests of the torch.ops.pyevo ops against plain PyTorch.

Each op is compared with its reference (slice + ``.contiguous()`` + ``F.conv2d`` /
``F.group_norm`` + ``F.silu`` / ``F.scaled_dot_product_attention``) on many random shapes, in
float32 and float64, forward and backward; checked with gradcheck, opcheck and torch.compile;
and fed bad arguments. CUDA tests run only where a GPU is visible.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import zlib
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import pyevo
from pyevo import ops

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Tolerances relative to the reference's scale (its largest magnitude): float64 near exact,
# float32 within a few ulps of summation-order differences.
SCALE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                   factor: float = 1.0) -> None:
    tolerance = SCALE_TOLERANCE[dtype] * factor
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * scale)


def assert_gradients_match(actual, expected, dtype, factor: float = 1.0) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert (a is None) == (e is None)
        if a is not None:
            assert a.shape == e.shape
            assert_matches(a, e, dtype, factor)


def grads_of(output: torch.Tensor, inputs, grad_output: torch.Tensor):
    """Gradients w.r.t. those inputs that are tensors requiring grad (None for the others)."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(output, wanted, grad_output))
    return [next(grads) if t is not None and t.requires_grad else None for t in inputs]


def leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().requires_grad_()


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def conv_reference(input, weight, bias, out_channels, kernel_size, stride):
    offset = (weight.shape[2] - kernel_size) // 2
    sub_weight = weight[:out_channels, :input.shape[1], offset:offset + kernel_size,
                        offset:offset + kernel_size].contiguous()
    sub_bias = bias[:out_channels] if bias is not None else None
    return F.conv2d(input, sub_weight, sub_bias, stride=stride, padding=kernel_size // 2)


def group_norm_silu_reference(input, weight, bias, channels_per_group, eps):
    channels = input.shape[1]
    return F.silu(F.group_norm(input, channels // channels_per_group, weight[:channels],
                               bias[:channels], eps))


def attention_reference(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias,
                        v_weight, v_bias, out_weight, out_bias, heads, head_dim):
    inner = heads * head_dim
    kv_source = hidden_states if encoder_hidden_states is None else encoder_hidden_states

    def project(x, weight, bias):
        return F.linear(x, weight[:inner].contiguous(), None if bias is None else bias[:inner])

    def split_heads(t):
        return t.unflatten(-1, (heads, head_dim)).transpose(1, 2)

    attended = F.scaled_dot_product_attention(split_heads(project(hidden_states, q_weight, q_bias)),
                                              split_heads(project(kv_source, k_weight, k_bias)),
                                              split_heads(project(kv_source, v_weight, v_bias)))
    return F.linear(attended.transpose(1, 2).flatten(2), out_weight[:, :inner].contiguous(),
                    out_bias)


# ---------------------------------------------------------------------------------------------
# Random cases
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvCase:
    batch: int
    in_channels: int
    in_channels_max: int
    out_channels: int
    out_channels_max: int
    shared_kernel: int
    kernel_size: int
    stride: int
    height: int
    width: int
    bias: bool
    layout: str  # input: contiguous | channels_last | sliced; weight_permuted: a strided weight

    def make(self, dtype, generator):
        def randn(*shape):
            return torch.randn(*shape, dtype=dtype, generator=generator)

        shape = (self.batch, self.in_channels, self.height, self.width)
        if self.layout == "channels_last":
            x = randn(*shape).to(memory_format=torch.channels_last)
        elif self.layout == "sliced":
            x = randn(self.batch, self.in_channels + 2, self.height, self.width + 3)[:, 1:-1, :, 2:-1]
        else:
            x = randn(*shape)
        k = self.shared_kernel
        if self.layout == "weight_permuted":
            w = randn(k, k, self.in_channels_max, self.out_channels_max).permute(3, 2, 0, 1)
        else:
            w = randn(self.out_channels_max, self.in_channels_max, k, k)
        b = randn(self.out_channels_max) if self.bias else None
        return x, w, b

    @property
    def args(self):
        return self.out_channels, self.kernel_size, self.stride


def conv_cases(count: int, seed: int) -> list[ConvCase]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        shared_kernel = rng.choice([1, 3, 5, 7])
        in_max, out_max = rng.randint(1, 10), rng.randint(1, 10)
        cases.append(ConvCase(
            batch=rng.randint(1, 3), in_channels=rng.randint(1, in_max), in_channels_max=in_max,
            out_channels=rng.randint(1, out_max), out_channels_max=out_max,
            shared_kernel=shared_kernel,
            kernel_size=rng.choice([k for k in (1, 3, 5, 7) if k <= shared_kernel]),
            stride=rng.choice([1, 2]), height=rng.randint(1, 12), width=rng.randint(1, 12),
            bias=rng.random() < 0.7,
            layout=rng.choice(["contiguous", "contiguous", "channels_last", "sliced",
                               "weight_permuted"])))
    # Edge cases: the full shared weight, a 1x1 crop of a 7x7 kernel, 1x1 images with stride 2.
    cases += [ConvCase(2, 4, 4, 6, 6, 3, 3, 1, 8, 8, True, "contiguous"),
              ConvCase(1, 3, 5, 2, 4, 7, 1, 2, 9, 5, False, "contiguous"),
              ConvCase(3, 2, 2, 3, 3, 5, 5, 2, 1, 1, True, "sliced")]
    return cases


@dataclasses.dataclass(frozen=True)
class GroupNormCase:
    batch: int
    channels_per_group: int
    groups: int
    extra_channels: int  # shared parameters are this much longer than C
    spatial: tuple
    eps: float
    layout: str  # contiguous | sliced | channels_last

    @property
    def channels(self) -> int:
        return self.channels_per_group * self.groups

    def make(self, dtype, generator):
        def randn(*shape):
            return torch.randn(*shape, dtype=dtype, generator=generator)

        shape = (self.batch, self.channels, *self.spatial)
        if self.layout == "sliced":
            x = randn(self.batch, self.channels + 3, *self.spatial)[:, 2:-1]
        elif self.layout == "channels_last" and len(self.spatial) == 2:
            x = randn(*shape).to(memory_format=torch.channels_last)
        else:
            x = randn(*shape)
        # Not all-ones/zeros affine parameters, so a mix-up of channels would show.
        length = self.channels + self.extra_channels
        w = 1 + 0.5 * randn(length)
        b = 0.5 * randn(length)
        return 3 * x + 0.5, w, b

    @property
    def args(self):
        return self.channels_per_group, self.eps


def group_norm_cases(count: int, seed: int) -> list[GroupNormCase]:
    rng = random.Random(seed)
    spatials = [(), (1,), (7,), (5, 3), (4, 4), (9, 11), (16, 16), (3, 2, 5), (1, 1), (33, 17)]
    cases = [GroupNormCase(batch=rng.randint(1, 3), channels_per_group=rng.choice([1, 2, 3, 4, 8]),
                           groups=rng.randint(1, 6), extra_channels=rng.choice([0, 0, 1, 5]),
                           spatial=rng.choice(spatials), eps=rng.choice([1e-5, 1e-6, 1e-3]),
                           layout=rng.choice(["contiguous", "contiguous", "sliced",
                                              "channels_last"]))
             for _ in range(count)]
    # A slab longer than one summation block, and one group over all channels.
    cases += [GroupNormCase(2, 4, 8, 8, (32, 32), 1e-5, "contiguous"),
              GroupNormCase(1, 6, 1, 0, (13, 7), 1e-5, "contiguous")]
    return cases


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    batch: int
    seq: int
    channels: int
    cross: Optional[tuple]  # (S_kv, C_kv) for cross-attention, None for self-attention
    heads: int
    heads_max: int
    head_dim: int
    biases: tuple  # which of q, k, v, out have a bias
    sliced_input: bool

    def make(self, dtype, generator):
        def randn(*shape):
            return torch.randn(*shape, dtype=dtype, generator=generator)

        b, s, c = self.batch, self.seq, self.channels
        hs = randn(b, s, c + 2)[..., 1:-1] if self.sliced_input else randn(b, s, c)
        ehs = randn(b, *self.cross) if self.cross is not None else None
        kv_channels = self.cross[1] if self.cross is not None else c
        rows = self.heads_max * self.head_dim
        # nn.Linear-like scale, so softmax is neither uniform nor one-hot.
        q_w, k_w = randn(rows, c) / c ** 0.5, randn(rows, kv_channels) / kv_channels ** 0.5
        v_w, o_w = randn(rows, kv_channels) / kv_channels ** 0.5, randn(c, rows) / rows ** 0.5
        q_b, k_b, v_b, o_b = (randn(n) if present else None
                              for n, present in zip((rows, rows, rows, c), self.biases))
        return [hs, ehs, q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b]

    @property
    def args(self):
        return self.heads, self.head_dim


def attention_cases(count: int, seed: int) -> list[AttentionCase]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        heads_max = rng.randint(1, 4)
        cases.append(AttentionCase(
            batch=rng.randint(1, 3), seq=rng.randint(1, 9), channels=rng.randint(1, 12),
            cross=(rng.randint(1, 7), rng.randint(1, 10)) if rng.random() < 0.4 else None,
            heads=rng.randint(1, heads_max), heads_max=heads_max, head_dim=rng.randint(1, 8),
            biases=tuple(rng.random() < 0.6 for _ in range(4)), sliced_input=rng.random() < 0.3))
    cases += [AttentionCase(2, 16, 8, None, 2, 2, 4, (True,) * 4, False),
              AttentionCase(2, 6, 8, (5, 3), 1, 3, 4, (False,) * 4, False)]
    return cases


CONV_CASES = conv_cases(24, seed=1)
GROUP_NORM_CASES = group_norm_cases(24, seed=2)
ATTENTION_CASES = attention_cases(20, seed=3)
DTYPES = [torch.float32, torch.float64]


def case_id(case) -> str:
    return "-".join(f"{v}" for v in dataclasses.astuple(case)).replace(" ", "")


def case_seed(case) -> int:
    """A per-case seed that does not change between runs (str hashes do)."""
    return zlib.crc32(case_id(case).encode())


# ---------------------------------------------------------------------------------------------
# Equality with plain PyTorch, forward and backward
# ---------------------------------------------------------------------------------------------


def test_import_registers_ops():
    for name in ("shared_conv2d", "shared_conv2d_backward", "shared_group_norm_silu",
                 "shared_group_norm_silu_backward", "shared_attention",
                 "shared_attention_backward", "population_conv2d", "population_group_norm_silu",
                 "population_attention"):
        assert hasattr(torch.ops.pyevo, name)
    info = pyevo.build_info()
    assert info["torch_version"] == torch.__version__


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_shared_conv2d_matches_reference(case: ConvCase, dtype):
    check_shared_conv2d(case, dtype)


def check_shared_conv2d(case: ConvCase, dtype) -> None:
    """Forward and backward against plain PyTorch (also driven by tests/test_ops_fuzz.py)."""
    generator = torch.Generator().manual_seed(case_seed(case))
    x, w, b = (leaf(t) if t is not None else None for t in case.make(dtype, generator))
    out = torch.ops.pyevo.shared_conv2d(x, w, b, *case.args)
    expected = conv_reference(x, w, b, *case.args)
    assert out.is_contiguous()
    assert_matches(out, expected, dtype)

    grad_output = torch.randn(expected.shape, dtype=dtype, generator=generator)
    inputs = (x, w, b)
    grads = grads_of(out, inputs, grad_output)
    assert_gradients_match(grads, grads_of(expected, inputs, grad_output), dtype)
    # Full shared shapes, zero outside the slice used.
    assert grads[1].shape == w.shape
    assert grads[1][case.out_channels:].abs().sum() == 0
    assert grads[1][:, case.in_channels:].abs().sum() == 0


def test_shared_conv2d_grads_only_where_needed():
    x = torch.randn(2, 3, 6, 6)
    w = leaf(torch.randn(5, 4, 3, 3))
    b = torch.randn(5)
    out = torch.ops.pyevo.shared_conv2d(x, w, b, 4, 3)
    (grad_w,) = torch.autograd.grad(out.sum(), [w])
    assert_matches(grad_w, torch.autograd.grad(conv_reference(x, w, b, 4, 3, 1).sum(), [w])[0],
                   torch.float32)
    gi, gw, gb = torch.ops.pyevo.shared_conv2d_backward(torch.ones_like(out), x, w.detach(), b,
                                                        4, 3, 1, [False, True, False])
    assert gi.shape == (0,) and gb.shape == (0,) and gw.shape == w.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GROUP_NORM_CASES, ids=case_id)
def test_shared_group_norm_silu_matches_reference(case: GroupNormCase, dtype):
    check_shared_group_norm_silu(case, dtype)


def check_shared_group_norm_silu(case: GroupNormCase, dtype) -> None:
    """Forward and backward against plain PyTorch (also driven by tests/test_ops_fuzz.py)."""
    generator = torch.Generator().manual_seed(case_seed(case))
    x, w, b = (leaf(t) for t in case.make(dtype, generator))
    out = torch.ops.pyevo.shared_group_norm_silu(x, w, b, *case.args)
    expected = group_norm_silu_reference(x, w, b, *case.args)
    assert out.is_contiguous()
    assert_matches(out, expected, dtype)

    grad_output = torch.randn(expected.shape, dtype=dtype, generator=generator)
    inputs = (x, w, b)
    grads = grads_of(out, inputs, grad_output)
    # The backward sums over a whole group in two different orders: a few more ulps.
    assert_gradients_match(grads, grads_of(expected, inputs, grad_output), dtype, factor=4)
    assert grads[1].shape == w.shape and grads[2].shape == b.shape
    assert grads[1][case.channels:].abs().sum() == 0 and grads[2][case.channels:].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GROUP_NORM_CASES[:8], ids=case_id)
def test_shared_group_norm_silu_reduced_precision(case: GroupNormCase, dtype):
    # Statistics and arithmetic in float32, one rounding at the end.
    generator = torch.Generator().manual_seed(case_seed(case))
    x, w, b = (t.to(dtype) for t in case.make(torch.float32, generator))
    out = torch.ops.pyevo.shared_group_norm_silu(x, w, b, *case.args)
    assert out.dtype == dtype
    expected = group_norm_silu_reference(x.float(), w.float(), b.float(), *case.args)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)


def test_shared_group_norm_silu_precision_with_large_mean():
    # A mean 1000x the spread: a one-pass E[x^2] - E[x]^2 in float32 would lose all digits.
    generator = torch.Generator().manual_seed(0)
    x = 1000 + torch.randn(2, 16, 32, 32, generator=generator)
    w, b = torch.randn(16, generator=generator), torch.randn(16, generator=generator)
    out = torch.ops.pyevo.shared_group_norm_silu(x, w, b, 4, 1e-5)
    truth = group_norm_silu_reference(x.double(), w.double(), b.double(), 4, 1e-5)
    torch_error = (group_norm_silu_reference(x, w, b, 4, 1e-5).double() - truth).abs().max()
    our_error = (out.double() - truth).abs().max()
    assert our_error < 1e-3
    assert our_error <= 2 * torch_error + 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=case_id)
def test_shared_attention_matches_reference(case: AttentionCase, dtype):
    check_shared_attention(case, dtype)


def check_shared_attention(case: AttentionCase, dtype) -> None:
    """Forward and backward against plain PyTorch (also driven by tests/test_ops_fuzz.py)."""
    generator = torch.Generator().manual_seed(case_seed(case))
    tensors = [leaf(t) if t is not None else None for t in case.make(dtype, generator)]
    out = torch.ops.pyevo.shared_attention(*tensors, *case.args)
    expected = attention_reference(*tensors, *case.args)
    assert out.is_contiguous()
    assert_matches(out, expected, dtype)

    grad_output = torch.randn(expected.shape, dtype=dtype, generator=generator)
    grads = grads_of(out, tensors, grad_output)
    assert_gradients_match(grads, grads_of(expected, tensors, grad_output), dtype, factor=4)
    inner = case.heads * case.head_dim
    q_weight_grad, out_weight_grad = grads[2], grads[8]
    assert q_weight_grad[inner:].abs().sum() == 0 and out_weight_grad[:, inner:].abs().sum() == 0


def test_typed_wrappers_call_the_ops():
    x, w, b = torch.randn(1, 2, 5, 5), torch.randn(3, 4, 3, 3), torch.randn(3)
    assert torch.equal(ops.shared_conv2d(x, w, b, 2, 1, stride=2),
                       torch.ops.pyevo.shared_conv2d(x, w, b, 2, 1, 2))
    g, gw, gb = torch.randn(2, 4, 3), torch.randn(6), torch.randn(6)
    assert torch.equal(ops.shared_group_norm_silu(g, gw, gb, 2, 1e-5),
                       torch.ops.pyevo.shared_group_norm_silu(g, gw, gb, 2, 1e-5))
    tensors = ATTENTION_CASES[-1].make(torch.float32, torch.Generator().manual_seed(0))
    assert torch.equal(ops.shared_attention(*tensors, 1, 4),
                       torch.ops.pyevo.shared_attention(*tensors, 1, 4))


def test_group_norm_silu_backward_composite_matches_kernel():
    # The ATen composite is the CUDA backward; here it is checked against the CPU kernel.
    for dtype in DTYPES:
        generator = torch.Generator().manual_seed(7)
        case = GroupNormCase(2, 3, 4, 2, (5, 7), 1e-5, "sliced")
        x, w, b = case.make(dtype, generator)
        grad_output = torch.randn(x.shape, dtype=dtype, generator=generator)
        composite = pyevo._C._shared_group_norm_silu_backward_composite(grad_output, x, w, b,
                                                                        *case.args)
        kernel = torch.ops.pyevo.shared_group_norm_silu_backward(grad_output, x, w, b, *case.args)
        assert_gradients_match(list(composite), list(kernel), dtype, factor=4)


@pytest.mark.parametrize("case", ATTENTION_CASES[-2:], ids=case_id)
def test_attention_backward_composite_matches_kernel(case):
    # The math composite (materialised attention matrix) is the CUDA backward; the CPU kernel
    # uses ATen's CPU flash kernels instead.
    tensors = case.make(torch.float64, torch.Generator().manual_seed(5))
    grad_output = torch.randn(tensors[0].shape, dtype=torch.float64)
    composite = pyevo._C._shared_attention_backward_composite(grad_output, *tensors, *case.args)
    kernel = torch.ops.pyevo.shared_attention_backward(grad_output, *tensors, *case.args)
    assert_gradients_match(composite, kernel, torch.float64, factor=4)


def test_attention_with_empty_sequences():
    case = AttentionCase(2, 3, 4, (1, 5), 1, 2, 2, (True,) * 4, False)
    tensors = [leaf(t) if t is not None else None
               for t in case.make(torch.float64, torch.Generator().manual_seed(0))]
    tensors[0] = leaf(tensors[0][:, :0])  # no queries
    out = torch.ops.pyevo.shared_attention(*tensors, *case.args)
    assert out.shape == (2, 0, 4)
    grads = grads_of(out, tensors, torch.ones_like(out))
    assert grads[0].shape == (2, 0, 4) and grads[2].abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """gradcheck makes thousands of calls on tiny tensors, where intra-op threads only add
    synchronisation (on a busy 2-core machine, milliseconds per call, for ATen's ops too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def double_leaves(*shapes, generator):
    return [leaf(torch.randn(*s, dtype=torch.float64, generator=generator)) if s else None
            for s in shapes]


@pytest.mark.parametrize("bias,stride", [(True, 2), (False, 1)])
def test_shared_conv2d_gradcheck(bias, stride, one_thread):
    # Small: the numerical Jacobian takes two forward calls per input element.
    x, w, b = double_leaves((1, 2, 5, 4), (4, 3, 5, 5), (4,) if bias else None,
                            generator=torch.Generator().manual_seed(0))
    inputs = (x, w, b) if bias else (x, w)
    assert torch.autograd.gradcheck(
        lambda x, w, b=None: torch.ops.pyevo.shared_conv2d(x, w, b, 3, 3, stride), inputs)


def test_shared_group_norm_silu_gradcheck(one_thread):
    x, w, b = double_leaves((2, 6, 3, 4), (8,), (8,), generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(
        lambda x, w, b: torch.ops.pyevo.shared_group_norm_silu(x, w, b, 2, 1e-5), (x, w, b))


@pytest.mark.parametrize("cross", [False, True])
def test_shared_attention_gradcheck(cross, one_thread):
    case = AttentionCase(2, 4, 5, (3, 4) if cross else None, 2, 3, 2,
                         (True, False, True, True), False)
    tensors = [leaf(t) if t is not None else None
               for t in case.make(torch.float64, torch.Generator().manual_seed(0))]
    present = [i for i, t in enumerate(tensors) if t is not None]

    def attention(*given):
        full = [None] * len(tensors)
        for i, t in zip(present, given):
            full[i] = t
        return torch.ops.pyevo.shared_attention(*full, *case.args)

    assert torch.autograd.gradcheck(attention, [tensors[i] for i in present])


def opcheck(op, args):
    results = torch.library.opcheck(op, args)
    assert all(r == "SUCCESS" for r in results.values()), results


@pytest.mark.parametrize("bias", [True, False])
def test_shared_conv2d_opcheck(bias):
    generator = torch.Generator().manual_seed(0)
    x, w, b = ConvCase(2, 3, 4, 5, 6, 5, 3, 2, 7, 6, bias, "contiguous").make(torch.float32,
                                                                          generator)
    opcheck(torch.ops.pyevo.shared_conv2d.default, (leaf(x), leaf(w), leaf(b) if bias else None,
                                                    5, 3, 2))
    grad_output = torch.randn(2, 5, 4, 3, generator=generator)
    for mask in ([True, True, True], [False, True, False]):
        opcheck(torch.ops.pyevo.shared_conv2d_backward.default,
                (grad_output, x, w, b, 5, 3, 2, mask))


def test_shared_group_norm_silu_opcheck():
    generator = torch.Generator().manual_seed(0)
    x, w, b = GroupNormCase(2, 2, 3, 2, (5, 3), 1e-5, "contiguous").make(torch.float32, generator)
    opcheck(torch.ops.pyevo.shared_group_norm_silu.default, (leaf(x), leaf(w), leaf(b), 2, 1e-5))
    opcheck(torch.ops.pyevo.shared_group_norm_silu_backward.default,
            (torch.randn(x.shape, generator=generator), x, w, b, 2, 1e-5))


@pytest.mark.parametrize("cross", [False, True])
def test_shared_attention_opcheck(cross):
    generator = torch.Generator().manual_seed(0)
    case = AttentionCase(2, 5, 6, (4, 3) if cross else None, 2, 3, 3,
                         (True, True, False, True), False)
    tensors = case.make(torch.float32, generator)
    opcheck(torch.ops.pyevo.shared_attention.default,
            (*(leaf(t) if t is not None else None for t in tensors), *case.args))
    opcheck(torch.ops.pyevo.shared_attention_backward.default,
            (torch.randn(2, 5, 6, generator=generator), *tensors, *case.args))


class SharedBlock(torch.nn.Module):
    """conv -> GroupNorm+SiLU -> self-attention over pixels, all on slices of shared weights."""

    def __init__(self):
        super().__init__()
        self.conv_weight = torch.nn.Parameter(torch.randn(12, 4, 5, 5) * 0.2)
        self.conv_bias = torch.nn.Parameter(torch.randn(12) * 0.1)
        self.norm_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(12))
        self.norm_bias = torch.nn.Parameter(0.1 * torch.randn(12))
        self.q = torch.nn.Parameter(torch.randn(12, 8) * 0.3)
        self.k = torch.nn.Parameter(torch.randn(12, 8) * 0.3)
        self.v = torch.nn.Parameter(torch.randn(12, 8) * 0.3)
        self.out = torch.nn.Parameter(torch.randn(8, 12) * 0.3)
        self.out_bias = torch.nn.Parameter(torch.zeros(8))

    def forward(self, x):
        h = ops.shared_conv2d(x, self.conv_weight, self.conv_bias, 8, 3, 2)
        h = ops.shared_group_norm_silu(h, self.norm_weight, self.norm_bias, 2, 1e-5)
        tokens = h.flatten(2).transpose(1, 2)
        tokens = ops.shared_attention(tokens, None, self.q, None, self.k, None, self.v, None,
                                      self.out, self.out_bias, 2, 4)
        return tokens.sum(dim=1)


def check_compiled_block(**compile_kwargs):
    torch.manual_seed(0)
    block = SharedBlock()
    compiled = torch.compile(block, fullgraph=True, **compile_kwargs)
    for batch in (2, 3):  # a second shape: recompiles, or exercises the dynamic shapes
        x = torch.randn(batch, 3, 9, 8)
        expected = block(x)
        expected_grads = torch.autograd.grad(expected.square().sum(), list(block.parameters()))
        actual = compiled(x)
        actual_grads = torch.autograd.grad(actual.square().sum(), list(block.parameters()))
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        for a, e in zip(actual_grads, expected_grads):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,dynamic", [("eager", False), ("aot_eager", False),
                                             ("aot_eager", True)])
def test_compile(backend, dynamic):
    torch._dynamo.reset()
    check_compiled_block(backend=backend, dynamic=dynamic)


def test_compile_inductor():
    torch._dynamo.reset()
    check_compiled_block()


# ---------------------------------------------------------------------------------------------
# Misuse
# ---------------------------------------------------------------------------------------------


def _conv(x=None, w=None, b=None, out_channels=4, kernel_size=3, stride=1):
    x = torch.randn(1, 3, 6, 6) if x is None else x
    w = torch.randn(6, 4, 5, 5) if w is None else w
    return torch.ops.pyevo.shared_conv2d(x, w, b, out_channels, kernel_size, stride)


def _norm(x=None, w=None, b=None, channels_per_group=2):
    x = torch.randn(2, 6, 4, 4) if x is None else x
    w = torch.randn(8) if w is None else w
    b = torch.randn(8) if b is None else b
    return torch.ops.pyevo.shared_group_norm_silu(x, w, b, channels_per_group, 1e-5)


def _attention(hs=None, ehs=None, q_w=None, q_b=None, o_w=None, o_b=None, heads=2, head_dim=3):
    hs = torch.randn(2, 5, 6) if hs is None else hs
    kv_channels = 6 if ehs is None else ehs.shape[-1]
    q_w = torch.randn(9, 6) if q_w is None else q_w
    kv_w = torch.randn(9, kv_channels)
    o_w = torch.randn(6, 9) if o_w is None else o_w
    return torch.ops.pyevo.shared_attention(hs, ehs, q_w, q_b, kv_w, None, kv_w, None, o_w, o_b,
                                            heads, head_dim)


MISUSE = {
    "conv dtype mix": (lambda: _conv(w=torch.randn(6, 4, 5, 5, dtype=torch.float64)),
                       "weight has dtype Double but input has dtype Float"),
    "conv bias dtype": (lambda: _conv(b=torch.randn(6, dtype=torch.float64)), "bias has dtype"),
    "conv too wide out": (lambda: _conv(out_channels=7), "out_channels 7 is larger"),
    "conv too wide in": (lambda: _conv(x=torch.randn(1, 5, 6, 6)), "input has 5 channels"),
    "conv kernel too large": (lambda: _conv(kernel_size=7), "kernel_size 7 is larger"),
    "conv even kernel": (lambda: _conv(kernel_size=2), "kernel_size must be odd"),
    "conv even shared kernel": (lambda: _conv(w=torch.randn(6, 4, 4, 4)), "K must be odd"),
    "conv non-square kernel": (lambda: _conv(w=torch.randn(6, 4, 5, 3)), "square kernel"),
    "conv input rank": (lambda: _conv(x=torch.randn(3, 6, 6)), "input must be 4-D"),
    "conv weight rank": (lambda: _conv(w=torch.randn(6, 4, 5)), "weight must be 4-D"),
    "conv short bias": (lambda: _conv(b=torch.randn(3)), "bias has 3 entries but 4 are used"),
    "conv stride": (lambda: _conv(stride=0), "stride must be >= 1"),
    "conv integer input": (lambda: _conv(x=torch.ones(1, 3, 6, 6, dtype=torch.int64),
                                         w=torch.ones(6, 4, 5, 5, dtype=torch.int64)),
                           "floating-point"),
    "norm not divisible": (lambda: _norm(channels_per_group=4), "not divisible"),
    "norm dtype mix": (lambda: _norm(w=torch.randn(8, dtype=torch.float64)), "weight has dtype"),
    "norm short weight": (lambda: _norm(w=torch.randn(5)), "weight has 5 entries"),
    "norm short bias": (lambda: _norm(b=torch.randn(4)), "bias has 4 entries"),
    "norm input rank": (lambda: _norm(x=torch.randn(6)), "at least 2 dims"),
    "norm weight rank": (lambda: _norm(w=torch.randn(2, 4)), "weight must be 1-D"),
    "norm zero per group": (lambda: _norm(channels_per_group=0), "channels_per_group must be"),
    "attention too many heads": (lambda: _attention(heads=4), "larger than q_weight's 9 rows"),
    "attention out too narrow": (lambda: _attention(o_w=torch.randn(6, 3)),
                                 "larger than out_weight's 3 columns"),
    "attention dtype mix": (lambda: _attention(q_w=torch.randn(9, 6, dtype=torch.float64)),
                            "q_weight has dtype"),
    "attention rank": (lambda: _attention(hs=torch.randn(5, 6)), "hidden_states must be 3-D"),
    "attention q features": (lambda: _attention(q_w=torch.randn(9, 5)), "q_weight has 5 input"),
    "attention kv batch": (lambda: _attention(ehs=torch.randn(3, 4, 6)), "batch size"),
    "attention out bias": (lambda: _attention(o_b=torch.randn(7)), "out_bias has 7 entries"),
    "attention q bias": (lambda: _attention(q_b=torch.randn(5)), "q_bias has 5 entries"),
}


@pytest.mark.parametrize("name", list(MISUSE))
def test_misuse_raises_clear_error(name):
    call, message = MISUSE[name]
    with pytest.raises(RuntimeError, match=message):
        call()


def test_backward_misuse_raises_clear_error():
    x, w = torch.randn(1, 3, 6, 6), torch.randn(6, 4, 5, 5)
    with pytest.raises(RuntimeError, match="grad_output has shape"):
        torch.ops.pyevo.shared_conv2d_backward(torch.randn(1, 4, 5, 6), x, w, None, 4, 3, 1,
                                               [True, True, False])
    with pytest.raises(RuntimeError, match="grad_output has shape"):
        torch.ops.pyevo.shared_group_norm_silu_backward(torch.randn(2, 6, 4), torch.randn(2, 6, 5),
                                                        torch.randn(6), torch.randn(6), 2, 1e-5)


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): the CUDA kernels against the CPU op and plain PyTorch
# ---------------------------------------------------------------------------------------------

CUDA_GROUP_NORM_CASES = [
    GroupNormCase(2, 4, 8, 3, (32, 32), 1e-5, "contiguous"),    # packed loads, several threads
    GroupNormCase(3, 3, 5, 0, (7, 5), 1e-6, "contiguous"),       # HxW odd: scalar loads
    GroupNormCase(1, 8, 4, 0, (128, 128), 1e-5, "contiguous"),   # large slab: 512 threads
    GroupNormCase(4, 1, 7, 2, (1, 1), 1e-5, "contiguous"),       # one value per group
    GroupNormCase(2, 2, 3, 1, (9,), 1e-3, "sliced"),             # 1-D spatial, strided input
    GroupNormCase(2, 7, 2, 0, (6, 10), 1e-5, "channels_last"),   # HxW multiple of 4, not of 8
    GroupNormCase(2, 4, 4, 0, (), 1e-5, "contiguous"),           # no spatial dims
]

CUDA_TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@CUDA
@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CUDA_GROUP_NORM_CASES, ids=case_id)
def test_cuda_group_norm_silu_forward(case, dtype, misaligned):
    x, w, b = (t.to(dtype) for t in case.make(torch.float32, torch.Generator().manual_seed(0)))
    x_cuda = x.cuda()
    if misaligned:  # the same values one element past an aligned address: scalar loads
        buffer = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
        x_cuda = buffer[1:].view(x.shape).copy_(x)
    out = torch.ops.pyevo.shared_group_norm_silu(x_cuda, w.cuda(), b.cuda(), *case.args)
    assert out.device.type == "cuda" and out.dtype == dtype and out.is_contiguous()
    tolerance = CUDA_TOLERANCE[dtype]
    # The CPU op on the same (rounded) inputs, and plain PyTorch in float64. Not PyTorch in
    # float32: its x * (rstd * w) - mean * (rstd * w) cancels badly where a group's variance is
    # near zero (one value per group: errors of 7e-5 seen on an H100, 2026-11-26).
    cpu = torch.ops.pyevo.shared_group_norm_silu(x, w, b, *case.args)
    torch.testing.assert_close(out.cpu(), cpu, rtol=tolerance, atol=tolerance)
    expected = group_norm_silu_reference(x.double(), w.double(), b.double(), *case.args)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=tolerance, atol=tolerance)


@CUDA
def test_cuda_group_norm_silu_float64_and_backward():
    case = GroupNormCase(2, 3, 4, 2, (5, 7), 1e-5, "contiguous")
    x, w, b = (leaf(t) for t in case.make(torch.float64, torch.Generator().manual_seed(0)))
    xc, wc, bc = (leaf(t.detach().cuda()) for t in (x, w, b))
    out_cpu = torch.ops.pyevo.shared_group_norm_silu(x, w, b, *case.args)
    out_cuda = torch.ops.pyevo.shared_group_norm_silu(xc, wc, bc, *case.args)
    assert_matches(out_cuda.cpu(), out_cpu, torch.float64)
    grad_output = torch.randn(out_cpu.shape, dtype=torch.float64)
    grads_cpu = grads_of(out_cpu, (x, w, b), grad_output)
    grads_cuda = grads_of(out_cuda, (xc, wc, bc), grad_output.cuda())
    assert_gradients_match([g.cpu() for g in grads_cuda], grads_cpu, torch.float64, factor=4)
    assert torch.autograd.gradcheck(
        lambda x, w, b: torch.ops.pyevo.shared_group_norm_silu(x, w, b, 3, 1e-5),
        (leaf(xc[:1, :6, :2, :3].detach().contiguous()), wc, bc))
    opcheck(torch.ops.pyevo.shared_group_norm_silu.default, (xc, wc, bc, 3, 1e-5))


@CUDA
@pytest.mark.parametrize("case", CONV_CASES[:6], ids=case_id)
def test_cuda_shared_conv2d_matches_cpu(case):
    tensors = case.make(torch.float64, torch.Generator().manual_seed(0))
    cpu = [leaf(t) if t is not None else None for t in tensors]
    gpu = [leaf(t.cuda()) if t is not None else None for t in tensors]
    out_cpu = torch.ops.pyevo.shared_conv2d(*cpu, *case.args)
    out_gpu = torch.ops.pyevo.shared_conv2d(*gpu, *case.args)
    assert_matches(out_gpu.cpu(), out_cpu, torch.float64)
    grad_output = torch.randn(out_cpu.shape, dtype=torch.float64)
    assert_gradients_match([g.cpu() if g is not None else None
                            for g in grads_of(out_gpu, gpu, grad_output.cuda())],
                           grads_of(out_cpu, cpu, grad_output), torch.float64)


@CUDA
@pytest.mark.parametrize("case", ATTENTION_CASES[-4:], ids=case_id)
def test_cuda_shared_attention_matches_cpu(case, kernel="pyevo"):
    # pyevo's fused attention forward (asked for per call); the backward is one composite.
    tensors = case.make(torch.float32, torch.Generator().manual_seed(0))
    cpu = [leaf(t) if t is not None else None for t in tensors]
    gpu = [leaf(t.cuda()) if t is not None else None for t in tensors]
    out_cpu = torch.ops.pyevo.shared_attention(*cpu, *case.args)
    out_gpu = torch.ops.pyevo.shared_attention(*gpu, *case.args, kernel)
    # TF32 and the flash kernels on the GPU: compare at a looser float32 tolerance.
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=2e-3, atol=2e-3)
    grad_output = torch.randn(out_cpu.shape)
    for g, e in zip(grads_of(out_gpu, gpu, grad_output.cuda()), grads_of(out_cpu, cpu, grad_output)):
        if e is not None:
            torch.testing.assert_close(g.cpu(), e, rtol=2e-3, atol=2e-3)


@CUDA
def test_cuda_misuse_mixed_devices():
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.pyevo.shared_group_norm_silu(torch.randn(2, 4, 3, device="cuda"),
                                               torch.randn(4), torch.randn(4), 2, 1e-5)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.pyevo.shared_conv2d(torch.randn(1, 2, 5, 5, device="cuda"),
                                      torch.randn(3, 2, 3, 3), None, 3, 3, 1)


# ---------------------------------------------------------------------------------------------
# CUDA kernels of the single-candidate ops (pyevo's own fused GroupNorm+SiLU backward and fused
# attention; the conv's, which is cuDNN on the weight view), on fresh random inputs with
# NaN-poisoned outputs. float32 within float32 rounding (TF32 off); float16/bfloat16 error at most
# 2x PyTorch's own error in the same precision, both against float64. Marked `sanitizer`: the
# memcheck subset of the device script (which instruments pyevo's kernels only).
# ---------------------------------------------------------------------------------------------


def fresh_generator():
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def poison_cuda_cache(*shapes, dtype):
    """Leaves NaN-filled blocks of these sizes in the caching allocator, so that the op's
    torch.empty outputs most likely start as NaN: an element it does not write shows."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape in shapes]
    del blocks


@contextlib.contextmanager
def no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def relative_error(actual, expected, scale=0.0):
    """Max error over the larger of the reference's largest magnitude and `scale` (the size of
    the terms that cancel, where the exact result is near zero)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    denominator = max(expected.abs().max().item(), scale, 1e-30)
    return (actual - expected).abs().max().item() / denominator


def check_cuda(ours, reference_fn, inputs, dtype, seed, what, scale=0.0):
    """float64/float32: against float64 PyTorch within rounding. float16/bfloat16: our error
    against float64 at most 2x PyTorch's own CUDA error in that precision."""
    expected = reference_fn(*[t.double() if torch.is_tensor(t) else t for t in inputs])
    ours_error = relative_error(ours, expected, scale)
    if dtype in (torch.float16, torch.bfloat16):
        theirs_error = relative_error(reference_fn(*inputs), expected, scale)
        assert ours_error <= 2 * theirs_error + 1e-6, (
            f"{what} (seed {seed}): error {ours_error:.3g} vs PyTorch's {theirs_error:.3g}")
    else:
        tolerance = 1e-12 if dtype == torch.float64 else 2e-6
        assert ours_error <= tolerance, f"{what} (seed {seed}): error {ours_error:.3g}"



CUDA_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _cuda_conv_check(case: ConvCase, dtype):
    generator, seed = fresh_generator()
    x, w, b = (t.to("cuda", dtype) if t is not None else None
               for t in case.make(torch.float32, generator))
    with no_tf32():
        expected_shape = conv_reference(x, w, b, *case.args).shape
        poison_cuda_cache(expected_shape, dtype=dtype)
        out = torch.ops.pyevo.shared_conv2d(x, w, b, *case.args)
        assert out.is_contiguous() and out.dtype == dtype and out.shape == expected_shape
        check_cuda(out, lambda x, w, b: conv_reference(x, w, b, *case.args), [x, w, b], dtype, seed,
                   "forward")
        grad_output = torch.randn(expected_shape, generator=generator).to("cuda", dtype)
        poison_cuda_cache(x.shape, w.shape, dtype=dtype)
        grads = torch.ops.pyevo.shared_conv2d_backward(grad_output, x, w, b, *case.args,
                                                       [True, True, b is not None])

        def reference(x, w, b, g, index):
            leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]
            wanted = [t for t in leaves if t is not None]
            out = conv_reference(*leaves, *case.args)
            return torch.autograd.grad(out, wanted, g)[index]

        for index, name in enumerate(("grad_input", "grad_weight", "grad_bias")):
            if index == 2 and b is None:
                continue
            check_cuda(grads[index], lambda x, w, b, g: reference(x, w, b, g, index),
                       [x, w, b, grad_output], dtype, seed, name)
        # The gradient of the shared weight is zero outside the crop, everywhere.
        offset = (case.shared_kernel - case.kernel_size) // 2
        outside = torch.ones(w.shape, dtype=torch.bool, device="cuda")
        outside[:case.out_channels, :case.in_channels, offset:offset + case.kernel_size,
                offset:offset + case.kernel_size] = False
        assert (grads[1][outside] == 0).all()


@CUDA
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("case", CONV_CASES[:10] + CONV_CASES[-3:], ids=case_id)
def test_cuda_shared_conv2d_kernels(case, dtype):
    _cuda_conv_check(case, dtype)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_shared_conv2d_unet_shapes(dtype):
    # A DDPM-CIFAR10-like layer: several tiles in every GEMM dimension.
    _cuda_conv_check(ConvCase(4, 96, 128, 128, 128, 5, 3, 1, 16, 16, True, "contiguous"), dtype)


@CUDA
def test_cuda_shared_conv2d_small():
    for dtype in (torch.float32, torch.bfloat16):
        _cuda_conv_check(ConvCase(2, 5, 7, 6, 9, 5, 3, 2, 9, 7, True, "sliced"), dtype)


@CUDA
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("case", CUDA_GROUP_NORM_CASES, ids=case_id)
def test_cuda_group_norm_silu_fused_backward(case, dtype):
    generator, seed = fresh_generator()
    x, w, b = (t.to("cuda", dtype) for t in case.make(torch.float32, generator))
    grad_output = torch.randn(x.shape, generator=generator).to("cuda", dtype)
    poison_cuda_cache(x.shape, dtype=dtype)
    grads = torch.ops.pyevo.shared_group_norm_silu_backward(grad_output, x, w, b, *case.args)

    def reference(x, w, b, g, index):
        x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
        out = group_norm_silu_reference(x, w, b, *case.args)
        return torch.autograd.grad(out, [x, w, b], g)[index]

    # With one value per group every gradient but grad_bias is exactly zero, and the float64
    # reference's is rounding noise (seen on an H100, 2026-11-26), so errors are measured against
    # the size of the terms that cancel: |g| |w| rstd for grad_input; for grad_weight, a sum over
    # batch and pixels of |g| (x_hat is O(1)), against which summation error is bounded.
    g64 = grad_output.double()
    groups = x.double().reshape(x.shape[0], -1, case.channels_per_group, *x.shape[2:])
    variance = groups.flatten(2).var(dim=2, unbiased=False)
    rstd = (variance + case.eps).rsqrt().max().item()
    scales = (g64.abs().max().item() * w.double().abs().max().item() * rstd,
              g64.abs().transpose(0, 1).flatten(1).sum(dim=1).max().item(), 0.0)
    for index, name in enumerate(("grad_input", "grad_weight", "grad_bias")):
        check_cuda(grads[index], lambda x, w, b, g: reference(x, w, b, g, index),
                   [x, w, b, grad_output], dtype, seed, name, scale=scales[index])
    channels = case.channels
    assert (grads[1][channels:] == 0).all() and (grads[2][channels:] == 0).all()


@CUDA
@pytest.mark.sanitizer
def test_cuda_group_norm_silu_small():
    for dtype in (torch.float32, torch.bfloat16):
        test_cuda_group_norm_silu_fused_backward(CUDA_GROUP_NORM_CASES[1], dtype)
        test_cuda_group_norm_silu_forward(CUDA_GROUP_NORM_CASES[1], dtype, False)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [8, 32, 40, 64, 96])
@pytest.mark.parametrize("cross", [False, True])
def test_cuda_shared_attention_fused(dtype, head_dim, cross, kernel="pyevo"):
    # impl="pyevo": 96 > 64 runs the SDPA fallback, the others pyevo's fused kernel.
    generator, seed = fresh_generator()
    case = AttentionCase(3, 77, 96, (50, 32) if cross else None, 2, 3, head_dim, (True,) * 4, True)
    tensors = [t.to("cuda", dtype) if t is not None else None
               for t in case.make(torch.float32, generator)]
    with no_tf32():
        poison_cuda_cache(tensors[0].shape, dtype=dtype)
        out = torch.ops.pyevo.shared_attention(*tensors, *case.args, kernel)
        assert out.is_contiguous() and out.shape == tensors[0].shape
        check_cuda(out, lambda *t: attention_reference(*t, *case.args), tensors, dtype, seed,
                   f"attention, kernel={kernel}")


@CUDA
@pytest.mark.sanitizer
def test_cuda_shared_attention_small():
    for dtype in (torch.float32, torch.bfloat16):
        test_cuda_shared_attention_fused(dtype, 32, False)


def test_shared_attention_kernel_argument_on_cpu():
    """The CPU kernel has one implementation: every valid request gives the same result; another
    name is refused in one line that lists the valid ones."""
    case = ATTENTION_CASES[-2]
    tensors = case.make(torch.float32, torch.Generator().manual_seed(0))
    out = torch.ops.pyevo.shared_attention(*tensors, *case.args)
    for kernel in ("auto", "aten", "pyevo"):
        assert torch.equal(torch.ops.pyevo.shared_attention(*tensors, *case.args, kernel), out)
        assert torch.equal(ops.shared_attention(*tensors, *case.args, impl=kernel), out)
        assert ops.kernel_choice("shared_attention", *tensors, *case.args, impl=kernel) == "aten"
    message = r"^pyevo::shared_attention: unknown impl 'flash' \(expected 'auto', 'aten' or 'pyevo'\)$"
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pyevo.shared_attention(*tensors, *case.args, "flash")
    with pytest.raises(RuntimeError, match=message):
        ops.kernel_choice("shared_attention", *tensors, *case.args, impl="flash")


@CUDA
@pytest.mark.parametrize("kernel", ["aten", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_aten_and_auto_kernels_match_references(kernel, dtype):
    # "aten" runs SDPA inside the same op, and "auto" the measured table's choice (SDPA where it has
    # no entry): same contract, same checks.
    for cross in (False, True):
        test_cuda_shared_attention_fused(dtype, 40, cross, kernel)


@CUDA
def test_cuda_kernel_choice_follows_the_measured_table():
    """A forced kernel is itself; "auto" is the shipped table's entry for this GPU and shape, ATen's
    where it has none (a shape no table has)."""
    case = ATTENTION_CASES[-2]
    tensors = [t.cuda() if t is not None else None for t in case.make(torch.float32, torch.Generator())]
    assert ops.kernel_choice("shared_attention", *tensors, *case.args, impl="pyevo") == "pyevo"
    assert ops.kernel_choice("shared_attention", *tensors, *case.args, impl="aten") == "aten"
    assert ops.kernel_choice("shared_attention", *tensors, *case.args) == "aten"
    from pyevo.kernel_choices import cuda_device_identity

    device, capability = cuda_device_identity("cuda")
    for entry in ops.KERNEL_CHOICES.entries:
        shape = entry["shape"]
        if (entry["device"], entry["capability"], entry["op"]) != (device, capability, "shared_attention") \
                or shape["cross"]:
            continue
        inner, c = shape["heads"] * shape["head_dim"], shape["C"]
        projections = [torch.zeros(inner, c), None] * 3 + [torch.zeros(c, inner), None]
        call = [t.to("cuda", getattr(torch, entry["dtype"])) if t is not None else None
                for t in (torch.zeros(shape["B"], shape["S"], c), None, *projections)]
        assert ops.kernel_choice("shared_attention", *call, shape["heads"], shape["head_dim"]) == entry["kernel"]


@CUDA
@pytest.mark.sanitizer
def test_cuda_opcheck_single_ops():
    generator = torch.Generator().manual_seed(0)
    x, w, b = (t.cuda() for t in
               ConvCase(2, 3, 4, 5, 6, 5, 3, 2, 7, 6, True, "contiguous").make(torch.float32,
                                                                               generator))
    opcheck(torch.ops.pyevo.shared_conv2d.default, (leaf(x), leaf(w), leaf(b), 5, 3, 2))
    opcheck(torch.ops.pyevo.shared_conv2d_backward.default,
            (torch.randn(2, 5, 4, 3, device="cuda"), x, w, b, 5, 3, 2, [True, True, True]))
    tensors = [leaf(t.cuda()) if t is not None else None
               for t in ATTENTION_CASES[-2].make(torch.float32, generator)]
    opcheck(torch.ops.pyevo.shared_attention.default, (*tensors, *ATTENTION_CASES[-2].args))
    opcheck(torch.ops.pyevo.shared_attention.default, (*tensors, *ATTENTION_CASES[-2].args, "pyevo"))


def test_ops_follow_atens_autocast_policy():
    """Under CPU bfloat16 autocast: the conv and attention run in bfloat16 as F.conv2d / SDPA do,
    GroupNorm+SiLU in float32 (ATen's CUDA autocast policy for group_norm; its CPU policy keeps
    bfloat16), and gradients reach the float32 weights."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    weight = torch.randn(8, 8, 5, 5, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    gamma, beta = torch.rand(8) + 0.5, torch.randn(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv = torch.ops.pyevo.shared_conv2d(x, weight, bias, 4, 3, 1)
        reference = torch.nn.functional.conv2d(x, weight[:4, :, 1:4, 1:4], bias[:4], padding=1)
        normed = torch.ops.pyevo.shared_group_norm_silu(conv, gamma, beta, 2, 1e-5)
    normed_reference = torch.nn.functional.silu(torch.nn.functional.group_norm(conv.float(), 2, gamma[:4], beta[:4]))
    assert conv.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(conv, reference, rtol=0, atol=0)
    assert normed.dtype == normed_reference.dtype == torch.float32
    torch.testing.assert_close(normed, normed_reference, rtol=1e-5, atol=1e-5)
    normed.sum().backward()
    assert weight.grad.dtype == torch.float32 and weight.grad[:4].abs().sum() > 0

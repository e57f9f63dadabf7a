"""CPU microbenchmarks: each torch.ops.pyevo op against its plain-PyTorch reference.

    .venv/bin/python -m pytest tests/bench --benchmark-only

Each benchmark group holds the op ("pyevo") and the reference ("reference": slice +
``.contiguous()`` + ``F.conv2d`` / ``F.group_norm`` + ``F.silu`` / ``F.scaled_dot_product_attention``)
on the same inputs; pytest-benchmark prints, next to every figure, its ratio to the group's best.
"fwd" times the forward under no_grad, "fwd+bwd" a forward and the gradients of all inputs.
No time assertions: CPU times here vary by up to 2x between runs, compare within one run.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyevo  # noqa: F401  (registers torch.ops.pyevo)

IMPLS = ["pyevo", "reference"]
PASSES = ["fwd", "fwd+bwd"]


def run(benchmark, group: str, forward, inputs, grad_output: torch.Tensor, pass_: str):
    benchmark.group = f"{group} {pass_}"
    if pass_ == "fwd":
        def step():
            with torch.no_grad():
                return forward()
    else:
        needs_grad = [t for t in inputs if t is not None and t.requires_grad]

        def step():
            return torch.autograd.grad(forward(), needs_grad, grad_output)
    benchmark(step)


def leaves(*tensors):
    return [t.requires_grad_() if t is not None else None for t in tensors]


# ---------------------------------------------------------------------------------------------
# shared_conv2d: a 3x3 conv at full width of a 3x3 shared weight, and a half-width 3x3 crop of a
# 5x5 shared weight (what the search evaluates).
# ---------------------------------------------------------------------------------------------

CONV_SHAPES = {
    # name: (N, C_in, H, W, shared (C_out_max, C_in_max, K), C_out, k)
    "N8 C128 32x32 full k3": (8, 128, 32, 32, (128, 128, 3), 128, 3),
    "N8 C256 16x16 full k3": (8, 256, 16, 16, (256, 256, 3), 256, 3),
    "N8 C128 32x32 half k3of5": (8, 64, 32, 32, (128, 128, 5), 64, 3),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("shape", list(CONV_SHAPES))
def test_shared_conv2d(benchmark, shape, pass_, impl):
    n, c_in, h, w, (c_out_max, c_in_max, k_max), c_out, k = CONV_SHAPES[shape]
    torch.manual_seed(0)
    x, weight, bias = leaves(torch.randn(n, c_in, h, w),
                             torch.randn(c_out_max, c_in_max, k_max, k_max) * 0.05,
                             torch.randn(c_out_max))
    offset = (k_max - k) // 2
    if impl == "pyevo":
        def forward():
            return torch.ops.pyevo.shared_conv2d(x, weight, bias, c_out, k, 1)
    else:
        def forward():
            sub_weight = weight[:c_out, :c_in, offset:offset + k, offset:offset + k].contiguous()
            return F.conv2d(x, sub_weight, bias[:c_out], padding=k // 2)
    run(benchmark, f"conv {shape}", forward, (x, weight, bias), torch.randn(n, c_out, h, w), pass_)


# ---------------------------------------------------------------------------------------------
# shared_group_norm_silu: 32 groups, as in the diffusers UNets.
# ---------------------------------------------------------------------------------------------

GROUP_NORM_SHAPES = {"N8 C128 32x32": (8, 128, 32, 32), "N8 C256 16x16": (8, 256, 16, 16)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("shape", list(GROUP_NORM_SHAPES))
def test_shared_group_norm_silu(benchmark, shape, pass_, impl):
    n, c, h, w = GROUP_NORM_SHAPES[shape]
    channels_per_group = c // 32
    torch.manual_seed(0)
    x, weight, bias = leaves(torch.randn(n, c, h, w), 1 + 0.1 * torch.randn(c),
                             0.1 * torch.randn(c))
    if impl == "pyevo":
        def forward():
            return torch.ops.pyevo.shared_group_norm_silu(x, weight, bias, channels_per_group, 1e-5)
    else:
        def forward():
            return F.silu(F.group_norm(x, 32, weight[:c], bias[:c], 1e-5))
    run(benchmark, f"gn+silu {shape}", forward, (x, weight, bias), torch.randn(n, c, h, w), pass_)


# ---------------------------------------------------------------------------------------------
# shared_attention: self-attention, B8 S256 C256, heads 4 (head_dim 64) or 8 (head_dim 32).
# ---------------------------------------------------------------------------------------------

ATTENTION_SHAPES = {"B8 S256 C256 h4": (8, 256, 256, 4), "B8 S256 C256 h8": (8, 256, 256, 8)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("shape", list(ATTENTION_SHAPES))
def test_shared_attention(benchmark, shape, pass_, impl):
    b, s, c, heads = ATTENTION_SHAPES[shape]
    head_dim = c // heads
    inner = heads * head_dim
    torch.manual_seed(0)
    x = torch.randn(b, s, c).requires_grad_()
    q_w, k_w, v_w, o_w = leaves(*(torch.randn(c, c) / c ** 0.5 for _ in range(4)))
    q_b, k_b, v_b, o_b = leaves(*(0.1 * torch.randn(c) for _ in range(4)))
    if impl == "pyevo":
        def forward():
            return torch.ops.pyevo.shared_attention(x, None, q_w, q_b, k_w, k_b, v_w, v_b, o_w,
                                                    o_b, heads, head_dim)
    else:
        def forward():
            def heads_of(weight, bias):
                projected = F.linear(x, weight[:inner].contiguous(), bias[:inner])
                return projected.unflatten(-1, (heads, head_dim)).transpose(1, 2)

            attended = F.scaled_dot_product_attention(heads_of(q_w, q_b), heads_of(k_w, k_b),
                                                      heads_of(v_w, v_b))
            return F.linear(attended.transpose(1, 2).flatten(2), o_w[:, :inner].contiguous(), o_b)
    run(benchmark, f"attention {shape}", forward, (x, q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b),
        torch.randn(b, s, c), pass_)

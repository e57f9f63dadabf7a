"""Analytic cost of a module: multiply-accumulates (from torch's FlopCounterMode) and parameters.

FlopCounterMode has no formula for the CPU SDPA kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``), so attention would count as zero on the
CPU; we map it to torch's own SDPA formula, which the GPU kernels use. pyevo's shared ops get
formulas too, so a super-block with a genome set costs what its static block costs.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_flop_count


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _shared_conv2d_flops(input_shape, weight_shape, bias_shape, out_channels, kernel_size, stride=1,
                         *args, out_shape=None, **kwargs) -> int:
    used_weight = (out_channels, input_shape[1], kernel_size, kernel_size)
    return conv_flop_count(input_shape, used_weight, out_shape, transposed=False)


def _shared_attention_flops(hidden_shape, encoder_shape, q_w, q_b, k_w, k_b, v_w, v_b, out_w, out_b,
                            heads, head_dim, *args, out_shape=None, **kwargs) -> int:
    batch, queries, channels = hidden_shape
    keys, context_channels = (queries, channels) if encoder_shape is None else encoder_shape[1:]
    inner = heads * head_dim
    projections = 2 * batch * inner * (queries * channels + 2 * keys * context_channels + queries * channels)
    attention = sdpa_flop_count((batch, heads, queries, head_dim), (batch, heads, keys, head_dim),
                                (batch, heads, keys, head_dim))
    return projections + attention


def _flop_formulas() -> dict[Any, Callable]:
    formulas: dict[Any, Callable] = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    pyevo_ops = torch.ops.pyevo
    for name, formula in (("shared_conv2d", _shared_conv2d_flops), ("shared_attention", _shared_attention_flops)):
        if hasattr(pyevo_ops, name):  # registered when the pyevo extension is loaded
            formulas[getattr(pyevo_ops, name)] = formula
    return formulas


def count_macs(module: nn.Module, *args, **kwargs) -> int:
    """Multiply-accumulates of one forward call ``module(*args, **kwargs)`` (FLOPs / 2).

    Counts matmuls, convolutions and attention; elementwise ops and norms are not counted
    (FlopCounterMode's convention, which published MAC figures follow).
    """
    counter = FlopCounterMode(display=False, custom_mapping=_flop_formulas())
    with torch.no_grad(), counter:
        module(*args, **kwargs)
    return counter.get_total_flops() // 2


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())

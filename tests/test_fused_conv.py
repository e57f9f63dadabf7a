"""pyevo::fused_conv2d: a resnet convolution on a shared weight with its epilogue fused,

    out = (conv(x, weight[:co, :ci, crop]) + bias[:co] + temb[:, :co, None, None] + residual) * scale

against plain PyTorch (slice, ``F.conv2d``, adds) on the CPU in float64 and float32 for every
combination of the optional arguments and crops 1/3/5 of a 5x5 shared weight; its gradients,
opcheck, memory-format rule and refusals of bad arguments. The CUDA tests (skipped without a GPU;
all named ``cuda``) compare the CUDA op, in bfloat16/float16 at DDPM-CIFAR10 and LDM layer shapes,
with the same reference, and check that on a Hopper GPU the CUTLASS kernel, not the cuDNN
fallback, is what runs. They ask for pyevo's kernel per call (``impl="pyevo"``); one test runs
``"aten"`` and ``"auto"`` (the measured table's choice) against the same reference.
"""
from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F

import pyevo
from pyevo import _C, ops

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def reference(x, weight, bias, temb, residual, scale, out_channels, kernel_size):
    """Plain PyTorch: the sliced crop made contiguous, F.conv2d, then the epilogue."""
    offset = (weight.shape[2] - kernel_size) // 2
    crop = weight[:out_channels, :x.shape[1], offset:offset + kernel_size,
                  offset:offset + kernel_size].contiguous()
    out = F.conv2d(x, crop, None if bias is None else bias[:out_channels], padding=kernel_size // 2)
    if temb is not None:
        out = out + temb[:, :out_channels, None, None]
    if residual is not None:
        out = out + residual
    return out * scale


def make_arguments(dtype, generator, *, batch=2, in_channels=5, in_max=6, out_channels=4,
                   out_max=7, shared_kernel=5, size=(6, 5), bias=True, temb=True, residual=True,
                   device="cpu"):
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(device, dtype)

    height, width = size
    fan_in = in_channels * shared_kernel * shared_kernel
    return dict(
        x=randn(batch, in_channels, height, width),
        weight=randn(out_max, in_max, shared_kernel, shared_kernel, scale=1 / math.sqrt(fan_in)),
        bias=randn(out_max, scale=0.5) if bias else None,
        temb=randn(batch, out_max + 1, scale=0.5) if temb else None,  # wider: a prefix is used
        residual=randn(batch, out_channels, height, width) if residual else None,
        out_channels=out_channels)


def call(op, a, scale, kernel_size, kernel="auto"):
    return op(a["x"], a["weight"], a["bias"], a["temb"], a["residual"], scale, a["out_channels"],
              kernel_size, kernel)


# ---------------------------------------------------------------------------------------------
# CPU: equality with plain PyTorch
# ---------------------------------------------------------------------------------------------

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
OPTIONALS = list(itertools.product([False, True], repeat=3))  # bias, temb, residual


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kernel_size", [1, 3, 5])
@pytest.mark.parametrize("bias,temb,residual", OPTIONALS,
                         ids=[f"bias{int(b)}-temb{int(t)}-res{int(r)}" for b, t, r in OPTIONALS])
def test_fused_conv2d_matches_reference(dtype, kernel_size, bias, temb, residual):
    generator = torch.Generator().manual_seed(kernel_size * 8 + 4 * bias + 2 * temb + residual)
    a = make_arguments(dtype, generator, bias=bias, temb=temb, residual=residual)
    scale = 1 / math.sqrt(2)
    out = call(torch.ops.pyevo.fused_conv2d, a, scale, kernel_size)
    expected = reference(a["x"], a["weight"], a["bias"], a["temb"], a["residual"], scale,
                         a["out_channels"], kernel_size)
    assert out.shape == expected.shape and out.dtype == dtype and out.is_contiguous()
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(out, expected, rtol=tolerance,
                               atol=tolerance * max(1.0, expected.abs().max().item()))


def test_fused_conv2d_wrapper_and_unit_scale():
    generator = torch.Generator().manual_seed(1)
    a = make_arguments(torch.float64, generator)
    out = ops.fused_conv2d(a["x"], a["weight"], a["bias"], a["temb"], a["residual"], 1.0, 4, 3)
    torch.testing.assert_close(out, reference(a["x"], a["weight"], a["bias"], a["temb"],
                                              a["residual"], 1.0, 4, 3))


@pytest.mark.parametrize("input_layout", ["contiguous", "channels_last", "sliced"])
def test_fused_conv2d_memory_format(input_layout):
    """channels_last in, channels_last out; otherwise contiguous out; values unchanged."""
    generator = torch.Generator().manual_seed(2)
    a = make_arguments(torch.float64, generator, in_channels=6, size=(5, 7))
    x = a["x"]
    if input_layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif input_layout == "sliced":  # a channel prefix of a wider tensor: neither layout
        x = torch.cat([x, x[:, :2]], dim=1)[:, :6]
    residual = a["residual"].contiguous(memory_format=torch.channels_last)  # any layout is taken
    out = torch.ops.pyevo.fused_conv2d(x, a["weight"], a["bias"], a["temb"], residual, 0.5, 4, 3)
    expected = reference(a["x"], a["weight"], a["bias"], a["temb"], a["residual"], 0.5, 4, 3)
    torch.testing.assert_close(out, expected)
    if input_layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    else:
        assert out.is_contiguous()
    # The output never aliases an input.
    for tensor in (x, a["weight"], a["bias"], a["temb"], residual):
        assert out.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()


def test_fused_conv2d_channels_last_weight():
    """A channels_last shared weight (the layout the CUDA kernel reads in place) gives the same
    result."""
    generator = torch.Generator().manual_seed(3)
    a = make_arguments(torch.float64, generator)
    out = call(torch.ops.pyevo.fused_conv2d, a, 0.5, 3)
    a["weight"] = a["weight"].contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(call(torch.ops.pyevo.fused_conv2d, a, 0.5, 3), out)


def test_fused_conv2d_autocast_cpu():
    generator = torch.Generator().manual_seed(4)
    a = make_arguments(torch.float32, generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(torch.ops.pyevo.fused_conv2d, a, 0.5, 3)
    assert out.dtype == torch.bfloat16
    expected = reference(a["x"], a["weight"], a["bias"], a["temb"], a["residual"], 0.5, 4, 3)
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2 * expected.abs().max().item())


# ---------------------------------------------------------------------------------------------
# CPU: gradients, opcheck
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias,temb,residual", [(True, True, True), (False, False, False),
                                                (True, True, False), (True, False, True)])
def test_fused_conv2d_gradcheck(bias, temb, residual):
    generator = torch.Generator().manual_seed(5)
    a = make_arguments(torch.float64, generator, batch=2, in_channels=3, in_max=4, out_channels=3,
                       out_max=4, size=(4, 3), bias=bias, temb=temb, residual=residual)
    names = ["x", "weight", "bias", "temb", "residual"]
    leaves = [a[n].detach().requires_grad_() if a[n] is not None else None for n in names]

    def fused(*tensors):
        return torch.ops.pyevo.fused_conv2d(*tensors, 0.7, 3, 3)

    assert torch.autograd.gradcheck(fused, leaves)


def test_fused_conv2d_gradients_match_reference_and_are_full_shape():
    generator = torch.Generator().manual_seed(6)
    a = make_arguments(torch.float64, generator)
    names = ["x", "weight", "bias", "temb", "residual"]
    ours = [a[n].detach().requires_grad_() for n in names]
    theirs = [a[n].detach().requires_grad_() for n in names]
    grad_output = torch.randn(2, 4, 6, 5, generator=generator, dtype=torch.float64)
    out = torch.ops.pyevo.fused_conv2d(*ours, 0.5, 4, 3)
    expected = reference(*theirs, 0.5, 4, 3)
    ours_grads = torch.autograd.grad(out, ours, grad_output)
    theirs_grads = torch.autograd.grad(expected, theirs, grad_output)
    for name, g_ours, g_theirs, leaf in zip(names, ours_grads, theirs_grads, ours):
        assert g_ours.shape == leaf.shape, name
        torch.testing.assert_close(g_ours, g_theirs, msg=name)
    # Zero outside the used parts of the shared tensors.
    assert (ours_grads[1][4:] == 0).all() and (ours_grads[1][:, 5:] == 0).all()
    assert (ours_grads[1][:, :, 0] == 0).all() and (ours_grads[1][:, :, :, 4] == 0).all()
    assert (ours_grads[2][4:] == 0).all() and (ours_grads[3][:, 4:] == 0).all()


def opcheck(op, args):
    results = torch.library.opcheck(op, args)
    assert all(r == "SUCCESS" for r in results.values()), results


@pytest.mark.parametrize("bias,temb,residual", [(True, True, True), (False, False, False),
                                                (True, True, False), (True, False, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_conv2d_opcheck(bias, temb, residual, channels_last):
    generator = torch.Generator().manual_seed(7)
    a = make_arguments(torch.float32, generator, bias=bias, temb=temb, residual=residual)
    if channels_last:
        a["x"] = a["x"].contiguous(memory_format=torch.channels_last)
    tensors = [a[n].detach().requires_grad_() if a[n] is not None else None
               for n in ("x", "weight", "bias", "temb", "residual")]
    opcheck(torch.ops.pyevo.fused_conv2d.default, (*tensors, 0.5, 4, 3))


def test_fused_conv2d_kernel_introspection_cpu():
    generator = torch.Generator().manual_seed(8)
    a = make_arguments(torch.float32, generator)
    for kernel in ("auto", "aten", "pyevo"):
        choice = _C._fused_conv2d_kernel(a["x"], a["weight"], a["bias"], a["temb"], a["residual"], 4, 3,
                                         kernel)
        assert choice.startswith("aten: ")
    with pytest.raises(RuntimeError, match="pyevo::fused_conv2d: unknown impl 'cudnn'"):
        _C._fused_conv2d_kernel(a["x"], a["weight"], a["bias"], a["temb"], a["residual"], 4, 3, "cudnn")
    assert "cutlass_sm90" in pyevo.build_info()


def test_fused_conv2d_kernel_argument_on_cpu():
    """The CPU kernel has one implementation: every valid request gives the same result; another
    name is refused, eagerly and under fake tensors, in one line that lists the valid ones."""
    a = make_arguments(torch.float32, torch.Generator().manual_seed(8))
    out = call(torch.ops.pyevo.fused_conv2d, a, 0.5, 3)
    for kernel in ("auto", "aten", "pyevo"):
        assert torch.equal(call(torch.ops.pyevo.fused_conv2d, a, 0.5, 3, kernel), out)
        assert ops.kernel_choice("fused_conv2d", a["x"], a["weight"], a["bias"], a["temb"], a["residual"],
                                 0.5, 4, 3, impl=kernel) == "aten"
    assert torch.equal(ops.fused_conv2d(a["x"], a["weight"], a["bias"], a["temb"], a["residual"], 0.5, 4, 3,
                                        impl="pyevo"), out)
    message = r"^pyevo::fused_conv2d: unknown impl 'cudnn' \(expected 'auto', 'aten' or 'pyevo'\)$"
    with pytest.raises(RuntimeError, match=message):
        call(torch.ops.pyevo.fused_conv2d, a, 0.5, 3, "cudnn")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match="unknown impl 'cudnn'"):
        fake = {k: mode.from_tensor(v) if torch.is_tensor(v) else v for k, v in a.items()}
        call(torch.ops.pyevo.fused_conv2d, fake, 0.5, 3, "cudnn")


# ---------------------------------------------------------------------------------------------
# CPU: refusals, each naming the argument
# ---------------------------------------------------------------------------------------------


def _bad(change):
    def make():
        a = make_arguments(torch.float32, torch.Generator().manual_seed(9))
        kernel_size = 3
        kernel_size = change(a) or kernel_size
        return a, kernel_size
    return make


BAD_ARGUMENTS = {
    "temb batch": (_bad(lambda a: a.update(temb=a["temb"][:1])), r"temb has batch size 1 but input has 2"),
    "temb channels": (_bad(lambda a: a.update(temb=a["temb"][:, :3])), r"temb has 3 channels but out_channels is 4"),
    "temb rank": (_bad(lambda a: a.update(temb=a["temb"][0])), r"temb must be 2-D"),
    "residual shape": (_bad(lambda a: a.update(residual=a["residual"][:, :3])),
                       r"residual has shape \[2, 3, 6, 5\] but the convolution's output has shape \[2, 4, 6, 5\]"),
    "residual dtype": (_bad(lambda a: a.update(residual=a["residual"].double())),
                       r"residual has dtype Double but input has dtype Float"),
    "temb dtype": (_bad(lambda a: a.update(temb=a["temb"].half())), r"temb has dtype Half but input has dtype Float"),
    "bias dtype": (_bad(lambda a: a.update(bias=a["bias"].double())), r"bias has dtype Double but input has dtype Float"),
    "weight dtype": (_bad(lambda a: a.update(weight=a["weight"].double())),
                     r"weight has dtype Double but input has dtype Float"),
    "crop larger than the shared kernel": (_bad(lambda a: 7), r"kernel_size 7 is larger than the shared weight's kernel 5"),
    "even kernel": (_bad(lambda a: 2), r"kernel_size must be odd"),
    "out_channels too large": (_bad(lambda a: a.update(out_channels=8)),
                               r"out_channels 8 is larger than the shared weight's 7 output channels"),
    "input wider than the weight": (_bad(lambda a: a.update(x=torch.randn(2, 7, 6, 5))),
                                    r"input has 7 channels but the shared weight has only 6"),
}


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_fused_conv2d_refuses_bad_arguments(name):
    make, message = BAD_ARGUMENTS[name]
    a, kernel_size = make()
    with pytest.raises(RuntimeError, match=r"pyevo::fused_conv2d: " + message):
        call(torch.ops.pyevo.fused_conv2d, a, 1.0, kernel_size)


def test_fused_conv2d_refuses_non_finite_scale():
    a = make_arguments(torch.float32, torch.Generator().manual_seed(10))
    with pytest.raises(RuntimeError, match="scale must be finite"):
        call(torch.ops.pyevo.fused_conv2d, a, float("nan"), 3)


# ---------------------------------------------------------------------------------------------
# CUDA: the CUTLASS kernel (impl="pyevo") against plain PyTorch
# ---------------------------------------------------------------------------------------------


def relative_error(actual, expected):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def cuda_arguments(dtype, seed, *, batch, in_channels, out_channels, size, shared_kernel, temb,
                   residual, channels_last=False, weight_channels_last=False, out_max=None):
    a = make_arguments(dtype, torch.Generator().manual_seed(seed), batch=batch,
                       in_channels=in_channels, in_max=in_channels, out_channels=out_channels,
                       out_max=out_max or out_channels, shared_kernel=shared_kernel,
                       size=(size, size), temb=temb, residual=residual, device="cuda")
    if channels_last:
        a["x"] = a["x"].contiguous(memory_format=torch.channels_last)
        if a["residual"] is not None:
            a["residual"] = a["residual"].contiguous(memory_format=torch.channels_last)
    if weight_channels_last:
        a["weight"] = a["weight"].contiguous(memory_format=torch.channels_last)
    return a


def check_against_reference(a, scale, kernel_size, dtype, what, kernel="pyevo"):
    """Our error against float64 at most 2x PyTorch's own error in the same precision (cuDNN
    convolution, epilogue rounded after each op), and NaN-free."""
    out = call(torch.ops.pyevo.fused_conv2d, a, scale, kernel_size, kernel)
    inputs = [a[n] for n in ("x", "weight", "bias", "temb", "residual")]
    expected = reference(*[t.double() if t is not None else None for t in inputs], scale,
                         a["out_channels"], kernel_size)
    theirs = reference(*inputs, scale, a["out_channels"], kernel_size)
    ours_error, theirs_error = relative_error(out, expected), relative_error(theirs, expected)
    assert out.dtype == dtype and out.shape == expected.shape
    assert ours_error <= 2 * theirs_error + 1e-6, (
        f"{what}: error {ours_error:.3g} vs PyTorch's {theirs_error:.3g}")
    # bfloat16 keeps 8 bits: the fused result is one rounding of an fp32 sum.
    assert ours_error <= (2e-2 if dtype == torch.bfloat16 else 3e-3), what
    return out


# (batch, C_in, C_out, size): DDPM-CIFAR10 (down0, down1) and LDM-CelebA-HQ (a 224-channel level,
# channels not a multiple of the 64-channel K tile) layers, and a small one whose images are
# 100 pixels (less than the 128-pixel tile, and not dividing it: tiles straddle images).
CUDA_SHAPES = [(8, 128, 128, 32), (8, 256, 256, 16), (2, 224, 224, 32), (4, 64, 64, 10)]
EPILOGUES = {"conv1": (True, False, 1.0), "conv2": (False, True, 1 / math.sqrt(2)),
             "all": (True, True, 0.5), "none": (False, False, 1.0)}


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "N{}-C{}to{}-{}px".format(*s))
@pytest.mark.parametrize("shared_kernel", [5, 3])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_cuda_fused_conv2d_matches_reference(dtype, shape, shared_kernel, epilogue):
    batch, c_in, c_out, size = shape
    temb, residual, scale = EPILOGUES[epilogue]
    seed = int.from_bytes(os.urandom(4), "little")
    for channels_last in (False, True):
        a = cuda_arguments(dtype, seed, batch=batch, in_channels=c_in, out_channels=c_out,
                           size=size, shared_kernel=shared_kernel, temb=temb, residual=residual,
                           channels_last=channels_last, weight_channels_last=channels_last)
        out = check_against_reference(a, scale, 3, dtype,
                                      f"seed {seed}, channels_last={channels_last}")
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last
                                 else torch.contiguous_format)


@CUDA
@pytest.mark.parametrize("kernel", ["aten", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_fused_conv2d_aten_and_auto_match_reference(kernel, dtype):
    """ATen's implementation ("aten", and "auto" where the measured table has no entry or chose
    it) keeps the op's contract: the same checks, both layouts."""
    seed = int.from_bytes(os.urandom(4), "little")
    for channels_last in (False, True):
        a = cuda_arguments(dtype, seed, batch=4, in_channels=64, out_channels=64, size=16,
                           shared_kernel=5, temb=True, residual=True, channels_last=channels_last,
                           weight_channels_last=channels_last)
        out = check_against_reference(a, 0.5, 3, dtype, f"{kernel}, seed {seed}", impl=kernel)
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last
                                 else torch.contiguous_format)


def _hopper_with_cutlass():
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0))


@CUDA
def test_cuda_fused_conv2d_takes_the_cutlass_path_on_hopper():
    if not _hopper_with_cutlass():
        pytest.skip("the CUTLASS kernel is for compute capability 9.0")
    assert pyevo.build_info()["cutlass_sm90"], (
        "built without the CUTLASS kernels: install nvidia-cutlass (on the device machine: carry "
        ".whl from experiments/device/fetch_wheels.sh)")
    for dtype, channels_last in itertools.product([torch.bfloat16, torch.float16], [False, True]):
        a = cuda_arguments(dtype, 0, batch=8, in_channels=128, out_channels=128, size=32,
                           shared_kernel=5, temb=True, residual=True, channels_last=channels_last)
        choice = _C._fused_conv2d_kernel(a["x"], a["weight"], a["bias"], a["temb"], a["residual"],
                                         128, 3, "pyevo")
        assert choice == "cutlass_sm90", choice
    # Where it does not apply, the fallback says why.
    a = cuda_arguments(torch.float32, 0, batch=2, in_channels=64, out_channels=64, size=8,
                       shared_kernel=3, temb=True, residual=False)
    assert "dtype" in _C._fused_conv2d_kernel(a["x"], a["weight"], a["bias"], a["temb"], None, 64, 3,
                                              "pyevo")
    a = cuda_arguments(torch.bfloat16, 0, batch=2, in_channels=12, out_channels=64, size=8,
                       shared_kernel=3, temb=True, residual=False)
    assert "multiple of 8" in _C._fused_conv2d_kernel(a["x"], a["weight"], a["bias"], a["temb"],
                                                      None, 64, 3, "pyevo")
    # "aten" runs cuDNN and the epilogue; so does "auto" where the measured table has no entry
    # (this shape is in no table).
    a = cuda_arguments(torch.bfloat16, 0, batch=2, in_channels=64, out_channels=64, size=8,
                       shared_kernel=3, temb=True, residual=False)
    args = (a["x"], a["weight"], a["bias"], a["temb"], None, 64, 3)
    assert "impl='aten'" in _C._fused_conv2d_kernel(*args, "aten")
    assert "no entry" in _C._fused_conv2d_kernel(*args, "auto")
    assert "no entry" in _C._fused_conv2d_kernel(*args)  # "auto" is the default
    assert ops.kernel_choice("fused_conv2d", a["x"], a["weight"], a["bias"], a["temb"], None, 1.0, 64, 3) == "aten"


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_fused_conv2d_fallback_matches_reference(dtype):
    """Shapes and dtypes the CUTLASS kernel does not take (in_channels 12; float32) run cuDNN and
    the epilogue: as exact as PyTorch itself."""
    a = cuda_arguments(dtype, 11, batch=2, in_channels=12, out_channels=16, size=9,
                       shared_kernel=5, temb=True, residual=True, out_max=24)
    assert _C._fused_conv2d_kernel(a["x"], a["weight"], a["bias"], a["temb"], a["residual"], 16,
                                   3, "pyevo").startswith("aten: ")
    out = call(torch.ops.pyevo.fused_conv2d, a, 0.5, 3, "pyevo")
    torch.testing.assert_close(out, reference(a["x"], a["weight"], a["bias"], a["temb"],
                                              a["residual"], 0.5, 16, 3))


@CUDA
def test_cuda_fused_conv2d_weight_layouts_agree():
    """The crop read in place from a channels_last shared weight and the crop re-laid out from a
    contiguous one feed the same kernel: identical outputs. Likewise a prefix of a wider temb."""
    a = cuda_arguments(torch.bfloat16, 12, batch=4, in_channels=64, out_channels=64, size=16,
                       shared_kernel=5, temb=True, residual=True, out_max=96)
    out = call(torch.ops.pyevo.fused_conv2d, a, 0.5, 3, "pyevo")
    a["weight"] = a["weight"].contiguous(memory_format=torch.channels_last)
    assert torch.equal(call(torch.ops.pyevo.fused_conv2d, a, 0.5, 3, "pyevo"), out)
    check_against_reference(a, 0.5, 3, torch.bfloat16, "channels_last weight, out_channels 64 of 96")


@CUDA
def test_cuda_fused_conv2d_in_a_cuda_graph():
    a = cuda_arguments(torch.bfloat16, 13, batch=8, in_channels=128, out_channels=128, size=16,
                       shared_kernel=3, temb=True, residual=True, channels_last=True,
                       weight_channels_last=True)
    eager = call(torch.ops.pyevo.fused_conv2d, a, 0.5, 3, "pyevo")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call(torch.ops.pyevo.fused_conv2d, a, 0.5, 3, "pyevo")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call(torch.ops.pyevo.fused_conv2d, a, 0.5, 3, "pyevo")
    captured.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@CUDA
@pytest.mark.sanitizer
def test_cuda_fused_conv2d_small():
    """Small cases for compute-sanitizer memcheck (the kernel's name holds "pyevo")."""
    for dtype, (temb, residual) in itertools.product([torch.bfloat16, torch.float16],
                                                     [(True, False), (False, True)]):
        a = cuda_arguments(dtype, 14, batch=2, in_channels=16, out_channels=24, size=7,
                           shared_kernel=5, temb=temb, residual=residual, out_max=32)
        check_against_reference(a, 0.5, 5, dtype, f"small {dtype}")


@CUDA
def test_cuda_fused_conv2d_opcheck():
    a = cuda_arguments(torch.bfloat16, 15, batch=2, in_channels=64, out_channels=64, size=8,
                       shared_kernel=3, temb=True, residual=True, channels_last=True)
    tensors = [a[n] for n in ("x", "weight", "bias", "temb", "residual")]
    for kernel in ("pyevo", "aten"):
        results = torch.library.opcheck(torch.ops.pyevo.fused_conv2d.default,
                                        (*tensors, 0.5, 64, 3, kernel),
                                        test_utils=("test_schema", "test_faketensor"))
        assert all(r == "SUCCESS" for r in results.values()), results

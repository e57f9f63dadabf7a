"""The lean runtime: a diffusers UNet (a teacher or an exported student) run with fewer, fused launches.

:func:`optimize` wraps a UNet in a :class:`LeanUNet`, a drop-in ``unet`` for a ``diffusers``
pipeline (``DDPMPipeline(unet=optimize(student), scheduler=...)``): same call, same outputs, its
``config``, ``dtype`` and other attributes are the wrapped model's. What it changes, per device:

* **CUDA.** Each resnet's GroupNorm+SiLU pairs run as pyevo's fused kernel
  (``pyevo::shared_group_norm_silu`` over the whole width: 1.9-4.2x ATen's GroupNorm then SiLU on
  an H100, ``experiments/device/results/2026-11-26-h100.md``), its convolutions as
  ``pyevo::fused_conv2d`` with their epilogues (conv1 + time embedding; conv2 + shortcut, times the
  output scale), and each input signature (shapes,
  dtypes, which conditions) is captured once as a CUDA graph and replayed: the digits and
  DDPM-CIFAR10 UNets spend more time launching kernels than computing (``../shared/FACTS.md``).
* **CPU.** The modules run as they are: pyevo's CPU GroupNorm+SiLU is slower than ATen's (about 4x
  at N8 C256 16x16, ``tests/bench/test_ops_bench.py``) and a CPU has no graphs to replay.

The wrapped model is never changed: the fused resnet forwards are switched on around each call
(:func:`fused_resnets`) and off after it. A captured graph keeps the addresses of the weights and
buffers it was captured with: change weights in place (``load_state_dict``, ``copy_``) as you like,
but call :func:`optimize` again after moving the model or replacing its parameters.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator

import torch
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from pyevo.student import SlimResnetBlock2D, resnet_forward
from pyevo.teacher import _map_tensors

__all__ = ["LeanUNet", "cast_copy", "fused_resnets", "optimize", "replays_graphs", "run_under", "timed_under"]


def _group_norm_silu(resnet: nn.Module, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.pyevo.shared_group_norm_silu(x, norm.weight, norm.bias, norm.num_channels // norm.num_groups,
                                                  norm.eps)


def _fused_conv2d_fits(conv: nn.Module) -> bool:
    """A plain odd square convolution at stride 1 with 'same' zero padding: what ``pyevo::fused_conv2d``
    computes (on the whole of its weight)."""
    if not isinstance(conv, nn.Conv2d):
        return False
    k = conv.kernel_size[0]
    return (conv.kernel_size == (k, k) and k % 2 == 1 and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding == (k // 2, k // 2) and conv.padding_mode == "zeros")


def _conv_epilogue(conv: nn.Module, x: torch.Tensor, temb: torch.Tensor | None, residual: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """``(conv(x) + temb + residual) * scale`` as ``pyevo::fused_conv2d`` with ``impl="auto"`` (one
    kernel on Hopper where the measured kernel-choice table takes pyevo's for the shape; cuDNN then the
    epilogue elsewhere), or as separate ops for a convolution the op does not cover."""
    if _fused_conv2d_fits(conv):
        return torch.ops.pyevo.fused_conv2d(x, conv.weight, conv.bias, temb, residual, scale, conv.out_channels,
                                            conv.kernel_size[0])
    out = conv(x)
    if temb is not None:
        out = out + temb[:, :, None, None]
    if residual is not None:
        out = out + residual
    return out * scale if scale != 1.0 else out


def _fusable(module: nn.Module) -> bool:
    """A diffusers ResnetBlock2D or a student's SlimResnetBlock2D whose norms are affine GroupNorms
    followed by SiLU: the layers :func:`pyevo.student.resnet_forward` computes."""
    if type(module) not in (ResnetBlock2D, SlimResnetBlock2D):
        return False
    return (isinstance(module.nonlinearity, nn.SiLU) and module.time_embedding_norm in ("default", "scale_shift")
            and all(isinstance(norm, nn.GroupNorm) and norm.affine for norm in (module.norm1, module.norm2)))


@contextlib.contextmanager
def fused_resnets(module: nn.Module) -> Iterator[int]:
    """Within the ``with`` block, every fusable resnet in ``module`` runs
    :func:`pyevo.student.resnet_forward` with GroupNorm+SiLU fused and each convolution's epilogue in its
    ``pyevo::fused_conv2d`` call; yields how many were switched.
    Their own forwards are back on exit."""
    switched = []
    try:
        for resnet in module.modules():
            if _fusable(resnet) and "forward" not in resnet.__dict__:
                resnet.forward = (lambda input_tensor, temb=None, *a, _r=resnet, **k:
                                  resnet_forward(_r, input_tensor, temb, norm_silu=_group_norm_silu,
                                                 conv_epilogue=_conv_epilogue))
                switched.append(resnet)
        yield len(switched)
    finally:
        for resnet in switched:
            del resnet.forward


def replays_graphs(runtime: str, cuda_graph: bool, device: torch.device | str) -> bool:
    """Whether timings under ``runtime`` replay captured CUDA graphs: on CUDA, always for the lean
    runtime, for the eager one where ``cuda_graph`` asks for it."""
    return torch.device(device).type == "cuda" and (runtime == "lean" or cuda_graph)


@contextlib.contextmanager
def timed_under(runtime: str, device: torch.device | str, modules) -> Iterator[None]:
    """``modules`` (networks or blocks) as ``runtime`` runs them, for timing: under the lean runtime on
    CUDA their resnets fused, as in :class:`LeanUNet` (whose graphs :func:`replays_graphs` stands for)."""
    with contextlib.ExitStack() as stack:
        if runtime == "lean" and torch.device(device).type == "cuda":
            for module in modules:
                stack.enter_context(fused_resnets(module))
        yield


def run_under(runtime: str, device: torch.device | str, fn: Callable[[], Any], modules) -> Callable[[], Any]:
    """``fn`` as a call that runs ``modules`` under ``runtime`` (:func:`timed_under`) each time, so that
    calls under both runtimes can be timed in turn."""
    def call():
        with timed_under(runtime, device, modules):
            return fn()

    return call


def _signature(value: Any) -> Any:
    """What a captured graph depends on in one argument: tensors' shapes, dtypes and devices, the
    structure of containers, other values as they are."""
    if torch.is_tensor(value):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, dict):
        return ("dict", tuple((key, _signature(value[key])) for key in sorted(value)))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_signature(item) for item in value))
    return ("value", repr(value))


def _copy_into(static: Any, value: Any) -> None:
    if torch.is_tensor(static):
        static.copy_(value)
    elif isinstance(static, dict):
        for key, item in static.items():
            _copy_into(item, value[key])
    elif isinstance(static, (list, tuple)):
        for item, new in zip(static, value):
            _copy_into(item, new)


class LeanUNet(nn.Module):
    """``unet`` under the lean runtime (see the module docstring); build it with :func:`optimize`.

    Args:
        unet: the model (kept as ``self.unet``, in eval mode, never changed).
        cuda_graph: replay one CUDA graph per input signature for CUDA inputs outside autograd.
        fused: run resnets' GroupNorm+SiLU as pyevo's fused op.
    """

    def __init__(self, unet: nn.Module, cuda_graph: bool, fused: bool):
        super().__init__()
        self.unet = unet.eval()
        self.cuda_graph, self.fused = cuda_graph, fused
        self._graphs: dict[Any, tuple[torch.cuda.CUDAGraph, tuple, torch.Tensor]] = {}

    def __getattr__(self, name: str) -> Any:
        # What a pipeline reads of its unet (config, dtype, device, add_embedding, ...) is the model's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("unet"), name)

    def _output(self, sample: torch.Tensor):
        from diffusers.models.unets.unet_2d import UNet2DOutput
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput

        return (UNet2DConditionOutput if isinstance(self.unet, UNet2DConditionModel) else UNet2DOutput)(sample=sample)

    def _eager(self, sample, timestep, args, kwargs) -> torch.Tensor:
        with fused_resnets(self.unet) if self.fused else contextlib.nullcontext():
            return self.unet(sample, timestep, *args, return_dict=False, **kwargs)[0]

    def _replay(self, sample, timestep, args, kwargs) -> torch.Tensor:
        inputs = (sample, timestep, args, kwargs)
        key = _signature(inputs)
        entry = self._graphs.get(key)
        if entry is None:
            static = _map_tensors(inputs, torch.clone)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the graph: cuDNN/cuBLAS plans, lazy inits
                for _ in range(2):
                    self._eager(*static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = self._eager(*static)
            entry = self._graphs[key] = (graph, static, output)
        graph, static, output = entry
        _copy_into(static, inputs)
        graph.replay()
        return output.clone()  # the next replay overwrites the graph's own output

    def forward(self, sample: torch.Tensor, timestep, *args, return_dict: bool = True, **kwargs):
        if not torch.is_tensor(timestep):  # a Python number: a tensor, so that one graph serves every step
            timestep = torch.as_tensor(timestep, device=sample.device)
        if self.cuda_graph and sample.is_cuda and not torch.is_grad_enabled():
            out = self._replay(sample, timestep, args, kwargs)
        else:
            out = self._eager(sample, timestep, args, kwargs)
        return self._output(out) if return_dict else (out,)


def cast_copy(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` on ``device`` in ``dtype`` (the original keeps its weights exactly), without
    diffusers' warning on every dtype cast once a model's keep-in-float32 list exists, even empty."""
    module = copy.deepcopy(module)
    if getattr(module, "_keep_in_fp32_modules", None):
        return module.to(device=device, dtype=dtype)
    return nn.Module.to(module, device=device, dtype=dtype)


def optimize(unet: nn.Module, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
             cuda_graph: bool | None = None) -> LeanUNet:
    """``unet`` under the lean runtime, in ``dtype`` on ``device`` (by default the model's own).

    A model not already there is wrapped as a cast copy, so the caller's keeps its weights exactly.
    ``cuda_graph`` defaults to on for CUDA; GroupNorm+SiLU is fused on CUDA only (see the module
    docstring for why, with the measurements).
    """
    from pyevo.latency import DTYPES

    weight = next(unet.parameters())
    target_device = torch.device(device) if device is not None else weight.device
    if target_device.type == "cuda" and target_device.index is None:
        target_device = torch.device("cuda", torch.cuda.current_device())
    target_dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or weight.dtype)
    if (weight.device, weight.dtype) != (target_device, target_dtype):
        unet = cast_copy(unet, target_device, target_dtype)
    on_cuda = target_device.type == "cuda"
    return LeanUNet(unet, cuda_graph=on_cuda if cuda_graph is None else cuda_graph, fused=on_cuda)

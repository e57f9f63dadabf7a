"""Kernel microbenchmarks: each ``torch.ops.pyevo`` op against its plain-PyTorch baseline and the
machine's measured peak, in one run (``python -m pyevo.bench``; see ``__main__``).

For each op and shape: our time, the baseline's (and a second baseline where there is one), the
ratio baseline / ours (above 1: ours is faster), and the work done per second as a fraction of a
peak measured in the same run: FLOP/s against a large matrix product in the same dtype, bytes/s
against a large device copy (bytes read + written). Every case also checks that ours and the
baseline agree (``max_rel_diff``), so a fast wrong kernel cannot look good.

Baselines (what a user of PyTorch would write):

* fused conv (a resnet's conv1: + bias + temb; conv2: + bias + residual, * scale): the sliced crop
  in ``F.conv2d`` (cuDNN) and the epilogue as separate ops, eager in NCHW ("eager") and in
  channels_last ("eager NHWC"), and the NCHW one captured as one CUDA graph ("graph", captured
  before timing). Ours runs channels_last with a channels_last shared weight, the layouts the
  Hopper CUTLASS kernel reads in place;
* GroupNorm+SiLU: eager ``F.silu(F.group_norm(...))``; population: once per input. On CUDA also
  the same captured as one CUDA graph ("graph"), and a same-size ``clone`` captured as a graph
  ("clone graph"): the bandwidth an elementwise pass over these tensors can reach (its ratio to ours
  is the fraction of that bandwidth ours reaches);
* attention: sliced ``.contiguous()`` projections, ``F.scaled_dot_product_attention`` with the
  fastest backend PyTorch has for the shape (each backend is tried, the best kept), output
  projection; population: once per candidate, and on CUDA that loop captured as one CUDA graph
  ("loop <backend> graph"), where launches cost nothing.

Ours is pyevo's implementation, asked for per call (``impl="pyevo"``) where the op also has
ATen's. Those cases (fused conv, attention) also record what a kernel-choice table entry needs
(:func:`kernel_choice_entries`): the op's shape key and which baselines are ATen's implementation in
the same eager setting ("eager" and "eager NHWC"; the SDPA backends), the best of which ours is
measured against.

No plain conv or population conv cases: on CUDA ``shared_conv2d`` and ``population_conv2d`` run
cuDNN themselves (pyevo's WMMA conv kernels, 0.12-0.46x a loop of cuDNN calls on an H100, were
removed), so they would time cuDNN against itself.

Timing: CUDA events around enough calls to last about a millisecond, median of repeats, after
warm-up; inputs rotate among copies that together exceed the L2 cache (so memory-bound ops are
timed from device memory). On the CPU: wall clock, same scheme.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

import pyevo  # noqa: F401  (registers torch.ops.pyevo)
from pyevo import _C, ops
from pyevo.kernel_choices import choose_kernel

__all__ = ["Case", "Timer", "kernel_choice_entries", "measure_peaks", "run_case", "shape_sets"]


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timer:
    device: torch.device
    warmup: int = 3
    repeats: int = 15
    target_ms: float = 1.0  # each measured interval runs at least this long (launch noise)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[int], Any], copies: int = 1) -> float:
        """Median milliseconds of one ``fn(i)`` call; ``i`` cycles over ``copies`` input sets."""
        counter = [0]

        def call():
            fn(counter[0] % copies)
            counter[0] += 1

        with torch.inference_mode():
            for _ in range(self.warmup):
                call()
            self._sync()
            start = time.perf_counter()
            call()
            self._sync()
            once = (time.perf_counter() - start) * 1e3
            inner = max(1, min(200, math.ceil(self.target_ms / max(once, 1e-3))))
            times = []
            for _ in range(self.repeats):
                if self.device.type == "cuda":
                    begin = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    begin.record()
                    for _ in range(inner):
                        call()
                    end.record()
                    end.synchronize()
                    times.append(begin.elapsed_time(end) / inner)
                else:
                    start = time.perf_counter()
                    for _ in range(inner):
                        call()
                    times.append((time.perf_counter() - start) * 1e3 / inner)
        return statistics.median(times)


def measure_peaks(device: torch.device, dtypes: Sequence[torch.dtype], timer: Timer,
                  quick: bool = False) -> dict:
    """The ceilings the table is read against: a large matrix product per dtype (FLOP/s) and a
    large device copy (bytes read + written per second)."""
    peaks = {"matmul_tflops": {}, "copy_gbps": None}
    if device.type == "cuda":
        size = 4096 if quick else 8192
        copy_bytes = (256 if quick else 1024) * 2 ** 20
    else:
        size = 512 if quick else 1536
        copy_bytes = (32 if quick else 256) * 2 ** 20
    generator = torch.Generator(device=device).manual_seed(0)
    for dtype in dtypes:
        a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        ms = timer(lambda i: torch.mm(a, b))
        peaks["matmul_tflops"][str(dtype).replace("torch.", "")] = 2 * size ** 3 / ms / 1e9
        del a, b
    source = torch.empty(copy_bytes // 4, device=device, dtype=torch.float32).normal_(generator=generator)
    target = torch.empty_like(source)
    ms = timer(lambda i: target.copy_(source))
    peaks["copy_gbps"] = 2 * copy_bytes / ms / 1e6
    del source, target
    return peaks


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One row of the table."""

    op: str
    shape: str
    dtype: torch.dtype
    candidates: int
    flops: float | None  # useful FLOPs of one call (None: read as bandwidth)
    bytes: float | None  # least bytes one call must move (None: read as FLOPs)
    make: Callable[[torch.device, torch.dtype, torch.Generator], dict]
    ours: Callable[[dict], Any]
    baselines: dict[str, Callable[[dict], Any]]
    prepare: Callable[[dict], dict] | None = None  # baseline-only tensors, built before timing
    # Ops with both ATen's and pyevo's implementation: {"op", "shape", "aten_baselines"}, what a
    # kernel-choice table entry is made of (kernel_choice_entries).
    kernel_choice: dict | None = None
    # Which kernel ours runs for these inputs ("aten: ..." where pyevo's does not apply).
    ours_kernel: Callable[[dict], str] | None = None


def _outputs(value) -> list[torch.Tensor]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _max_rel_diff(ours, theirs) -> float:
    worst = 0.0
    for a, b in zip(_outputs(ours), _outputs(theirs)):
        scale = b.detach().abs().max().double().clamp_min(1e-30)
        worst = max(worst, ((a.double() - b.double()).abs().max() / scale).item())
    return worst


def _bytes_of(tensors: dict) -> int:
    total = 0
    for value in tensors.values():
        for t in value if isinstance(value, (list, tuple)) else [value]:
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()
    return total


def run_case(case: Case, device: torch.device, timer: Timer, peaks: dict, l2_bytes: int,
             seed: int = 0) -> dict:
    generator = torch.Generator(device=device).manual_seed(seed)
    first = case.make(device, case.dtype, generator)
    size = _bytes_of(first)
    copies = 1
    if device.type == "cuda":
        copies = max(1, min(8, math.ceil(4 * l2_bytes / max(size, 1))))
    inputs = [first] + [case.make(device, case.dtype, generator) for _ in range(copies - 1)]
    extras = [case.prepare(t) if case.prepare else {} for t in inputs]
    row = {"op": case.op, "shape": case.shape, "dtype": str(case.dtype).replace("torch.", ""),
           "candidates": case.candidates, "input_copies": copies}
    if case.kernel_choice is not None:
        row["kernel_choice"] = case.kernel_choice
    if case.ours_kernel is not None:
        row["ours_kernel"] = case.ours_kernel(first)
    with torch.inference_mode():
        reference = None
        row["ours_ms"] = timer(lambda i: case.ours(inputs[i]), copies)
        ours_out = case.ours(inputs[0])
        row["baselines"] = {}
        for name, baseline in case.baselines.items():
            try:
                ms = timer(lambda i: baseline({**inputs[i], **extras[i]}), copies)
            except RuntimeError as error:  # e.g. a backend that does not take this shape
                row["baselines"][name] = {"error": str(error).splitlines()[0][:200]}
                continue
            out = baseline({**inputs[0], **extras[0]})
            reference = reference if reference is not None else out
            row["baselines"][name] = {"ms": ms, "speedup": ms / row["ours_ms"]}
        if reference is not None:
            row["max_rel_diff"] = _max_rel_diff(ours_out, reference)
    dtype_key = str(case.dtype).replace("torch.", "")
    if case.flops is not None:
        row["tflops"] = case.flops / row["ours_ms"] / 1e9
        peak = peaks["matmul_tflops"].get(dtype_key)
        row["fraction_of_peak"] = row["tflops"] / peak if peak else None
        row["peak_kind"] = f"{dtype_key} matmul"
    else:
        row["gbps"] = case.bytes / row["ours_ms"] / 1e6
        row["fraction_of_peak"] = row["gbps"] / peaks["copy_gbps"]
        row["peak_kind"] = "device copy"
    return row


# ---------------------------------------------------------------------------------------------
# Builders of each kind of case
# ---------------------------------------------------------------------------------------------


def _randn(generator, device, dtype, *shape, scale=1.0):
    return (torch.randn(*shape, device=device, generator=generator) * scale).to(dtype)


def _crop(weight, c_in, c_out, k):
    c = (weight.shape[2] - k) // 2
    return weight[:c_out, :c_in, c:c + k, c:c + k]


def _capture(fn, tensors):
    """``fn(tensors)`` captured as a CUDA graph (after warm-up on a side stream, as capture needs);
    returns a callable that replays it and answers the graph's output."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(tensors)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn(tensors)

    def replay():
        graph.replay()
        return output

    return replay


def _with_graphs(case: Case, device: torch.device, names: Sequence[str],
                 yardstick: Callable[[dict], Any] | None = None) -> Case:
    """On CUDA, the baselines ``names`` also captured as one CUDA graph each ("<name> graph"), and
    ``yardstick`` (a pass of known cost over the same tensors) captured as "clone graph". The graphs are
    captured per input copy before timing; elsewhere the case is returned as it is."""
    if device.type != "cuda":
        return case
    prepare_before, eager = case.prepare, {name: case.baselines[name] for name in names}
    if yardstick is not None:
        eager["clone"] = yardstick

    def prepare(t):
        extra = prepare_before(t) if prepare_before else {}
        own = dict(extra)
        for name, fn in eager.items():
            extra[f"graph:{name}"] = _capture(lambda u, fn=fn: fn({**u, **own}), t)
        return extra

    baselines = dict(case.baselines)
    for name in eager:
        baselines[f"{name} graph"] = lambda t, key=f"graph:{name}": t[key]()
    return dataclasses.replace(case, baselines=baselines, prepare=prepare)


def fused_conv_case(label, n, c, size, k, epilogue, device, dtype) -> Case:
    """A resnet convolution with its epilogue: "conv1" adds bias and the time embedding, "conv2"
    bias and the residual and scales by 1/sqrt(2) (output_scale_factor); k x k of a 5x5 shared
    kernel, C -> C."""
    with_temb, with_residual = epilogue == "conv1", epilogue == "conv2"
    scale = 1.0 if epilogue == "conv1" else 1 / math.sqrt(2)

    def make(device, dtype, g):
        channels_last = torch.channels_last
        return {"x": _randn(g, device, dtype, n, c, size, size).contiguous(memory_format=channels_last),
                "w": _randn(g, device, dtype, c, c, 5, 5, scale=0.05).contiguous(memory_format=channels_last),
                "b": _randn(g, device, dtype, c),
                "temb": _randn(g, device, dtype, n, c) if with_temb else None,
                "residual": (_randn(g, device, dtype, n, c, size, size).contiguous(memory_format=channels_last)
                             if with_residual else None)}

    def ours(t):
        return ops.fused_conv2d(t["x"], t["w"], t["b"], t["temb"], t["residual"], scale, c, k, impl="pyevo")

    def ours_kernel(t):
        return _C._fused_conv2d_kernel(t["x"], t["w"], t["b"], t["temb"], t["residual"], c, k, "pyevo")

    def epilogue_ops(t, x, w, residual):
        out = F.conv2d(x, _crop(w, c, c, k).contiguous(), t["b"], padding=k // 2)
        if with_temb:
            out = out + t["temb"][:, :, None, None]
        if with_residual:
            out = out + residual
        return out * scale if scale != 1.0 else out

    def prepare(t):
        # The NCHW baseline's own tensors (what diffusers runs), built before timing.
        extra = {"x_nchw": t["x"].contiguous(), "w_nchw": t["w"].contiguous(),
                 "residual_nchw": t["residual"].contiguous() if with_residual else None}
        if device.type == "cuda":
            extra["graph"] = _capture(lambda u: eager({**u, **extra}), t)
        return extra

    def eager(t):
        return epilogue_ops(t, t["x_nchw"], t["w_nchw"], t["residual_nchw"])

    baselines = {"eager": eager,
                 "eager NHWC": lambda t: epilogue_ops(t, t["x"], t["w"], t["residual"])}
    if device.type == "cuda":
        baselines["graph"] = lambda t: t["graph"]()
    # The entry's shape is the call ours makes: channels_last input, C -> C.
    choice = {"op": "fused_conv2d", "aten_baselines": ["eager", "eager NHWC"],
              "shape": {"N": n, "C_in": c, "C_out": c, "H": size, "W": size, "kernel_size": k,
                        "has_temb": with_temb, "has_residual": with_residual, "channels_last": True}}
    return Case(f"fused-conv {epilogue}", f"{label} N{n} C{c}->{c} {size}x{size} k{k}of5", dtype, 1,
                2 * n * size * size * c * c * k * k, None, make, ours, baselines, prepare,
                kernel_choice=choice, ours_kernel=ours_kernel)


def group_norm_case(label, n, c, size, device, dtype) -> Case:
    groups = 32 if c % 32 == 0 else 8

    def make(device, dtype, g):
        return {"x": _randn(g, device, dtype, n, c, size, size),
                "w": (1 + _randn(g, device, torch.float32, c, scale=0.1)).to(dtype),
                "b": _randn(g, device, dtype, c, scale=0.1)}

    itemsize = torch.tensor([], dtype=dtype).element_size()
    case = Case("gn+silu", f"{label} N{n} C{c} {size}x{size} G{groups}", dtype, 1, None,
                2 * n * c * size * size * itemsize, make,
                lambda t: ops.shared_group_norm_silu(t["x"], t["w"], t["b"], c // groups, 1e-5),
                {"eager": lambda t: F.silu(F.group_norm(t["x"], groups, t["w"][:c], t["b"][:c], 1e-5))})
    return _with_graphs(case, device, ["eager"], yardstick=lambda t: t["x"].clone())


def population_group_norm_case(label, n, c, size, count, device, dtype) -> Case:
    groups = 32 if c % 32 == 0 else 8
    per_group = c // groups
    widths = [max(per_group, (w // per_group) * per_group) for w in (c // 2, (3 * c) // 4, c)]
    channels = [widths[i % 3] for i in range(count)]

    def make(device, dtype, g):
        return {"x": [_randn(g, device, dtype, n, ch, size, size) for ch in channels],
                "w": (1 + _randn(g, device, torch.float32, c, scale=0.1)).to(dtype),
                "b": _randn(g, device, dtype, c, scale=0.1)}

    itemsize = torch.tensor([], dtype=dtype).element_size()

    def loop(t):
        return [F.silu(F.group_norm(x, x.shape[1] // per_group, t["w"][:x.shape[1]],
                                    t["b"][:x.shape[1]], 1e-5)) for x in t["x"]]

    case = Case("pop-gn+silu", f"{label} N{n} C{c} {size}x{size} K{count}", dtype, count, None,
                2 * n * sum(channels) * size * size * itemsize, make,
                lambda t: ops.population_group_norm_silu(t["x"], t["w"], t["b"], per_group, 1e-5),
                {"loop": loop})
    return _with_graphs(case, device, ["loop"])


@contextmanager
def _sdpa_backend(backend):
    if backend is None:
        yield
        return
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        yield


def _attention_flops(b, s, c, heads, head_dim):
    inner = heads * head_dim
    return 2 * b * s * c * inner * 4 + 4 * b * heads * s * s * head_dim


def _sdpa_baseline(heads, head_dim, backend):
    def run(t, x, keep_heads):
        keep = keep_heads * head_dim

        def project(name):
            y = F.linear(x, t[name + "_w"][:keep].contiguous(), t[name + "_b"][:keep])
            return y.unflatten(-1, (keep_heads, head_dim)).transpose(1, 2)

        with _sdpa_backend(backend):
            attended = F.scaled_dot_product_attention(project("q"), project("k"), project("v"))
        return F.linear(attended.transpose(1, 2).flatten(2), t["o_w"][:, :keep].contiguous(), t["o_b"])

    return run


def _attention_backends(device):
    if device.type != "cuda":
        return {"sdpa": None}
    from torch.nn.attention import SDPBackend

    backends = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                "sdpa-math": SDPBackend.MATH}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends["sdpa-cudnn"] = SDPBackend.CUDNN_ATTENTION
    return backends


def _attention_inputs(b, s, c, heads, head_dim):
    inner = heads * head_dim

    def make(device, dtype, g):
        scale = 1 / math.sqrt(c)
        return {"x": _randn(g, device, dtype, b, s, c),
                **{f"{n}_w": _randn(g, device, dtype, inner, c, scale=scale) for n in "qkv"},
                **{f"{n}_b": _randn(g, device, dtype, inner, scale=0.1) for n in "qkv"},
                "o_w": _randn(g, device, dtype, c, inner, scale=1 / math.sqrt(inner)),
                "o_b": _randn(g, device, dtype, c, scale=0.1)}

    return make


def attention_case(label, b, s, c, heads, head_dim, device, dtype) -> Case:
    make = _attention_inputs(b, s, c, heads, head_dim)

    def ours(t):
        return ops.shared_attention(t["x"], None, t["q_w"], t["q_b"], t["k_w"], t["k_b"], t["v_w"],
                                    t["v_b"], t["o_w"], t["o_b"], heads, head_dim, impl="pyevo")

    baselines = {name: (lambda t, run=_sdpa_baseline(heads, head_dim, backend): run(t, t["x"], heads))
                 for name, backend in _attention_backends(device).items()}
    choice = {"op": "shared_attention", "aten_baselines": list(baselines),
              "shape": {"B": b, "S": s, "C": c, "heads": heads, "head_dim": head_dim, "cross": False,
                        "S_kv": s, "C_kv": c}}
    return Case("attention", f"{label} B{b} S{s} C{c} H{heads}x{head_dim}", dtype, 1,
                _attention_flops(b, s, c, heads, head_dim), None, make, ours, baselines,
                kernel_choice=choice)


def population_attention_case(label, b, s, c, heads, head_dim, count, device, dtype) -> Case:
    make = _attention_inputs(b, s, c, heads, head_dim)
    keep = [heads if i % 2 == 0 else max(1, heads // 2) for i in range(count)]

    def ours(t):
        return ops.population_attention([t["x"]], t["q_w"], t["q_b"], t["k_w"], t["k_b"], t["v_w"],
                                        t["v_b"], t["o_w"], t["o_b"], keep, head_dim)

    def loop_of(backend):
        run = _sdpa_baseline(heads, head_dim, backend)
        return lambda t: [run(t, t["x"], h) for h in keep]

    baselines = {f"loop {name}": loop_of(backend) for name, backend in _attention_backends(device).items()}
    flops = sum(_attention_flops(b, s, c, h, head_dim) for h in keep)
    case = Case("pop-attention shared-input", f"{label} B{b} S{s} C{c} H{heads}x{head_dim} K{count}",
                dtype, count, flops, None, make, ours, baselines)
    # The math backend is a reference, not what a user would capture.
    return _with_graphs(case, device, [name for name in baselines if name != "loop sdpa-math"])


# ---------------------------------------------------------------------------------------------
# Shape sets
# ---------------------------------------------------------------------------------------------


def shape_sets(device: torch.device, quick: bool, dtypes: Sequence[torch.dtype],
               populations: Sequence[int]) -> list[Case]:
    """The cases of a run. On CUDA: DDPM-CIFAR10 layers at batch 64 and LDM-CelebA-HQ layers at
    batch 8 (FACTS.md); on the CPU the DDPM layers at batch 4; ``quick``: tiny shapes."""
    cases: list[Case] = []
    if quick:
        layers = [("tiny", 2, 32, 8)]
        attention = [("tiny", 2, 64, 32, 2, 16)]
    elif device.type == "cuda":
        # (label, batch, channels, size): conv / GroupNorm layers
        layers = [("DDPM down0", 64, 128, 32), ("DDPM down1", 64, 256, 16),
                  ("LDM level0", 8, 224, 64), ("LDM level1", 8, 448, 32)]
        # (label, batch, seq, channels, heads, head_dim)
        attention = [("DDPM attn", 64, 256, 256, 4, 64), ("LDM attn32", 8, 1024, 448, 14, 32),
                     ("LDM attn16", 8, 256, 672, 21, 32)]
    else:
        layers = [("DDPM down1 (N4)", 4, 256, 16), ("DDPM down0 (N4)", 4, 128, 32)]
        attention = [("DDPM attn (B4)", 4, 256, 256, 4, 64)]
    for dtype in dtypes:
        for label, n, c, size in layers:
            cases.append(group_norm_case(label, n, c, size, device, dtype))
            for count in populations:
                cases.append(population_group_norm_case(label, n, c, size, count, device, dtype))
        # The fused resnet conv is a half-precision kernel (float32 runs cuDNN + the epilogue).
        if dtype != torch.float32 or device.type != "cuda":
            for label, n, c, size in layers:
                for epilogue in ("conv1", "conv2"):
                    cases.append(fused_conv_case(label, n, c, size, 3, epilogue, device, dtype))
        for label, b, s, c, heads, head_dim in attention:
            cases.append(attention_case(label, b, s, c, heads, head_dim, device, dtype))
            for count in populations:
                cases.append(population_attention_case(label, b, s, c, heads, head_dim, count, device,
                                                       dtype))
    return cases


# ---------------------------------------------------------------------------------------------
# Kernel-choice table entries
# ---------------------------------------------------------------------------------------------


def kernel_choice_entries(rows: Sequence[dict], device: str, capability: str, torch_version: str,
                          date: str, source: str) -> list[dict]:
    """The kernel-choice table entries (:mod:`pyevo.kernel_choices`) of a run's rows: one per case of
    an op with both implementations, ours (pyevo's) against the fastest of its ATen baselines that
    ran, chosen by :func:`~pyevo.kernel_choices.choose_kernel`. Rows where ours ran ATen's itself
    (the CUTLASS conv did not apply) or no ATen baseline ran give none."""
    entries = []
    for row in rows:
        choice = row.get("kernel_choice")
        if choice is None or row.get("ours_kernel", "pyevo").startswith("aten"):
            continue
        timed = {name: row["baselines"][name]["ms"] for name in choice["aten_baselines"]
                 if "ms" in row["baselines"].get(name, {})}
        if not timed:
            continue
        baseline = min(timed, key=timed.get)
        entries.append({"device": device, "capability": capability, "op": choice["op"], "dtype": row["dtype"],
                        "shape": dict(choice["shape"]),
                        "kernel": choose_kernel(row["ours_ms"], timed[baseline]),
                        "pyevo_ms": round(row["ours_ms"], 4), "aten_ms": round(timed[baseline], 4),
                        "aten_baseline": baseline, "date": date, "torch": torch_version, "source": source})
    return entries

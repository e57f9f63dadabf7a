"""The population ops (K candidates of one layer in one call) and the batched candidate evaluator.

CPU: each op against a loop of the single-candidate op (bitwise: on the CPU the population op is
that loop) and against plain PyTorch (slice + ``.contiguous()`` + ``F.conv2d`` /
``F.group_norm`` + ``F.silu`` / SDPA), float32 and float64, odd sizes, shared and per-candidate
inputs, non-contiguous inputs; opcheck; misuse; forward-only autograd. The evaluator's NSRs
against the per-candidate path (``block_nsr``) on every block type of a digits-shaped UNet.

CUDA (skipped without a GPU): fresh random inputs on every run (the seed is in the failure
message), outputs poisoned with NaN through the caching allocator, float32 within float32
rounding, float16/bfloat16 error at most twice PyTorch's own error in that precision (both
against float64), opcheck on CUDA. Tests marked ``sanitizer`` are the small subset the device
script runs under compute-sanitizer memcheck.
"""
from __future__ import annotations

import dataclasses
import random
import zlib

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

import pyevo  # noqa: F401  (registers torch.ops.pyevo)
from pyevo import ops
from pyevo.diffusion import ImageSet
from pyevo.distill import block_nsr, heldout_calls
from pyevo.search.local import search_block
from pyevo.search.population import PopulationEvaluator, block_evaluator, population_nsr
from pyevo.supernet import build_supernet
from test_ops import (attention_reference, check_cuda, conv_reference, fresh_generator,
                      group_norm_silu_reference, no_tf32, opcheck, poison_cuda_cache, relative_error)
from unet_configs import DIGITS_CONFIG

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = [torch.float32, torch.float64]
SCALE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def assert_matches(actual, expected, dtype, factor=1.0, message=""):
    tolerance = SCALE_TOLERANCE[dtype] * factor
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * scale,
                               msg=lambda m: f"{message}\n{m}")


# ---------------------------------------------------------------------------------------------
# Random populations
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvPopulation:
    batch: int
    height: int
    width: int
    in_channels_max: int
    out_channels_max: int
    shared_kernel: int
    stride: int
    bias: bool
    shared_input: bool
    layout: str  # contiguous | sliced | channels_last
    candidates: tuple  # (in_channels, out_channels, kernel_size) per candidate

    def make(self, dtype, generator):
        def randn(*shape):
            return torch.randn(*shape, dtype=dtype, generator=generator)

        def image(channels):
            if self.layout == "sliced":
                return randn(self.batch, channels + 2, self.height, self.width + 1)[:, 1:-1, :, 1:]
            x = randn(self.batch, channels, self.height, self.width)
            return x.to(memory_format=torch.channels_last) if self.layout == "channels_last" else x

        k = self.shared_kernel
        weight = randn(self.out_channels_max, self.in_channels_max, k, k)
        bias = randn(self.out_channels_max) if self.bias else None
        if self.shared_input:
            inputs = [image(self.in_channels_max)]
        else:
            inputs = [image(c) for c, _, _ in self.candidates]
        return inputs, weight, bias

    def args(self, explicit_in_channels=True):
        in_channels = [c for c, _, _ in self.candidates] if explicit_in_channels else []
        return (in_channels, [o for _, o, _ in self.candidates],
                [k for _, _, k in self.candidates], self.stride)

    def inputs_of(self, inputs):
        """The tensor each candidate reads (its channel prefix)."""
        return [(inputs[0] if self.shared_input else inputs[i])[:, :c]
                for i, (c, _, _) in enumerate(self.candidates)]


def conv_populations(count, seed):
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        shared_kernel = rng.choice([3, 5])
        c_in_max, c_out_max = rng.randint(1, 9), rng.randint(1, 9)
        candidates = tuple((rng.randint(1, c_in_max), rng.randint(1, c_out_max),
                            rng.choice([k for k in (1, 3, 5) if k <= shared_kernel]))
                           for _ in range(rng.randint(1, 5)))
        cases.append(ConvPopulation(
            batch=rng.randint(1, 3), height=rng.randint(1, 11), width=rng.randint(1, 11),
            in_channels_max=c_in_max, out_channels_max=c_out_max, shared_kernel=shared_kernel,
            stride=rng.choice([1, 2]), bias=rng.random() < 0.7, shared_input=rng.random() < 0.5,
            layout=rng.choice(["contiguous", "sliced", "channels_last"]), candidates=candidates))
    # A search generation's first layer: one input, widths 1/2 .. 1, kernels 1, 3, 5.
    cases.append(ConvPopulation(2, 8, 8, 8, 8, 5, 1, True, True, "contiguous",
                                ((8, 4, 1), (8, 6, 3), (8, 8, 5), (8, 8, 3))))
    return cases


@dataclasses.dataclass(frozen=True)
class NormPopulation:
    batch: int
    channels_per_group: int
    groups: tuple  # groups of each input
    extra_channels: int
    spatial: tuple
    eps: float
    sliced: bool

    def make(self, dtype, generator):
        def randn(*shape):
            return torch.randn(*shape, dtype=dtype, generator=generator)

        inputs = []
        for g in self.groups:
            c = g * self.channels_per_group
            x = randn(self.batch, c + 2, *self.spatial)[:, 1:-1] if self.sliced else randn(
                self.batch, c, *self.spatial)
            inputs.append(3 * x + 0.5)
        length = max(self.groups) * self.channels_per_group + self.extra_channels
        return inputs, 1 + 0.5 * randn(length), 0.5 * randn(length)


def norm_populations(count, seed):
    rng = random.Random(seed)
    spatials = [(), (1,), (7,), (5, 3), (4, 4), (9, 11), (3, 2, 5), (1, 1)]
    cases = []
    for _ in range(count):
        spatial = rng.choice(spatials)
        # PyTorch's group_norm (the reference) refuses groups of a single value.
        sizes = [2, 3, 4] if all(s == 1 for s in spatial) else [1, 2, 3, 4]
        cases.append(NormPopulation(
            batch=rng.randint(1, 3), channels_per_group=rng.choice(sizes),
            groups=tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 4))),
            extra_channels=rng.choice([0, 3]), spatial=spatial, eps=rng.choice([1e-5, 1e-6]),
            sliced=rng.random() < 0.4))
    return cases


@dataclasses.dataclass(frozen=True)
class AttentionPopulation:
    batch: int
    seq: int
    channels: int
    heads_max: int
    head_dim: int
    heads: tuple
    biases: tuple  # q, k, v, out
    shared_input: bool
    sliced: bool

    def make(self, dtype, generator):
        def randn(*shape):
            return torch.randn(*shape, dtype=dtype, generator=generator)

        b, s, c = self.batch, self.seq, self.channels
        rows = self.heads_max * self.head_dim

        def hidden():
            return randn(b, s, c + 2)[..., 1:-1] if self.sliced else randn(b, s, c)

        inputs = [hidden()] if self.shared_input else [hidden() for _ in self.heads]
        q_w, k_w, v_w = (randn(rows, c) / c ** 0.5 for _ in range(3))
        o_w = randn(c, rows) / rows ** 0.5
        q_b, k_b, v_b, o_b = (randn(n) if present else None
                              for n, present in zip((rows, rows, rows, c), self.biases))
        return inputs, [q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b]


def attention_populations(count, seed):
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        heads_max = rng.randint(1, 4)
        cases.append(AttentionPopulation(
            batch=rng.randint(1, 3), seq=rng.randint(1, 9), channels=rng.randint(1, 10),
            heads_max=heads_max, head_dim=rng.randint(1, 8),
            heads=tuple(rng.randint(1, heads_max) for _ in range(rng.randint(1, 4))),
            biases=tuple(rng.random() < 0.6 for _ in range(4)), shared_input=rng.random() < 0.5,
            sliced=rng.random() < 0.3))
    cases.append(AttentionPopulation(2, 16, 8, 4, 4, (2, 4, 4, 1), (True,) * 4, True, False))
    return cases


CONV_POPULATIONS = conv_populations(16, seed=11)
NORM_POPULATIONS = norm_populations(12, seed=12)
ATTENTION_POPULATIONS = attention_populations(12, seed=13)


def case_id(case) -> str:
    return "-".join(str(v) for v in dataclasses.astuple(case)).replace(" ", "")


def seeded(case) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(case_id(case).encode()))


# ---------------------------------------------------------------------------------------------
# CPU: against the single op and plain PyTorch
# ---------------------------------------------------------------------------------------------


def test_import_registers_population_ops():
    for name in ("population_conv2d", "population_group_norm_silu", "population_attention"):
        assert hasattr(torch.ops.pyevo, name)


@pytest.mark.parametrize("explicit_in_channels", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_POPULATIONS, ids=case_id)
def test_population_conv2d_matches_single_op_and_reference(case, dtype, explicit_in_channels):
    if not explicit_in_channels and case.shared_input:
        # Without in_channels every candidate reads the whole shared input.
        case = dataclasses.replace(case, candidates=tuple((case.in_channels_max, o, k)
                                                          for _, o, k in case.candidates))
    inputs, weight, bias = case.make(dtype, seeded(case))
    in_channels, out_channels, kernel_sizes, stride = case.args(explicit_in_channels)
    outputs = ops.population_conv2d(inputs, weight, bias, in_channels, out_channels, kernel_sizes,
                                    stride)
    assert len(outputs) == len(case.candidates)
    for i, (out, x) in enumerate(zip(outputs, case.inputs_of(inputs))):
        _, c_out, k = case.candidates[i]
        assert out.is_contiguous()
        assert torch.equal(out, torch.ops.pyevo.shared_conv2d(x, weight, bias, c_out, k, stride))
        assert_matches(out, conv_reference(x, weight, bias, c_out, k, stride), dtype,
                       message=f"candidate {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", NORM_POPULATIONS, ids=case_id)
def test_population_group_norm_silu_matches_single_op_and_reference(case, dtype):
    inputs, weight, bias = case.make(dtype, seeded(case))
    outputs = ops.population_group_norm_silu(inputs, weight, bias, case.channels_per_group, case.eps)
    assert len(outputs) == len(inputs)
    for i, (out, x) in enumerate(zip(outputs, inputs)):
        assert out.is_contiguous() and out.shape == x.shape
        assert torch.equal(out, torch.ops.pyevo.shared_group_norm_silu(
            x, weight, bias, case.channels_per_group, case.eps))
        assert_matches(out, group_norm_silu_reference(x, weight, bias, case.channels_per_group,
                                                      case.eps), dtype, message=f"input {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTENTION_POPULATIONS, ids=case_id)
def test_population_attention_matches_single_op_and_reference(case, dtype):
    inputs, weights = case.make(dtype, seeded(case))
    outputs = ops.population_attention(inputs, *weights, case.heads, case.head_dim)
    assert len(outputs) == len(case.heads)
    for i, (out, heads) in enumerate(zip(outputs, case.heads)):
        x = inputs[0] if case.shared_input else inputs[i]
        assert out.is_contiguous() and out.shape == x.shape
        assert torch.equal(out, torch.ops.pyevo.shared_attention(x, None, *weights, heads,
                                                                 case.head_dim))
        assert_matches(out, attention_reference(x, None, *weights, heads, case.head_dim), dtype,
                       message=f"candidate {i}")


def test_outputs_do_not_alias():
    # Two candidates with the same arguments still get two tensors.
    x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    a, b = ops.population_conv2d([x], w, None, [], [4, 4], [3, 3])
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


# ---------------------------------------------------------------------------------------------
# opcheck, autograd, misuse
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_input", [True, False])
def test_population_conv2d_opcheck(shared_input):
    case = dataclasses.replace(CONV_POPULATIONS[-1], shared_input=shared_input)
    inputs, weight, bias = case.make(torch.float32, torch.Generator().manual_seed(0))
    opcheck(torch.ops.pyevo.population_conv2d.default, (inputs, weight, bias, *case.args()))


def test_population_group_norm_silu_opcheck():
    inputs, weight, bias = NORM_POPULATIONS[0].make(torch.float32, torch.Generator().manual_seed(0))
    opcheck(torch.ops.pyevo.population_group_norm_silu.default,
            (inputs, weight, bias, NORM_POPULATIONS[0].channels_per_group, 1e-5))


@pytest.mark.parametrize("shared_input", [True, False])
def test_population_attention_opcheck(shared_input):
    case = dataclasses.replace(ATTENTION_POPULATIONS[-1], shared_input=shared_input)
    inputs, weights = case.make(torch.float32, torch.Generator().manual_seed(0))
    opcheck(torch.ops.pyevo.population_attention.default,
            (inputs, *weights, list(case.heads), case.head_dim))


def test_population_ops_are_forward_only():
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    outputs = ops.population_conv2d([x], w, None, [], [4, 2], [3, 1])
    assert outputs[0].requires_grad  # a forward under grad mode works (the search never trains)
    with pytest.raises(RuntimeError, match="population_conv2d is forward only.*shared_conv2d"):
        sum(o.sum() for o in outputs).backward()
    g = ops.population_group_norm_silu([torch.randn(2, 4, 3, requires_grad=True)],
                                       torch.randn(4), torch.randn(4), 2, 1e-5)
    with pytest.raises(RuntimeError, match="population_group_norm_silu is forward only"):
        g[0].sum().backward()


def _conv(**changes):
    args = dict(inputs=[torch.randn(2, 4, 6, 6)], weight=torch.randn(6, 4, 5, 5), bias=None,
                in_channels=[4, 2], out_channels=[6, 3], kernel_sizes=[3, 1], stride=1)
    args.update(changes)
    return torch.ops.pyevo.population_conv2d(*args.values())


def _norm(**changes):
    args = dict(inputs=[torch.randn(2, 4, 3), torch.randn(2, 6, 3)], weight=torch.randn(6),
                bias=torch.randn(6), channels_per_group=2, eps=1e-5)
    args.update(changes)
    return torch.ops.pyevo.population_group_norm_silu(*args.values())


def _attention(**changes):
    w = torch.randn(8, 6)
    args = dict(hs=[torch.randn(2, 5, 6)], q_w=w, q_b=None, k_w=w, k_b=None, v_w=w, v_b=None,
                o_w=torch.randn(6, 8), o_b=None, heads=[1, 2], head_dim=4)
    args.update(changes)
    return torch.ops.pyevo.population_attention(*args.values())


MISUSE = {
    "conv no candidates": (lambda: _conv(out_channels=[], kernel_sizes=[], in_channels=[]),
                           "no candidates"),
    "conv input count": (lambda: _conv(inputs=[torch.randn(2, 4, 6, 6)] * 3),
                         "one per candidate \\(2\\), got 3"),
    "conv kernel list": (lambda: _conv(kernel_sizes=[3]), "kernel_sizes has 1 entries"),
    "conv in_channels list": (lambda: _conv(in_channels=[4]), "in_channels has 1 entries"),
    "conv in_channels range": (lambda: _conv(in_channels=[4, 5]),
                               "candidate 1\\): in_channels must be in \\[1, 4\\]"),
    "conv kernel too big": (lambda: _conv(kernel_sizes=[3, 7]),
                            "candidate 1\\): kernel_size 7 is larger"),
    "conv even kernel": (lambda: _conv(kernel_sizes=[2, 1]), "candidate 0\\): kernel_size must be odd"),
    "conv out too wide": (lambda: _conv(out_channels=[7, 3]), "candidate 0\\): out_channels 7"),
    "conv dtype mix": (lambda: _conv(inputs=[torch.randn(2, 4, 6, 6, dtype=torch.float64)]),
                       "weight has dtype"),
    "conv rank": (lambda: _conv(inputs=[torch.randn(4, 6, 6)]), "input must be 4-D"),
    "norm empty": (lambda: _norm(inputs=[]), "no inputs"),
    "norm divisibility": (lambda: _norm(inputs=[torch.randn(2, 4, 3), torch.randn(2, 5, 3)]),
                          "input 1\\)|candidate 1\\).*not divisible"),
    "norm short weight": (lambda: _norm(weight=torch.randn(4)), "weight has 4 entries"),
    "attention input count": (lambda: _attention(hs=[torch.randn(2, 5, 6)] * 3),
                              "one per candidate \\(2\\), got 3"),
    "attention too many heads": (lambda: _attention(heads=[1, 3]),
                                 "candidate 1\\): heads \\* head_dim = 3 \\* 4 = 12"),
    "attention zero heads": (lambda: _attention(heads=[0, 2]), "heads must be >= 1"),
    "attention batch mismatch": (lambda: _attention(hs=[torch.randn(2, 5, 6), torch.randn(3, 5, 6)]),
                                 "same batch size"),
    "attention no candidates": (lambda: _attention(heads=[]), "no candidates"),
}


@pytest.mark.parametrize("name", list(MISUSE))
def test_misuse_raises_clear_error(name):
    call, message = MISUSE[name]
    with pytest.raises(RuntimeError, match=message):
        call()


# ---------------------------------------------------------------------------------------------
# The batched evaluator against the per-candidate path
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_supernet():
    """A digits-shaped teacher (random init, perturbed norms) and its supernet, held-out calls of
    10 images: every block type (down, attention down, mid, up with skips, attention up)."""
    torch.manual_seed(0)
    teacher = UNet2DModel(**DIGITS_CONFIG).eval()
    with torch.no_grad():
        for name, param in teacher.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    teacher.requires_grad_(False)
    supernet = build_supernet(teacher).eval()
    # Shake the shared weights so that kernel rings and narrow widths matter.
    with torch.no_grad():
        for param in supernet.parameters():
            param.add_(0.02 * torch.randn_like(param))
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    images = torch.rand(10, 1, 16, 16) * 2 - 1
    calls = heldout_calls(teacher, ImageSet(images), scheduler, size=10, seed=0)
    return supernet, calls


def sample_genomes(space, count, seed):
    rng = random.Random(seed)
    genomes = [space.teacher_genome(), space.smallest_genome(), space.largest_genome()]
    genomes += [space.random_genome(rng) for _ in range(count - len(genomes))]
    return genomes


@pytest.mark.parametrize("block_name", ["down_blocks.0", "down_blocks.1", "mid_block",
                                        "up_blocks.1", "up_blocks.2"])
def test_population_nsr_equals_per_candidate_path(digits_supernet, block_name):
    supernet, calls = digits_supernet
    block, call = supernet[block_name], calls[block_name]
    genomes = sample_genomes(block.space, 7, seed=len(block_name))
    expected = []
    for genome in genomes:
        block.set_genome(genome)
        expected.append(block_nsr(block, call, chunk=4))
    # Chunks of 4 samples as block_nsr's; at most 12 rows per forward: groups of 3 candidates.
    actual = population_nsr(block, call, genomes, chunk=4, max_rows=12)
    assert len(actual) == len(genomes)
    for genome, a, e in zip(genomes, actual, expected):
        assert a == pytest.approx(e, rel=1e-5, abs=1e-9), block.space.encode(genome)
    assert len(set(round(e, 9) for e in expected)) > 1  # the genomes really differ


def test_population_nsr_float64_is_exact_to_rounding(digits_supernet):
    supernet, calls = digits_supernet
    block = supernet["up_blocks.1"]  # resnets after a skip concatenation, attentions, upsampler
    block64 = __import__("copy").deepcopy(block).double()
    call64 = calls["up_blocks.1"].to("cpu", torch.float64)
    genomes = sample_genomes(block.space, 6, seed=3)
    actual = population_nsr(block64, call64, genomes)
    for genome, a in zip(genomes, actual):
        block64.set_genome(genome)
        assert a == pytest.approx(block_nsr(block64, call64), rel=1e-12)


def test_population_evaluator_many_and_single(digits_supernet):
    supernet, calls = digits_supernet
    block = supernet["down_blocks.1"]
    genomes = sample_genomes(block.space, 5, seed=9)
    latency = {block.space.encode(g): float(i) for i, g in enumerate(genomes)}
    evaluator = PopulationEvaluator(block, calls["down_blocks.1"],
                                    lambda g: latency[block.space.encode(g)])
    before = block.genome
    many = evaluator.many(genomes)
    for genome, (nsr, ms) in zip(genomes, many):
        single_nsr, single_ms = evaluator(genome)
        assert nsr == pytest.approx(single_nsr, rel=1e-5)
        assert ms == single_ms == latency[block.space.encode(genome)]
    assert block.genome == before  # the evaluator leaves the block's genome alone


def test_search_block_uses_the_population_evaluator(digits_supernet):
    # A generation's new genomes go to evaluate.many in one call, and the search ends as it does
    # with the per-candidate evaluator (same NSRs up to rounding, same latencies).
    from pyevo.config import SearchConfig

    supernet, calls = digits_supernet
    name = "down_blocks.1"
    block, call = supernet[name], calls[name]

    def latency(genome):
        arch = block.space.arch(genome)
        return float(sum(a.hidden * (a.kernel1 + a.kernel2) for a in arch.resnets.values())
                     + sum(a.heads for a in arch.attentions.values()))

    class Counting(PopulationEvaluator):
        batches: list = []

        def many(self, genomes):
            self.batches.append(len(genomes))
            return super().many(genomes)

    def per_candidate(genome):
        block.set_genome(genome)
        return block_nsr(block, call), latency(genome)

    config = SearchConfig(population=8, generations=2)
    evaluator = Counting(block, call, latency)
    batched = search_block(block.space, evaluator, config, seed=5, progress=False)
    plain = search_block(block.space, per_candidate, config, seed=5, progress=False)
    assert Counting.batches and max(Counting.batches) > 1
    assert sum(Counting.batches) == len(batched.evaluated)
    assert [c.code for c in batched.evaluated] == [c.code for c in plain.evaluated]
    for a, b in zip(batched.evaluated, plain.evaluated):
        assert a.nsr == pytest.approx(b.nsr, rel=1e-5) and a.latency_ms == b.latency_ms


def test_block_evaluator_per_device(digits_supernet):
    supernet, calls = digits_supernet
    block, call = supernet["mid_block"], calls["mid_block"]
    genome = block.space.smallest_genome()
    evaluate = block_evaluator(block, call, lambda g: 2.5, "cpu")
    assert not hasattr(evaluate, "many")  # the per-candidate path off CUDA
    block.set_genome(genome)
    assert evaluate(genome) == (block_nsr(block, call), 2.5)
    if torch.cuda.is_available():
        assert isinstance(block_evaluator(block, call, lambda g: 2.5, "cuda"), PopulationEvaluator)


def first_resnet_variants(space, rest):
    """Every choice of the block's first resnet (kernels, width or skip), the other genes from ``rest``:
    several candidates per kernel group, of several widths, as the shared-input path groups them."""
    import itertools

    genes = [range(n) for n in space.num_choices[:3]]
    return [tuple(first) + tuple(rest[3:]) for first in itertools.product(*genes)]


@pytest.mark.parametrize("block_name", ["down_blocks.0", "up_blocks.1"])
@pytest.mark.parametrize("time_embedding_norm", ["default", "scale_shift"])
def test_shared_first_resnet_float64_equals_per_candidate(block_name, time_embedding_norm):
    # The first searched resnet runs once per kernel1 group at its widest width, the time embedding
    # and GroupNorm+SiLU once per group, conv2 by accumulated channel slabs: in float64 every
    # candidate's NSR is the per-candidate path's to rounding.
    import copy

    torch.manual_seed(1)
    teacher = UNet2DModel(**{**DIGITS_CONFIG, "resnet_time_scale_shift": time_embedding_norm}).eval()
    teacher.requires_grad_(False)
    supernet = build_supernet(teacher).eval()
    with torch.no_grad():
        for param in supernet.parameters():
            param.add_(0.02 * torch.randn_like(param))
    images = torch.rand(6, 1, 16, 16) * 2 - 1
    call = heldout_calls(teacher, ImageSet(images), DDPMScheduler(num_train_timesteps=1000), size=6,
                         seed=0)[block_name].to("cpu", torch.float64)
    block = copy.deepcopy(supernet[block_name]).double()
    variants = first_resnet_variants(block.space, sample_genomes(block.space, 4, seed=2)[3])
    genomes = random.Random(3).sample(variants, 10)
    first = [block.space.arch(g).resnets[0] for g in genomes]
    groups = [{a.hidden for a in first if not a.skip and a.kernel1 == k} for k in {a.kernel1 for a in first}]
    assert max(len(widths) for widths in groups) >= 2  # some group shares one conv between widths
    actual = population_nsr(block, call, genomes, chunk=4, max_rows=4 * len(genomes))
    for genome, a in zip(genomes, actual):
        block.set_genome(genome)
        assert a == pytest.approx(block_nsr(block, call, chunk=4), rel=1e-12), block.space.encode(genome)


def test_shared_first_resnet_runs_one_conv_per_kernel_group(digits_supernet, monkeypatch):
    # What is shared, observed at the ops: the shared-input conv1 is one population call with one
    # candidate per kernel1 at the group's widest width, and conv2 over the shared input reads each
    # input channel of a (kernel1, kernel2) subgroup once (one chunk: the slabs are requested once).
    import pyevo.search.population as population

    supernet, calls = digits_supernet
    block, call = supernet["down_blocks.0"], calls["down_blocks.0"]
    genomes = first_resnet_variants(block.space, block.space.teacher_genome())
    first = [block.space.arch(g).resnets[0] for g in genomes]
    conv1_calls, conv2_slabs = [], []
    real_population_conv2d, real_input_slab = ops.population_conv2d, population._WeightCrops.input_slab

    def population_conv2d(inputs, weight, *args):
        if weight is block.block.resnets[0].conv1.weight and len(inputs) == 1:
            conv1_calls.append((args[2], args[3]))  # out_channels, kernel_sizes
        return real_population_conv2d(inputs, weight, *args)

    def input_slab(self, conv, first, end, kernel_size):
        conv2_slabs.append((first, end, kernel_size))
        return real_input_slab(self, conv, first, end, kernel_size)

    monkeypatch.setattr(population.ops, "population_conv2d", population_conv2d)
    monkeypatch.setattr(population._WeightCrops, "input_slab", input_slab)
    population_nsr(block, call, genomes, chunk=10, max_rows=10 * len(genomes))
    kernels = sorted({a.kernel1 for a in first if not a.skip})
    assert len(conv1_calls) == 1
    out_channels, kernel_sizes = conv1_calls[0]
    assert sorted(kernel_sizes) == kernels
    for k, width in zip(kernel_sizes, out_channels):
        assert width == max(a.hidden for a in first if not a.skip and a.kernel1 == k)
    subgroups = {(a.kernel1, a.kernel2) for a in first if not a.skip}
    widest = {pair: max(a.hidden for a in first if not a.skip and (a.kernel1, a.kernel2) == pair) for pair in subgroups}
    # conv2 reads each input channel once per subgroup, not once per candidate
    assert sum(end - begin for begin, end, _ in conv2_slabs) == sum(widest.values())
    assert sum(widest.values()) < sum(a.hidden for a in first)  # what the per-candidate path reads


# ---------------------------------------------------------------------------------------------
# CUDA: fresh inputs, poisoned outputs, CPU op and PyTorch as references
# ---------------------------------------------------------------------------------------------


CUDA_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@CUDA
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("case", [CONV_POPULATIONS[-1], CONV_POPULATIONS[2], CONV_POPULATIONS[5]],
                         ids=case_id)
def test_cuda_population_conv2d(case, dtype):
    generator, seed = fresh_generator()
    inputs, weight, bias = case.make(torch.float32, generator)
    inputs = [x.to("cuda", dtype) for x in inputs]
    weight, bias = weight.to("cuda", dtype), None if bias is None else bias.to("cuda", dtype)
    in_channels, out_channels, kernel_sizes, stride = case.args()
    with no_tf32():
        expected_shapes = [conv_reference(x, weight, bias, o, k, stride).shape
                           for x, o, k in zip(case.inputs_of(inputs), out_channels, kernel_sizes)]
        poison_cuda_cache(*expected_shapes, dtype=dtype)
        outputs = ops.population_conv2d(inputs, weight, bias, in_channels, out_channels,
                                        kernel_sizes, stride)
        cpu = ops.population_conv2d([x.cpu().double() for x in inputs], weight.cpu().double(),
                                    None if bias is None else bias.cpu().double(), in_channels,
                                    out_channels, kernel_sizes, stride)
        for i, (out, x) in enumerate(zip(outputs, case.inputs_of(inputs))):
            assert out.is_cuda and out.dtype == dtype and out.is_contiguous()
            _, c_out, k = case.candidates[i]
            check_cuda(out, lambda x, w, b: conv_reference(x, w, b, c_out, k, stride),
                       [x, weight, bias], dtype, seed, f"candidate {i}")
            assert relative_error(out, cpu[i]) <= (1e-12 if dtype == torch.float64 else 2e-2)


@CUDA
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("case", NORM_POPULATIONS[:4], ids=case_id)
def test_cuda_population_group_norm_silu(case, dtype):
    generator, seed = fresh_generator()
    inputs, weight, bias = case.make(torch.float32, generator)
    inputs = [x.to("cuda", dtype) for x in inputs]
    weight, bias = weight.to("cuda", dtype), bias.to("cuda", dtype)
    poison_cuda_cache(*[x.shape for x in inputs], dtype=dtype)
    outputs = ops.population_group_norm_silu(inputs, weight, bias, case.channels_per_group, case.eps)
    for i, (out, x) in enumerate(zip(outputs, inputs)):
        assert out.is_cuda and out.is_contiguous() and out.shape == x.shape
        check_cuda(out, lambda x, w, b: group_norm_silu_reference(x, w, b, case.channels_per_group,
                                                                  case.eps),
                   [x, weight, bias], dtype, seed, f"input {i}")


@CUDA
@pytest.mark.sanitizer
def test_cuda_population_group_norm_silu_small():
    test_cuda_population_group_norm_silu(NORM_POPULATIONS[0], torch.float32)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shared_input", [True, False])
@pytest.mark.parametrize("head_dim", [8, 32, 64, 80])
def test_cuda_population_attention(shared_input, dtype, head_dim):
    # 80 > 64: the SDPA fallback.
    generator, seed = fresh_generator()
    case = AttentionPopulation(3, 77, 96, 4, head_dim, (4, 2, 1, 4), (True, False, True, True),
                               shared_input, False)
    inputs, weights = case.make(torch.float32, generator)
    inputs = [x.to("cuda", dtype) for x in inputs]
    weights = [None if w is None else w.to("cuda", dtype) for w in weights]
    with no_tf32():
        poison_cuda_cache(*[inputs[0].shape] * 4, dtype=dtype)
        outputs = ops.population_attention(inputs, *weights, case.heads, head_dim)
        for i, (out, heads) in enumerate(zip(outputs, case.heads)):
            x = inputs[0] if shared_input else inputs[i]
            assert out.is_cuda and out.is_contiguous() and out.shape == x.shape
            check_cuda(out, lambda x, *w: attention_reference(x, None, *w, heads, head_dim),
                       [x, *weights], dtype, seed, f"candidate {i}")


@CUDA
@pytest.mark.sanitizer
def test_cuda_population_attention_small():
    for dtype in (torch.float32, torch.bfloat16):
        test_cuda_population_attention(False, dtype, 32)


@CUDA
@pytest.mark.sanitizer
def test_cuda_population_opcheck():
    case = CONV_POPULATIONS[-1]
    inputs, weight, bias = case.make(torch.float32, torch.Generator().manual_seed(0))
    opcheck(torch.ops.pyevo.population_conv2d.default,
            ([x.cuda() for x in inputs], weight.cuda(), bias.cuda(), *case.args()))
    inputs, weight, bias = NORM_POPULATIONS[0].make(torch.float32, torch.Generator().manual_seed(0))
    opcheck(torch.ops.pyevo.population_group_norm_silu.default,
            ([x.cuda() for x in inputs], weight.cuda(), bias.cuda(),
             NORM_POPULATIONS[0].channels_per_group, 1e-5))
    case = ATTENTION_POPULATIONS[-1]
    inputs, weights = case.make(torch.float32, torch.Generator().manual_seed(0))
    opcheck(torch.ops.pyevo.population_attention.default,
            ([x.cuda() for x in inputs], *[None if w is None else w.cuda() for w in weights],
             list(case.heads), case.head_dim))


@CUDA
def test_cuda_population_nsr_matches_per_candidate_path(digits_supernet):
    supernet, calls = digits_supernet
    for name in ("down_blocks.1", "up_blocks.1"):
        block = supernet[name]
        genomes = sample_genomes(block.space, 6, seed=1)
        with no_tf32():
            evaluator = PopulationEvaluator(block, calls[name], lambda g: 0.0, device="cuda")
            batched = [nsr for nsr, _ in evaluator.many(genomes)]
            single = [evaluator(genome)[0] for genome in genomes]
        cpu = population_nsr(block, calls[name], genomes)
        for genome, a, b, c in zip(genomes, batched, single, cpu):
            assert a == pytest.approx(b, rel=1e-4), block.space.encode(genome)
            assert a == pytest.approx(c, rel=1e-3), block.space.encode(genome)

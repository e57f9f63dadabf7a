"""Transformer2DModel blocks (UNet2DConditionModel, SD-v1.5-shaped): space, super-transformer, static export."""
import copy
import itertools
import random

import pytest
import torch
import torch.utils._pytree as pytree
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention, SlicedAttnProcessor
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D

from pyevo.cost import count_macs, count_params
from pyevo.space import UnsupportedBlockError, block_space, searchable_blocks, unet_space
from pyevo.student import DroppedTransformer2D, build_static_block, make_block_static
from pyevo.supernet import (SuperTransformer2D, SuperTransformerAttention, build_supernet, ff_unit_order, head_order,
                            supernet_unet)
from unet_configs import DIGITS_CONFIG, SD15_CONFIG, SD15_SMALL_CONFIG

BLOCKS = ["down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block",
          "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3"]
TEXT_TOKENS = 7


def make_teacher(config: dict = SD15_SMALL_CONFIG, seed: int = 0, dtype=torch.float32) -> UNet2DConditionModel:
    """A random-init conditional UNet with its norm affines perturbed (so importance orders are not ties)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).to(dtype).eval()
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    return unet.requires_grad_(False)


def teacher_inputs(unet, batch=2):
    generator = torch.Generator().manual_seed(3)
    dtype, config = unet.dtype, unet.config
    sample = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    text = torch.randn(batch, TEXT_TOKENS, config.cross_attention_dim, generator=generator)
    return sample.to(dtype), torch.tensor([5, 800][:batch]), text.to(dtype)


def capture_block_calls(unet, *inputs) -> dict:
    """Every searchable block's [args, kwargs, output] from one forward of ``unet(*inputs)``."""
    calls, handles = {}, []
    for name, block in searchable_blocks(unet).items():
        handles.append(block.register_forward_pre_hook(
            lambda module, args, kwargs, name=name: calls.__setitem__(name, [args, kwargs]), with_kwargs=True))
        handles.append(block.register_forward_hook(
            lambda module, args, kwargs, output, name=name: calls[name].append(output), with_kwargs=True))
    with torch.no_grad():
        unet(*inputs)
    for handle in handles:
        handle.remove()
    return calls


def max_relative_error(actual, expected) -> float:
    leaves = list(zip(pytree.tree_leaves(actual), pytree.tree_leaves(expected), strict=True))
    for a, e in leaves:
        assert a.shape == e.shape
    return max(((a - e).abs().max() / e.abs().max()).item() for a, e in leaves)


@pytest.fixture(scope="module")
def teacher():
    return make_teacher()


@pytest.fixture(scope="module")
def spaces(teacher):
    return {space.name: space for space in unet_space(teacher)}


# ---------------------------------------------------------------- the space
def test_every_block_of_a_conditional_unet_is_searchable(teacher, spaces):
    assert list(searchable_blocks(teacher)) == BLOCKS == list(spaces)
    assert [s.block_type for s in spaces.values()] == [
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
        "UNetMidBlock2DCrossAttn", "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    assert [len(s.transformers) for s in spaces.values()] == [2, 2, 2, 0, 1, 0, 3, 3, 3]
    assert all(not s.attentions for s in spaces.values())


def test_transformer_genes(spaces):
    space = spaces["down_blocks.1"]
    assert [g.name for g in space.genes][6:] == ["t0.keep", "t0.self_heads", "t0.cross_heads", "t0.ff", "t0.layers",
                                                 "t1.keep", "t1.self_heads", "t1.cross_heads", "t1.ff", "t1.layers"]
    assert space.num_choices[6:11] == (2, 2, 2, 3, 1)
    assert [g.labels for g in space.genes[6:11]] == [("drop", "keep"), ("h4", "h8"), ("x4", "x8"),
                                                     ("f0.5", "f0.75", "f1.0"), ("l1",)]
    t = space.transformers[0]
    # 64 channels, 8 heads of 8; GEGLU inner width 4 x 64; text states of width 32
    assert (t.index, t.channels, t.inner_dim, t.head_dim, t.cross_attention_dim) == (0, 64, 64, 8, 32)
    assert t.ff_widths == (128, 192, 256) and t.layers == 1
    assert spaces["down_blocks.0"].transformers[0].head_dim == 4


def test_special_genomes_have_stable_strings(spaces):
    space = spaces["down_blocks.0"]
    assert space.encode(space.teacher_genome()) == "r0:k3k3w1.0,r1:k3k3w1.0,t0:h8x8f1.0l1,t1:h8x8f1.0l1"
    assert space.teacher_genome() == (1, 1, 3, 1, 1, 3, 1, 1, 1, 2, 0, 1, 1, 1, 2, 0)
    assert space.encode(space.largest_genome()) == "r0:k5k5w1.0,r1:k5k5w1.0,t0:h8x8f1.0l1,t1:h8x8f1.0l1"
    assert space.encode(space.smallest_genome()) == "r0:k1k1w0.5,r1:k1k1w0.5,t0:h4x4f0.5l1,t1:h4x4f0.5l1"
    assert space.encode(space.narrow_genome()) == "r0:k3k3w0.5,r1:k3k3w0.5,t0:h8x8f0.5l1,t1:h8x8f0.5l1"
    assert space.encode(space.minimal_genome()) == "r0:skip,r1:skip,t0:drop,t1:drop"
    mid = spaces["mid_block"]
    assert mid.encode(mid.teacher_genome()) == "r0:k3k3w1.0,r1:k3k3w1.0,t0:h8x8f1.0l1"
    arch = space.arch(space.decode("r0:skip,r1:k1k5w0.5,t0:drop,t1:h4x8f0.75l1"))
    assert arch.transformers[0].dropped
    assert (arch.transformers[1].layers, arch.transformers[1].self_heads, arch.transformers[1].cross_heads,
            arch.transformers[1].head_dim, arch.transformers[1].ff_inner) == (1, 4, 8, 4, 96)


def test_random_genomes_round_trip_in_every_block(spaces):
    rng = random.Random(0)
    for space in spaces.values():
        for _ in range(200):
            genome = space.random_genome(rng)
            text = space.encode(genome)
            assert space.decode(text) == genome
            assert space.encode(space.decode(text)) == text


def test_dropped_transformers_are_canonical(spaces):
    space = spaces["mid_block"]
    canonical = {space.canonical(g) for g in itertools.product(*(range(n) for n in space.num_choices))}
    assert len(canonical) == space.num_genomes() == len({space.encode(g) for g in canonical})
    teacher = space.teacher_genome()
    dropped = [teacher[:6] + (0, a, b, c, 0) for a in range(2) for b in range(2) for c in range(3)]
    assert {space.canonical(g) for g in dropped} == {teacher[:6] + (0, 1, 1, 2, 0)}
    assert {space.encode(g) for g in dropped} == {"r0:k3k3w1.0,r1:k3k3w1.0,t0:drop"}
    assert space.decode("r0:k3k3w1.0,r1:k3k3w1.0,t0:drop") == teacher[:6] + (0, 1, 1, 2, 0)


@pytest.mark.parametrize("text", [
    "r0:k3k3w1.0,r1:k3k3w1.0,t0:h3x8f1.0l1",  # self heads not offered
    "r0:k3k3w1.0,r1:k3k3w1.0,t0:h8x2f1.0l1",  # cross heads not offered
    "r0:k3k3w1.0,r1:k3k3w1.0,t0:h8x8f0.6l1",  # ff ratio not offered
    "r0:k3k3w1.0,r1:k3k3w1.0,t0:h8x8f1.0l2",  # one layer only
    "r0:k3k3w1.0,r1:k3k3w1.0,t0:h8x8f1.0",  # no layers field
    "r0:k3k3w1.0,r1:k3k3w1.0,t0:keep",
    "r0:k3k3w1.0,r1:k3k3w1.0",  # t0 missing
    "r0:k3k3w1.0,r1:k3k3w1.0,t0:drop,t1:drop",  # no transformer 1
    "r0:k3k3w1.0,r1:k3k3w1.0,t0:drop,t0:drop",
])
def test_bad_transformer_strings_raise(spaces, text):
    with pytest.raises(ValueError, match="mid_block"):
        spaces["mid_block"].decode(text)


def test_unet2dmodel_space_is_unchanged():
    spaces = {space.name: space for space in unet_space(UNet2DModel(**DIGITS_CONFIG))}
    assert all(not space.transformers for space in spaces.values())
    space = spaces["down_blocks.1"]
    assert len(space) == 8 and space.num_choices == (3, 3, 4, 3, 3, 4, 3, 3)
    assert space.decode("r0:k3k3w1.0,r1:k3k3w1.0,a0:h4,a1:h4") == (1, 1, 3, 1, 1, 3, 2, 2)
    assert space.decode("r0:skip,r1:k1k5w0.5,a0:drop,a1:h2") == (1, 1, 0, 0, 2, 1, 0, 1)
    assert spaces["mid_block"].decode("r0:k5k1w0.75,r1:skip,a0:h2") == (2, 0, 2, 1, 1, 0, 1)


# ------------------------------------------------------ teacher-shaped path
@pytest.mark.parametrize("dtype,linear_projection,rel", [(torch.float64, False, 1e-12), (torch.float64, True, 1e-12),
                                                          (torch.float32, False, 1e-5), (torch.float32, True, 1e-5)])
def test_teacher_path_reproduces_every_block(dtype, linear_projection, rel):
    teacher = make_teacher({**SD15_SMALL_CONFIG, "use_linear_projection": linear_projection}, seed=1, dtype=dtype)
    inputs = teacher_inputs(teacher)
    calls = capture_block_calls(teacher, *inputs)
    supernet = build_supernet(teacher).eval()
    assert list(calls) == supernet.keys()
    with torch.no_grad():
        for name, block in supernet.items():
            args, kwargs, expected = calls[name]
            if block.space.transformers:  # diffusers passes the text states to the block by keyword
                assert kwargs["encoder_hidden_states"] is inputs[2]
            assert max_relative_error(block(*args, **kwargs), expected) <= rel, name
        assert max_relative_error(supernet_unet(teacher, supernet)(*inputs).sample, teacher(*inputs).sample) <= rel


def test_layers_prefix_is_the_teachers_first_layers():
    teacher = make_teacher({**SD15_SMALL_CONFIG, "transformer_layers_per_block": 2}, dtype=torch.float64)
    supernet = build_supernet(teacher).eval()
    space = supernet["down_blocks.1"].space
    assert space.genes[10].labels == ("l1", "l2")
    super_transformer = supernet["down_blocks.1"].block.attentions[0]
    reference = copy.deepcopy(teacher.down_blocks[1].attentions[0])
    reference.transformer_blocks = reference.transformer_blocks[:1]
    hidden = torch.randn(2, 64, 4, 4, dtype=torch.float64)
    text = torch.randn(2, TEXT_TOKENS, 32, dtype=torch.float64)
    with torch.no_grad():
        for layers, expected_module in ((1, reference), (2, teacher.down_blocks[1].attentions[0])):
            supernet["down_blocks.1"].set_genome(space.decode(f"r0:skip,r1:skip,t0:h8x8f1.0l{layers},t1:drop"))
            assert super_transformer.arch.layers == layers
            actual = super_transformer(hidden, encoder_hidden_states=text, return_dict=False)
            expected = expected_module(hidden, encoder_hidden_states=text, return_dict=False)
            assert max_relative_error(actual, expected) <= 1e-12


def test_head_and_ff_prefixes_keep_the_most_important_units():
    """A smaller path at step 0 is the teacher transformer restricted to the importance-ordered prefixes."""
    teacher = make_teacher(dtype=torch.float64, seed=2)
    supernet = build_supernet(teacher).eval()
    block = supernet["mid_block"]
    transformer = teacher.mid_block.attentions[0]
    layer = transformer.transformer_blocks[0]
    reference = copy.deepcopy(transformer)
    reference_layer = reference.transformer_blocks[0]
    head_dim = 8

    def head_prefix(attention, heads, cross_attention_dim):
        rows = (head_order(attention)[:heads, None] * head_dim + torch.arange(head_dim)).flatten()
        kept = Attention(64, cross_attention_dim=cross_attention_dim, heads=heads, dim_head=head_dim,
                         out_bias=True).double()
        for name in ("to_q", "to_k", "to_v"):
            getattr(kept, name).weight.data.copy_(getattr(attention, name).weight[rows])
        kept.to_out[0].weight.data.copy_(attention.to_out[0].weight[:, rows])
        kept.to_out[0].bias.data.copy_(attention.to_out[0].bias)
        return kept

    units = ff_unit_order(layer.ff, layer.norm3)[:128]
    reference_layer.attn1 = head_prefix(layer.attn1, 4, None)
    reference_layer.attn2 = head_prefix(layer.attn2, 4, 32)
    reference_layer.ff = FeedForward(64, inner_dim=128, activation_fn="geglu").double()
    proj = layer.ff.net[0].proj
    reference_layer.ff.net[0].proj.weight.data.copy_(proj.weight[torch.cat([units, units + 256])])
    reference_layer.ff.net[0].proj.bias.data.copy_(proj.bias[torch.cat([units, units + 256])])
    reference_layer.ff.net[2].weight.data.copy_(layer.ff.net[2].weight[:, units])
    reference_layer.ff.net[2].bias.data.copy_(layer.ff.net[2].bias)
    block.set_genome(block.space.decode("r0:skip,r1:skip,t0:h4x4f0.5l1"))
    hidden = torch.randn(2, 64, 2, 2, dtype=torch.float64)
    text = torch.randn(2, TEXT_TOKENS, 32, dtype=torch.float64)
    with torch.no_grad():
        actual = block.block.attentions[0](hidden, encoder_hidden_states=text, return_dict=False)
        expected = reference(hidden, encoder_hidden_states=text, return_dict=False)
    assert max_relative_error(actual, expected) <= 1e-12


def test_dropped_transformer_returns_its_input(teacher):
    supernet = build_supernet(teacher).eval()
    block = supernet["down_blocks.0"]
    block.set_genome(block.space.decode("r0:skip,r1:skip,t0:drop,t1:drop"))
    hidden = torch.randn(2, 32, 8, 8)
    for layer in (block.block.attentions[0], build_static_block(block, block.genome).attentions[0]):
        assert isinstance(layer, (SuperTransformer2D, DroppedTransformer2D))
        output = layer(hidden, encoder_hidden_states=torch.randn(2, TEXT_TOKENS, 32), return_dict=False)
        assert isinstance(output, tuple) and len(output) == 1 and output[0] is hidden
        assert isinstance(layer(hidden), Transformer2DModelOutput) and layer(hidden).sample is hidden
    # the block is then its resnets' shortcuts (identity here) and its downsampler
    output, states = block(hidden, torch.randn(2, 128), encoder_hidden_states=torch.randn(2, TEXT_TOKENS, 32))
    assert torch.equal(states[0], hidden) and torch.equal(states[1], hidden)


def test_masks_are_refused_not_ignored(teacher):
    block = build_supernet(teacher)["mid_block"]
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        block(torch.randn(2, 64, 1, 1), torch.randn(2, 128), encoder_hidden_states=torch.randn(2, TEXT_TOKENS, 32),
              encoder_attention_mask=torch.ones(2, TEXT_TOKENS))


# ------------------------------------------------------------- static export
@pytest.fixture(scope="module")
def float64_supernet_and_calls():
    """A float64 teacher with 2 transformer layers per block, its supernet moved off the teacher (as
    distillation would), and every block's real inputs."""
    teacher = make_teacher({**SD15_SMALL_CONFIG, "transformer_layers_per_block": 2}, seed=3, dtype=torch.float64)
    supernet = build_supernet(teacher).eval()
    with torch.no_grad():
        for param in supernet.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return teacher, supernet, capture_block_calls(teacher, *teacher_inputs(teacher))


def test_a_block_search_projects_the_text_states_once_for_all_its_candidates(float64_supernet_and_calls):
    _, supernet, calls = float64_supernet_and_calls
    block = supernet["mid_block"]
    args, kwargs, _ = calls["mid_block"]
    states = kwargs["encoder_hidden_states"]
    space = block.space
    rng = random.Random(0)
    genomes = [space.teacher_genome(), space.smallest_genome()] + [space.random_genome(rng) for _ in range(4)]
    genomes = [g for g in genomes if not all(t.dropped for t in space.arch(g).transformers.values())]
    assert len(genomes) >= 3

    def score_all() -> tuple[list[torch.Tensor], int]:
        outputs = []

        def every_candidate():
            for genome in genomes:
                block.set_genome(genome)
                # a fresh view of the same states for each candidate, as the search's chunks are
                outputs.append(block(*args, **{**kwargs, "encoder_hidden_states": states[:]}))

        macs = count_macs(every_candidate)  # under no_grad, with pyevo's ops counted
        return outputs, macs

    alone, alone_macs = score_all()
    with block.sharing_text_projections():
        shared, shared_macs = score_all()
        cross = [m for name, m in block.named_modules() if name.endswith("attn2")]
        assert cross and all(isinstance(m, SuperTransformerAttention) and m._text_keys_values is not None
                             for m in cross)
    for a, b in zip(alone, shared):
        assert max_relative_error(b, a) <= 1e-12
    # The first candidate (the teacher's genome: all heads) projects all heads, as it would alone; every
    # other one skips the K/V projections of its own heads in every layer it runs.
    batch, length, width = states.shape
    saved = 0
    for genome in genomes[1:]:
        for arch in space.arch(genome).transformers.values():
            if not arch.dropped:
                saved += arch.layers * 2 * batch * length * width * arch.cross_heads * arch.head_dim
    assert saved > 0 and alone_macs - shared_macs == saved
    # Freed on exit; inside, an in-place change of the projections (an optimizer step) is seen at once.
    assert all(m._text_keys_values is None for m in cross)
    block.set_genome(space.teacher_genome())
    with torch.no_grad(), block.sharing_text_projections():
        before = block(*args, **kwargs)
        cross[0].to_k.weight.mul_(1.5)
        after = block(*args, **kwargs)
        cross[0].to_k.weight.div_(1.5)
    with torch.no_grad():
        cross[0].to_k.weight.mul_(1.5)
        expected = block(*args, **kwargs)
        cross[0].to_k.weight.div_(1.5)
    assert max_relative_error(after, expected) <= 1e-12 and max_relative_error(after, before) > 1e-6


@pytest.mark.parametrize("name", BLOCKS)
def test_static_block_equals_the_super_block(float64_supernet_and_calls, name):
    teacher, supernet, calls = float64_supernet_and_calls
    super_block = supernet[name]
    args, kwargs, _ = calls[name]
    space = super_block.space
    rng = random.Random(name)
    genomes = [space.teacher_genome(), space.smallest_genome(), space.minimal_genome()]
    genomes += [space.random_genome(rng) for _ in range(5)]
    for genome in genomes:
        super_block.set_genome(genome)
        static = build_static_block(super_block, genome).eval()
        assert not any("Super" in type(m).__name__ for m in static.modules())
        with torch.no_grad():
            error = max_relative_error(static(*args, **kwargs), super_block(*args, **kwargs))
        assert error <= 1e-12, space.encode(genome)
        assert count_macs(static, *args, **kwargs) == count_macs(super_block, *args, **kwargs)
        # the teacher-shaped block of the same genome holds the same tensors (what a student loads into)
        shaped = copy.deepcopy(teacher.get_submodule(name))
        make_block_static(shaped, space, genome)
        assert {k: v.shape for k, v in shaped.state_dict().items()} == \
            {k: v.shape for k, v in static.state_dict().items()}
    super_block.set_genome(space.teacher_genome())


def test_static_transformer_follows_the_genome(float64_supernet_and_calls):
    _, supernet, _ = float64_supernet_and_calls
    block = supernet["down_blocks.1"]
    static = build_static_block(block, block.space.decode("r0:skip,r1:k1k5w0.5,t0:drop,t1:h4x8f0.5l1"))
    assert isinstance(static.attentions[0], DroppedTransformer2D)
    transformer = static.attentions[1]
    assert type(transformer) is Transformer2DModel and len(transformer.transformer_blocks) == 1
    layer = transformer.transformer_blocks[0]
    assert layer.attn1.heads == 4 and layer.attn1.to_q.weight.shape == (32, 64)
    assert layer.attn2.heads == 8 and layer.attn2.to_k.weight.shape == (64, 32)
    assert layer.ff.net[0].proj.weight.shape == (256, 64) and layer.ff.net[2].weight.shape == (64, 128)
    assert count_params(static) < count_params(build_static_block(block, block.space.teacher_genome()))


# ------------------------------------------------------------- at full size
def test_sd15_space_and_static_shapes_on_the_meta_device():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_CONFIG)
    assert count_params(unet) == 859_520_964
    spaces = {space.name: space for space in unet_space(unet)}
    assert list(spaces) == BLOCKS
    assert [t.head_dim for t in spaces["down_blocks.0"].transformers] == [40, 40]
    assert spaces["up_blocks.1"].transformers[0].head_dim == 160
    t = spaces["mid_block"].transformers[0]
    assert (t.self_heads, t.cross_heads, t.cross_attention_dim, t.ff_widths) == ((4, 8), (4, 8), 768,
                                                                                  (2560, 3840, 5120))
    for name, space in spaces.items():
        block = unet.get_submodule(name)
        for genome, same in ((space.teacher_genome(), True), (space.smallest_genome(), False)):
            shaped = copy.deepcopy(block)
            with torch.device("meta"):
                make_block_static(shaped, space, genome)
            assert (count_params(shaped) == count_params(block)) is same, name


# -------------------------------------------------------------- refusals
def cross_block(**kwargs):
    return CrossAttnDownBlock2D(in_channels=32, out_channels=32, temb_channels=64, num_layers=1, resnet_groups=8,
                                cross_attention_dim=16, num_attention_heads=2, add_downsample=False, **kwargs)


def with_ada_norm():
    block = cross_block()
    block.attentions[0] = Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=32,
                                             norm_num_groups=8, cross_attention_dim=16, norm_type="ada_norm",
                                             num_embeds_ada_norm=10)
    return block


def with_sliced_processor():
    block = cross_block()
    block.attentions[0].transformer_blocks[0].attn2.set_processor(SlicedAttnProcessor(1))
    return block


@pytest.mark.parametrize("make,match", [
    (lambda: cross_block(only_cross_attention=True), r"attentions\[0\] \(Transformer2DModel\) has only_cross"),
    (lambda: cross_block(dual_cross_attention=True), r"attentions\[0\] is a DualTransformer2DModel"),
    (with_ada_norm, r"attentions\[0\] \(Transformer2DModel\) has num_embeds_ada_norm"),
    (with_sliced_processor, r"transformer_blocks\[0\]\.attn2 has a processor other than"),
])
def test_unsupported_variants_are_refused_in_one_line(make, match):
    with pytest.raises(UnsupportedBlockError, match=r"^down_blocks\.0 \(CrossAttnDownBlock2D\) .*" + match) as error:
        block_space("down_blocks.0", make())
    assert "\n" not in str(error.value)


def test_transformer_blocks_are_scored_candidate_by_candidate_not_through_the_population_ops():
    """The population forward covers resnets and self-attention only: a transformer block must not
    go through it (every candidate would run at the block's current genome)."""
    from diffusers import UNet2DConditionModel

    from pyevo.search.population import PopulationEvaluator, block_evaluator
    from pyevo.supernet import build_supernet
    from unet_configs import SD15_SMALL_CONFIG

    torch.manual_seed(0)
    supernet = build_supernet(UNet2DConditionModel(**SD15_SMALL_CONFIG).eval())
    block = supernet["down_blocks.0"]
    assert block.space.transformers
    with pytest.raises(ValueError, match="no transformer"):
        PopulationEvaluator(block, None, lambda genome: 1.0)
    assert not isinstance(block_evaluator(block, None, lambda genome: 1.0, "cpu"), PopulationEvaluator)

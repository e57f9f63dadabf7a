"""The search space: genes, special genomes, counts, and the string forms."""
import itertools
import random

import pytest
from diffusers import UNet2DModel
from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, DownBlock2D, KDownBlock2D

from pyevo.space import (UnsupportedBlockError, block_space, decode_network, encode_network, teacher_network,
                         unet_space)
from unet_configs import DIGITS_CONFIG


@pytest.fixture(scope="module")
def spaces():
    return unet_space(UNet2DModel(**DIGITS_CONFIG))


def by_name(spaces):
    return {space.name: space for space in spaces}


def test_blocks_in_forward_order(spaces):
    assert [s.name for s in spaces] == ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block",
                                        "up_blocks.0", "up_blocks.1", "up_blocks.2"]
    assert [s.block_type for s in spaces] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "UNetMidBlock2D",
                                              "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]


def test_genes_and_choices(spaces):
    space = by_name(spaces)["down_blocks.1"]
    assert [g.name for g in space.genes] == ["r0.k1", "r0.k2", "r0.width", "r1.k1", "r1.k2", "r1.width",
                                             "a0.heads", "a1.heads"]
    assert space.num_choices == (3, 3, 4, 3, 3, 4, 3, 3)
    assert space.genes[2].labels == ("skip", "w0.5", "w0.75", "w1.0")
    assert space.genes[6].labels == ("drop", "h2", "h4")
    # 64 channels in 8 groups of 8: widths are whole groups
    assert space.resnets[0].widths == (32, 48, 64) and space.resnets[0].channels_per_group == 8


def test_special_genomes_have_stable_strings(spaces):
    space = by_name(spaces)["down_blocks.1"]
    assert space.encode(space.teacher_genome()) == "r0:k3k3w1.0,r1:k3k3w1.0,a0:h4,a1:h4"
    assert space.encode(space.largest_genome()) == "r0:k5k5w1.0,r1:k5k5w1.0,a0:h4,a1:h4"
    assert space.encode(space.smallest_genome()) == "r0:k1k1w0.5,r1:k1k1w0.5,a0:h2,a1:h2"
    assert space.encode(space.minimal_genome()) == "r0:skip,r1:skip,a0:drop,a1:drop"
    assert space.encode(space.narrow_genome()) == "r0:k3k3w0.5,r1:k3k3w0.5,a0:h4,a1:h4"
    assert space.teacher_genome() == (1, 1, 3, 1, 1, 3, 2, 2)
    mid = by_name(spaces)["mid_block"]
    assert mid.encode(mid.teacher_genome()) == "r0:k3k3w1.0,r1:k3k3w1.0,a0:h4"
    arch = space.arch(space.smallest_genome())
    assert arch.resnets[0].kernel1 == 1 and arch.resnets[0].hidden == 32 and not arch.resnets[0].skip
    assert arch.attentions[1].heads == 2 and arch.attentions[1].head_dim == 16


def test_num_genomes_counts_distinct_architectures(spaces):
    for space in spaces[:2]:
        canonical = {space.canonical(g) for g in itertools.product(*(range(n) for n in space.num_choices))}
        assert len(canonical) == space.num_genomes()
        assert len({space.encode(g) for g in canonical}) == space.num_genomes()
    assert by_name(spaces)["down_blocks.0"].num_genomes() == (1 + 3 * 9) ** 2


def test_random_genomes_round_trip(spaces):
    rng = random.Random(0)
    for space in spaces:
        for _ in range(200):
            genome = space.random_genome(rng)
            text = space.encode(genome)
            assert space.decode(text) == genome
            assert space.encode(space.decode(text)) == text


def test_skip_ignores_kernels(spaces):
    space = by_name(spaces)["down_blocks.0"]
    a, b = (0, 0, 0, 1, 1, 3), (2, 1, 0, 1, 1, 3)
    assert space.encode(a) == space.encode(b) == "r0:skip,r1:k3k3w1.0"
    assert space.canonical(a) == space.canonical(b) == (1, 1, 0, 1, 1, 3)


def test_network_round_trip(spaces):
    rng = random.Random(1)
    network = {space.name: space.random_genome(rng) for space in spaces}
    text = encode_network(network, spaces)
    assert text.startswith("down_blocks.0=") and text.count(";") == len(spaces) - 1
    assert decode_network(text, spaces) == network
    assert decode_network(encode_network(teacher_network(spaces), spaces), spaces) == teacher_network(spaces)


@pytest.mark.parametrize("text", [
    "r0:k2k3w1.0,r1:skip,a0:h4,a1:h4",  # kernel not offered
    "r0:k3k3w0.6,r1:skip,a0:h4,a1:h4",  # width not offered
    "r0:k3k3w1.0,r1:skip,a0:h3,a1:h4",  # head count not offered
    "r0:k3k3w1.0,r1:skip,a0:h4",  # a1 missing
    "r0:k3k3w1.0,r0:skip,r1:skip,a0:h4,a1:h4",  # r0 twice
    "r0:k3k3w1.0,r1:skip,r2:skip,a0:h4,a1:h4",  # no resnet 2
    "r0:k3k3w1.0,r1:skip,a0:h4,a1:everything",
    "nonsense",
])
def test_bad_block_strings_raise(spaces, text):
    with pytest.raises(ValueError):
        by_name(spaces)["down_blocks.1"].decode(text)


def test_bad_network_strings_raise(spaces):
    good = encode_network(teacher_network(spaces), spaces)
    for text in (good.replace("mid_block=", "middle="), good.split(";", 1)[1], good + ";" + good.split(";")[0],
                 good.replace("mid_block=", "mid_block")):
        with pytest.raises(ValueError):
            decode_network(text, spaces)
    with pytest.raises(ValueError):
        encode_network({"down_blocks.0": spaces[0].teacher_genome()}, spaces)


def test_bad_genomes_raise(spaces):
    space = by_name(spaces)["down_blocks.0"]
    for genome in [(1, 1, 3), (1, 1, 3, 1, 1, 4), (1, 1, 3, 1, 1, -1), (1, 1, 3, 1, 1, True), (1, 1, 3, 1, 1, 2.0)]:
        with pytest.raises(ValueError, match="down_blocks.0"):
            space.validate(genome)


def test_widths_merge_when_groups_are_few():
    two_groups = block_space("down_blocks.0", DownBlock2D(in_channels=8, out_channels=8, temb_channels=16,
                                                          num_layers=1, resnet_groups=2, add_downsample=False))
    # 2 groups of 4: ratio 0.75 rounds to 2 groups, the same width as 1.0
    assert two_groups.resnets[0].widths == (4, 8)
    assert two_groups.resnets[0].width_labels == ("0.5", "1.0")
    assert two_groups.num_choices == (3, 3, 3)
    one_group = block_space("down_blocks.0", DownBlock2D(in_channels=8, out_channels=8, temb_channels=16,
                                                         num_layers=1, resnet_groups=1, add_downsample=False))
    assert one_group.resnets[0].widths == (8,)
    assert one_group.encode(one_group.smallest_genome()) == "r0:k1k1w1.0"


def test_single_head_attention_keeps_or_drops():
    spaces = unet_space(UNet2DModel(**{**DIGITS_CONFIG, "attention_head_dim": None}))
    space = by_name(spaces)["down_blocks.1"]
    assert space.attentions[0].heads == (1,) and space.attentions[0].head_dim == 64
    assert space.genes[-1].labels == ("drop", "h1")
    assert space.encode(space.smallest_genome()).endswith("a0:h1,a1:h1")


def test_unsupported_blocks_name_their_type():
    # Transformer2DModel blocks are searched (tests/test_transformer_space.py); this variant is not
    cross = CrossAttnDownBlock2D(in_channels=32, out_channels=32, temb_channels=64, num_layers=1, resnet_groups=8,
                                 cross_attention_dim=16, num_attention_heads=2, add_downsample=False,
                                 only_cross_attention=True)
    with pytest.raises(UnsupportedBlockError, match="CrossAttnDownBlock2D.*Transformer2DModel.*only_cross_attention"):
        block_space("down_blocks.0", cross)
    k_block = KDownBlock2D(in_channels=32, out_channels=32, temb_channels=64, num_layers=1, add_downsample=False)
    with pytest.raises(UnsupportedBlockError, match="KDownBlock2D.*ResnetBlockCondNorm2D"):
        block_space("down_blocks.0", k_block)

"""The supernet: the teacher-shaped path is the teacher; smaller paths are consistent crops/prefixes."""
import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from pyevo.space import KERNEL_SIZES, AttentionArch, ResnetArch, block_space
from pyevo.supernet import (SuperAttention, SuperBlock, SuperResnetBlock2D, build_supernet, head_order,
                            hidden_channel_order, supernet_unet)
from unet_configs import DIGITS_CONFIG, DDPM_CIFAR10_CONFIG


def make_teacher(config: dict, seed: int = 0, dtype=torch.float32) -> UNet2DModel:
    """A random-init UNet whose GroupNorm affines are perturbed too (so group importance is not a tie)."""
    torch.manual_seed(seed)
    unet = UNet2DModel(**config).to(dtype).eval()
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    return unet.requires_grad_(False)


def capture_block_calls(unet: UNet2DModel, sample: torch.Tensor, timestep: torch.Tensor) -> dict:
    """Every searchable block's (args, kwargs, output) from one teacher forward, via hooks."""
    calls, handles = {}, []
    blocks = {f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)}
    blocks["mid_block"] = unet.mid_block
    blocks.update({f"up_blocks.{i}": b for i, b in enumerate(unet.up_blocks)})
    for name, block in blocks.items():
        def before(module, args, kwargs, name=name):
            calls[name] = [args, kwargs]

        def after(module, args, kwargs, output, name=name):
            calls[name].append(output)

        handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(block.register_forward_hook(after, with_kwargs=True))
    with torch.no_grad():
        unet(sample, timestep)
    for handle in handles:
        handle.remove()
    return calls


def flat(output) -> list:
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for item in output for t in flat(item)]


def assert_close_to_scale(actual, expected, rel):
    for a, e in zip(flat(actual), flat(expected), strict=True):
        assert a.shape == e.shape
        error = (a - e).abs().max().item()
        assert error <= rel * e.abs().max().item(), f"max error {error:.3g} vs scale {e.abs().max().item():.3g}"


@pytest.fixture(scope="module")
def digits():
    teacher = make_teacher(DIGITS_CONFIG)
    sample, timestep = torch.randn(2, 1, 16, 16), torch.tensor([7, 650])
    return teacher, build_supernet(teacher).eval(), capture_block_calls(teacher, sample, timestep)


def check_teacher_path(supernet, calls, rel):
    assert list(calls) == supernet.keys()
    with torch.no_grad():
        for name, block in supernet.items():
            block.set_genome(block.space.teacher_genome())
            args, kwargs, expected = calls[name]
            assert_close_to_scale(block(*args, **kwargs), expected, rel)


def test_teacher_path_reproduces_digits_blocks(digits):
    _, supernet, calls = digits
    check_teacher_path(supernet, calls, rel=1e-5)


def test_teacher_path_reproduces_ddpm_cifar10_blocks():
    teacher = make_teacher(DDPM_CIFAR10_CONFIG)
    calls = capture_block_calls(teacher, torch.randn(1, 3, 32, 32), torch.tensor([500]))
    check_teacher_path(build_supernet(teacher).eval(), calls, rel=1e-5)


def test_teacher_path_exact_in_float64():
    teacher = make_teacher(DIGITS_CONFIG, seed=1, dtype=torch.float64)
    calls = capture_block_calls(teacher, torch.randn(2, 1, 16, 16, dtype=torch.float64), torch.tensor([3, 900]))
    check_teacher_path(build_supernet(teacher).eval(), calls, rel=1e-12)


def test_teacher_path_with_scale_shift_time_embedding():
    teacher = make_teacher({**DIGITS_CONFIG, "resnet_time_scale_shift": "scale_shift"}, seed=2)
    calls = capture_block_calls(teacher, torch.randn(2, 1, 16, 16), torch.tensor([1, 999]))
    check_teacher_path(build_supernet(teacher).eval(), calls, rel=1e-5)


def test_whole_supernet_unet_is_the_teacher(digits):
    teacher, supernet, _ = digits
    supernet.set_genome({name: block.space.teacher_genome() for name, block in supernet.items()})
    sample, timestep = torch.randn(2, 1, 16, 16), torch.tensor([40, 400])
    with torch.no_grad():
        assert_close_to_scale(supernet_unet(teacher, supernet)(sample, timestep).sample,
                              teacher(sample, timestep).sample, rel=1e-5)


# ------------------------------------------------------------ resnet choices
def teacher_resnet_call(digits, block="up_blocks.1", index=1):
    """A teacher resnet, its super-resnet, and a real input to it."""
    teacher, supernet, calls = digits
    resnet = teacher.get_submodule(block).resnets[index]
    super_resnet = supernet[block].block.resnets[index]
    hidden = torch.randn(2, resnet.in_channels, 8, 8)
    temb = calls[block][1].get("temb", None)
    if temb is None:
        temb = calls[block][0][2]
    return resnet, super_resnet, hidden, temb


def reference_resnet(resnet, kernel1: int, kernel2: int, channels: torch.Tensor):
    """The teacher resnet with its hidden channels restricted to ``channels`` and its kernels cropped or
    zero-padded to the given sizes: what a supernet path must compute at step 0."""
    reference = copy.deepcopy(resnet)

    def resize(conv, out_index, in_index, k):
        weight = conv.weight[out_index][:, in_index]
        if k < 3:
            weight = weight[:, :, 1:2, 1:2]
        elif k > 3:
            weight = F.pad(weight, (1, 1, 1, 1))
        new = torch.nn.Conv2d(weight.shape[1], weight.shape[0], k, padding=k // 2)
        new.weight.data.copy_(weight)
        new.bias.data.copy_(conv.bias[out_index])
        return new

    every_in = torch.arange(resnet.conv1.in_channels)
    every_out = torch.arange(resnet.conv2.out_channels)
    reference.conv1 = resize(resnet.conv1, channels, every_in, kernel1)
    reference.conv2 = resize(resnet.conv2, every_out, channels, kernel2)
    reference.time_emb_proj = torch.nn.Linear(resnet.time_emb_proj.in_features, len(channels))
    reference.time_emb_proj.weight.data.copy_(resnet.time_emb_proj.weight[channels])
    reference.time_emb_proj.bias.data.copy_(resnet.time_emb_proj.bias[channels])
    per_group = resnet.norm2.num_channels // resnet.norm2.num_groups
    reference.norm2 = torch.nn.GroupNorm(len(channels) // per_group, len(channels), eps=resnet.norm2.eps)
    reference.norm2.weight.data.copy_(resnet.norm2.weight[channels])
    reference.norm2.bias.data.copy_(resnet.norm2.bias[channels])
    return reference


@pytest.mark.parametrize("kernel1,kernel2", [(1, 3), (3, 1), (5, 5), (1, 5)])
def test_kernel_choices_are_centre_crops_of_the_teacher(digits, kernel1, kernel2):
    resnet, super_resnet, hidden, temb = teacher_resnet_call(digits)
    full = super_resnet.config.hidden_channels
    super_resnet.set_arch(ResnetArch(kernel1, kernel2, full))
    reference = reference_resnet(resnet, kernel1, kernel2, torch.arange(full))
    with torch.no_grad():
        assert_close_to_scale(super_resnet(hidden, temb), reference(hidden, temb), rel=1e-5)
    super_resnet.set_arch(ResnetArch(3, 3, full))


def test_width_prefix_keeps_the_most_important_groups(digits):
    resnet, super_resnet, hidden, temb = teacher_resnet_call(digits)
    order = hidden_channel_order(resnet)
    for width in super_resnet.choices.widths:
        super_resnet.set_arch(ResnetArch(3, 1, width))
        reference = reference_resnet(resnet, 3, 1, order[:width])
        with torch.no_grad():
            assert_close_to_scale(super_resnet(hidden, temb), reference(hidden, temb), rel=1e-5)
    super_resnet.set_arch(ResnetArch(3, 3, super_resnet.config.hidden_channels))


def test_hidden_order_is_whole_groups_by_descending_importance(digits):
    resnet, super_resnet, _, _ = teacher_resnet_call(digits)
    order = hidden_channel_order(resnet)
    per_group = super_resnet.config.norm2_channels_per_group
    assert sorted(order.tolist()) == list(range(len(order)))
    groups = order.view(-1, per_group)
    assert torch.equal(groups - groups[:, :1], torch.arange(per_group).expand_as(groups))
    assert (groups[:, 0] % per_group == 0).all()
    # the re-ordered super-resnet's own group scores are non-increasing
    gain = torch.sqrt(super_resnet.norm2.weight ** 2 + super_resnet.norm2.bias ** 2)
    reads = super_resnet.conv2.weight.detach().transpose(0, 1).flatten(1).norm(dim=1)
    scores = (gain * reads).view(-1, per_group).norm(dim=1)
    assert (scores[:-1] >= scores[1:] - 1e-6).all()


def test_skip_is_the_shortcut_alone(digits):
    resnet, super_resnet, hidden, temb = teacher_resnet_call(digits)
    super_resnet.set_arch(ResnetArch(3, 3, 0))
    with torch.no_grad():
        expected = resnet.conv_shortcut(hidden) / resnet.output_scale_factor
        assert torch.allclose(super_resnet(hidden, temb), expected)
    super_resnet.set_arch(ResnetArch(3, 3, super_resnet.config.hidden_channels))


# --------------------------------------------------------- attention choices
def test_half_heads_are_the_most_important_heads(digits):
    teacher, supernet, _ = digits
    attention = teacher.up_blocks[1].attentions[0]
    super_attention = supernet["up_blocks.1"].block.attentions[0]
    heads, head_dim = attention.heads, attention.inner_dim // attention.heads
    kept = head_order(attention)[:heads // 2]
    rows = (kept[:, None] * head_dim + torch.arange(head_dim)).flatten()
    reference = Attention(attention.query_dim, heads=heads // 2, dim_head=head_dim, bias=True,
                          norm_num_groups=attention.group_norm.num_groups, eps=attention.group_norm.eps,
                          residual_connection=True, rescale_output_factor=attention.rescale_output_factor)
    with torch.no_grad():
        reference.group_norm.load_state_dict(attention.group_norm.state_dict())
        for name in ("to_q", "to_k", "to_v"):
            getattr(reference, name).weight.copy_(getattr(attention, name).weight[rows])
            getattr(reference, name).bias.copy_(getattr(attention, name).bias[rows])
        reference.to_out[0].weight.copy_(attention.to_out[0].weight[:, rows])
        reference.to_out[0].bias.copy_(attention.to_out[0].bias)
    hidden = torch.randn(2, attention.query_dim, 4, 4)
    super_attention.set_arch(AttentionArch(heads // 2, head_dim))
    with torch.no_grad():
        assert_close_to_scale(super_attention(hidden), reference(hidden), rel=1e-5)
    super_attention.set_arch(AttentionArch(0, head_dim))
    assert super_attention(hidden) is hidden
    super_attention.set_arch(AttentionArch(heads, head_dim))


# ---------------------------------------------------------------- training
def test_gradients_reach_exactly_the_used_shared_weights(digits):
    _, supernet, calls = digits
    block = copy.deepcopy(supernet["down_blocks.1"]).train()
    block.set_genome(block.space.smallest_genome())
    args, kwargs, expected = calls["down_blocks.1"]
    output = block(*args, **kwargs)
    sum(((o - e) ** 2).mean() for o, e in zip(flat(output), flat(expected))).backward()
    resnet = block.block.resnets[0]
    hidden = resnet.choices.widths[0]
    ring = (max(KERNEL_SIZES) - 1) // 2
    conv1_grad = resnet.conv1.weight.grad
    assert conv1_grad.shape == resnet.conv1.weight.shape
    assert conv1_grad[:hidden, :, ring, ring].abs().sum() > 0
    assert conv1_grad[hidden:].abs().sum() == 0
    centre_only = torch.zeros_like(conv1_grad, dtype=torch.bool)
    centre_only[:, :, ring, ring] = True
    assert conv1_grad[~centre_only].abs().sum() == 0
    assert resnet.norm2.weight.grad[:hidden].abs().sum() > 0 and resnet.norm2.weight.grad[hidden:].abs().sum() == 0
    assert resnet.conv2.weight.grad[:, :hidden].abs().sum() > 0
    assert resnet.conv2.weight.grad[:, hidden:].abs().sum() == 0
    assert resnet.norm1.weight.grad.abs().sum() > 0
    attention = block.block.attentions[0]
    inner = attention.arch.heads * attention.arch.head_dim
    assert attention.to_q.weight.grad[:inner].abs().sum() > 0 and attention.to_q.weight.grad[inner:].abs().sum() == 0
    assert attention.to_out[0].weight.grad[:, inner:].abs().sum() == 0
    assert all(p.requires_grad for p in block.parameters())


# --------------------------------------------------------------- interface
def test_supernet_interface(digits):
    teacher, supernet, calls = digits
    assert supernet.keys() == list(supernet) == list(calls)
    assert "mid_block" in supernet and "mid" not in supernet and len(supernet) == 7
    block = supernet["up_blocks.1"]
    assert isinstance(block, SuperBlock) and len(block.resnets) == 3  # read through to the diffusers block
    assert all(isinstance(r, SuperResnetBlock2D) for r in block.super_resnets())
    assert all(isinstance(a, SuperAttention) for a in block.super_attentions())
    with pytest.raises(KeyError, match="down_blocks.0"):
        supernet["down_blocks.9"]
    with pytest.raises(ValueError, match="up_blocks.1"):
        block.set_genome((1, 2, 3))
    assert any(key.startswith("blocks.up_blocks_1.block.resnets.0.conv1.") for key in supernet.state_dict())


def test_state_dict_round_trip(digits):
    teacher, supernet, calls = digits
    trained = copy.deepcopy(supernet)
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(0.01 * torch.randn_like(param))
    fresh = build_supernet(teacher).eval()
    fresh.load_state_dict(trained.state_dict())
    genome = {name: block.space.smallest_genome() for name, block in fresh.items()}
    fresh.set_genome(genome)
    trained.set_genome(genome)
    args, kwargs, _ = calls["mid_block"]
    with torch.no_grad():
        assert torch.equal(fresh["mid_block"](*args, **kwargs), trained["mid_block"](*args, **kwargs))


@pytest.mark.parametrize("flag", ["up", "down"])
def test_resnets_with_up_or_down_flags(flag):
    """diffusers blocks keep up/down resnets among their samplers, but a super-resnet handles them."""
    torch.manual_seed(3)
    holder = nn.Module()
    holder.resnets = nn.ModuleList([ResnetBlock2D(in_channels=16, out_channels=32, temb_channels=8, groups=4,
                                                  **{flag: True})]).eval()
    choices = block_space("down_blocks.0", holder).resnets[0]
    resnet = holder.resnets[0]
    super_resnet = SuperResnetBlock2D(resnet, choices).eval()
    hidden, temb = torch.randn(2, 16, 8, 8), torch.randn(2, 8)
    with torch.no_grad():
        assert_close_to_scale(super_resnet(hidden, temb), resnet(hidden, temb), rel=1e-5)
        super_resnet.set_arch(ResnetArch(3, 3, 0))
        expected = resnet.conv_shortcut(resnet.upsample(hidden) if flag == "up" else resnet.downsample(hidden))
        assert torch.allclose(super_resnet(hidden, temb), expected)

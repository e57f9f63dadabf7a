"""MACs and parameters against hand formulas and the published DDPM-CIFAR10 figures."""
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from torch import nn

from pyevo.cost import count_macs, count_params
from unet_configs import DDPM_CIFAR10_CONFIG


def test_conv_and_linear_match_hand_formulas():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, torch.randn(2, 3, 10, 10)) == 2 * 8 * 3 * 9 * 10 * 10
    strided = nn.Conv2d(4, 6, 5, stride=2, padding=2)
    assert count_macs(strided, torch.randn(1, 4, 8, 8)) == 6 * 4 * 25 * 4 * 4
    linear = nn.Linear(16, 32)
    assert count_macs(linear, torch.randn(4, 16)) == 4 * 16 * 32


def test_attention_is_counted_on_the_cpu():
    q = k = v = torch.randn(1, 2, 16, 8)
    assert count_macs(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * 2 * 16 * 16 * 8
    attention = Attention(32, heads=2, dim_head=16, bias=True)
    sequence, channels, inner = 16, 32, 32
    projections = 4 * sequence * channels * inner  # q, k, v, out
    scores_and_mix = 2 * sequence * sequence * inner
    assert count_macs(attention, torch.randn(1, sequence, channels)) == projections + scores_and_mix


def test_shared_parameters_count_once():
    linear = nn.Linear(4, 4)
    model = nn.Sequential(linear, linear)
    assert count_params(model) == 20


def test_ddpm_cifar10_teacher():
    torch.manual_seed(0)
    unet = UNet2DModel(**DDPM_CIFAR10_CONFIG).eval()
    assert count_params(unet) == 35_746_307
    macs = count_macs(unet, torch.randn(1, 3, 32, 32), torch.tensor([10]))
    assert abs(macs / 1e9 - 6.222) < 0.0005

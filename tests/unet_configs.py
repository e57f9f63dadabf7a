"""UNet2DModel configs the tests build teachers from (random init; shapes of the real ones)."""

# The built-in digits teacher's shape (pyevo/assets/digits_teacher).
DIGITS_CONFIG = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                     layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                     attention_head_dim=16)

# DDPM CIFAR-10 (google/ddpm-cifar10-32): 35.75 M parameters, 6.22 GMACs at batch 1.
DDPM_CIFAR10_CONFIG = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                           layers_per_block=2,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                           attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                           norm_eps=1e-6, norm_num_groups=32)

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

# Stable Diffusion v1.5's UNet2DConditionModel (runwayml/stable-diffusion-v1-5, unet/config.json): 859.52 M
# parameters. diffusers' `attention_head_dim` here is the number of heads (8 per transformer; head sizes
# 40, 80, 160, 160); text states are CLIP ViT-L/14's, 77 x 768. Tests build it only on the meta device.
SD15_CONFIG = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                   layers_per_block=2,
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                     "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                   attention_head_dim=8, cross_attention_dim=768, act_fn="silu", center_input_sample=False,
                   downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
                   norm_eps=1e-5, norm_num_groups=32)

# SD-v1.5's shape at reduced width (random init, CPU tests): the same block types, 2 layers per block, 8 heads,
# 4x4 / 8x8 heads' sizes, text states of width 32.
SD15_SMALL_CONFIG = {**SD15_CONFIG, "sample_size": 8, "block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 32,
                     "norm_num_groups": 8}

# Stable Diffusion XL base 1.0's UNet2DConditionModel (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json):
# 2.57 B parameters. No cross-attention in the first block; 1, 2 and 10 transformer layers in the others (10 in the
# mid block); linear projections; 5, 10, 20 heads of 64 (`attention_head_dim`, diffusers' name for the number of
# heads); text states of the two CLIP encoders side by side (768 + 1280); added conditions `text_embeds` [B, 1280]
# (OpenCLIP bigG's pooled output) and `time_ids` [B, 6], embedded in 256 sinusoids each: 1280 + 6 x 256 = 2816.
SDXL_CONFIG = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                   layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=(5, 10, 20),
                   transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, cross_attention_dim=2048,
                   addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=2816, act_fn="silu", center_input_sample=False,
                   downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5,
                   norm_num_groups=32, upcast_attention=None)

# SDXL's shape at tiny width (random init, CPU tests): the same block types and options, 1 resnet per block, 1, 2, 3
# transformer layers (the mid block's 3), 1, 2, 4 heads of 8; text states of width 32 (two encoders of 16),
# text_embeds of 16 and 6 time ids of 8 sinusoids each (16 + 6 x 8 = 64).
SDXL_TEXT_DIM, SDXL_POOLED_DIM, SDXL_TIME_DIM = 32, 16, 8
SDXL_SMALL_CONFIG = {**SDXL_CONFIG, "sample_size": 8, "block_out_channels": (8, 16, 32), "layers_per_block": 1,
                     "attention_head_dim": (1, 2, 4), "transformer_layers_per_block": (1, 2, 3),
                     "cross_attention_dim": SDXL_TEXT_DIM, "addition_time_embed_dim": SDXL_TIME_DIM,
                     "projection_class_embeddings_input_dim": SDXL_POOLED_DIM + 6 * SDXL_TIME_DIM,
                     "norm_num_groups": 4}

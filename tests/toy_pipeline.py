"""The whole pipeline at toy sizes, shared by tests/test_pipeline.py, test_distributed.py and
test_resume.py. A module of its own, not conftest.py: ``from conftest import`` is ambiguous where
tests/bench/ has a conftest.py too (the full suite imports that one under the name)."""
import torch

TOY = {
    "distill.steps": 2, "distill.batch_size": 8, "search.population": 4, "search.generations": 1,
    "search.heldout_size": 16, "retrain.steps": 2, "retrain.batch_size": 8, "evaluate.num_samples": 8,
    "evaluate.ddim_steps": 2, "latency.warmup": 1, "latency.repeats": 2, "latency.network_repeats": 2,
    "latency.threads": 1, "batch": 4,
}


def save_tiny_teacher(folder):
    """A small random digits-shaped teacher pipeline (1x16x16, attention at one level, several heads) saved
    to ``folder`` (unet/ + scheduler/, 100 training timesteps), its weights drawn from seed 0."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                           layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder

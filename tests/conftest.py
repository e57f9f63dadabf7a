"""Test-wide settings: never touch the network; keep torch's threads to the machine's two cores."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Property-based op tests (tests/test_ops_fuzz.py): "ci" draws a fixed set (reproducible CI runs),
# "fuzz" many fresh ones (HYPOTHESIS_PROFILE=fuzz), "device" fresh ones within the device script's
# time. No deadline: a first call compiles or warms up, and timing is not what these tests check.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # a GPU image without the carried wheels: test_ops_fuzz.py skips itself
    pass
else:
    for name, examples, fixed in (("ci", 30, True), ("fuzz", 300, False), ("device", 40, False)):
        settings.register_profile(name, max_examples=examples, derandomize=fixed, deadline=None, print_blob=True,
                                  suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def pyevo_cuda_kernels():
    """pyevo's own CUDA kernels for the test, also where the ops' default ("auto") would run
    ATen's: the kernel tests use it (pytestmark in test_ops.py, test_population_ops.py)."""
    from pyevo import ops

    with ops.cuda_kernels("pyevo"):
        yield


# The whole pipeline at toy sizes (tests/test_pipeline.py, test_distributed.py, test_resume.py).
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


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """The folder of :func:`save_tiny_teacher`'s teacher, one per test session."""
    return save_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"))

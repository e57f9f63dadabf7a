"""Test-wide settings: never touch the network; keep torch's threads to the machine's two cores."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def pyevo_cuda_kernels():
    """pyevo's own CUDA kernels for the test, also where the ops' default ("auto") would run
    ATen's: the kernel tests use it (pytestmark in test_ops.py, test_population_ops.py)."""
    from pyevo import ops

    with ops.cuda_kernels("pyevo"):
        yield

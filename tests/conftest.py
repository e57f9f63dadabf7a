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


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """The folder of :func:`toy_pipeline.save_tiny_teacher`'s teacher, one per test session."""
    from toy_pipeline import save_tiny_teacher

    return save_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"))

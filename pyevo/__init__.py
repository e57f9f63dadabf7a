"""pyevo: DiffNAS for diffusers UNets.

Importing pyevo loads the compiled extension, which registers the ``torch.ops.pyevo.*`` ops.
"""
import torch  # noqa: F401  (libc10 must be loaded before pyevo._C)

from pyevo import _C
from pyevo import ops  # noqa: F401  (fake and autograd registrations of torch.ops.pyevo.*)

__version__ = "0.1.0"


def build_info() -> dict:
    """How ``pyevo._C`` was built (CUDA or not, archs, torch version)."""
    return _C.build_info()


STUDENT_EXPORTS = ("StudentUNet2DModel", "StudentUNet2DConditionModel", "load_student")
RUNTIME_EXPORTS = ("optimize", "LeanUNet")


def __getattr__(name: str):
    # The diffusers model classes are imported on first use, so `import pyevo` stays light for code
    # that only wants the ops.
    if name in STUDENT_EXPORTS:
        from pyevo import student

        return getattr(student, name)
    if name in RUNTIME_EXPORTS:
        from pyevo import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'pyevo' has no attribute {name!r}")

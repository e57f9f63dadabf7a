"""pyevo: DiffNAS for diffusers UNets.

Importing pyevo loads the compiled extension, which registers the ``torch.ops.pyevo.*`` ops.
"""
import torch  # noqa: F401  (libc10 must be loaded before pyevo._C)

from pyevo import _C

__version__ = "0.1.0"


def build_info() -> dict:
    """How ``pyevo._C`` was built (CUDA or not, archs, torch version)."""
    return _C.build_info()

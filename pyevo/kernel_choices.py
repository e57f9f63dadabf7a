"""The measured kernel-choice table: which implementation, ATen's or pyevo's, a call of the two CUDA
ops that have both runs when it asks for ``impl="auto"`` (the default):

* ``shared_attention`` (forward): the SDPA composite or pyevo's fused attention kernel;
* ``fused_conv2d``: cuDNN then the epilogue as ATen ops, or pyevo's CUTLASS sm_90a kernel (where it
  applies: Hopper, bfloat16/float16, channel counts multiples of 8).

The table ships in the package (``pyevo/assets/kernel_choices.json``); ``python -m pyevo.bench
--kernel-choices FILE`` writes one from a GPU run (``experiments/device/README.md`` says how it is
committed). Each entry names the GPU (as ``torch.cuda.get_device_name`` does), its compute
capability, the op, the dtype and the call's shape, the chosen kernel, both measured times, the
date and the torch version. A call matches an entry exactly or not at all; a call without an entry
runs ATen's implementation, the safe default. :mod:`pyevo.ops` loads the shipped file once, at
import, and installs it in the C++ ops (``csrc/cuda_kernel_choice.h``), so
``torch.ops.pyevo.fused_conv2d(...)`` called directly follows it too. The key format is the C++
one (``pyevo._C._kernel_choice_shape_key``): the table's entries and the ops' calls cannot disagree.

File format::

    {"format": 1,
     "entries": [{"device": "NVIDIA H100 80GB HBM3", "capability": "9.0", "op": "shared_attention",
                  "dtype": "bfloat16",
                  "shape": {"B": 8, "S": 256, "C": 672, "heads": 21, "head_dim": 32,
                            "cross": false, "S_kv": 256, "C_kv": 672},
                  "kernel": "pyevo", "pyevo_ms": 0.165, "aten_ms": 0.263,
                  "aten_baseline": "sdpa-efficient", "date": "2026-11-26", "torch": "2.11.0+cu130",
                  "source": "experiments/device/results/2026-11-26-h100-bench.json"}]}

Shape fields: ``fused_conv2d``: N, C_in, C_out, H, W, kernel_size, has_temb, has_residual,
channels_last (the input is channels_last); ``shared_attention``: B, S, C, heads, head_dim, cross,
S_kv, C_kv (self-attention: S_kv = S, C_kv = C). ``aten_baseline`` and ``source`` are optional.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from pyevo import _C

__all__ = ["SHIPPED_TABLE", "KERNEL_REQUESTS", "KernelChoiceError", "KernelChoiceTable", "choose_kernel",
           "cuda_device_identity", "load_kernel_choices", "shape_key", "write_kernel_choices"]

SHIPPED_TABLE = Path(__file__).parent / "assets" / "kernel_choices.json"
FORMAT = 1
OPS = ("fused_conv2d", "shared_attention")
DTYPES = ("bfloat16", "float16", "float32", "float64")
KERNELS = ("aten", "pyevo")  # what an entry chooses
KERNEL_REQUESTS = ("auto", "aten", "pyevo")  # what a call asks for
REQUIRED_FIELDS = ("device", "capability", "op", "dtype", "shape", "kernel", "pyevo_ms", "aten_ms", "date",
                   "torch")
OPTIONAL_FIELDS = ("aten_baseline", "source")
# pyevo's kernel is chosen only where it was this much faster than ATen's best: near a tie, run-to-run
# noise would flip the choice between runs (and with it every latency figure timed under it), and ATen's
# is the safe default.
PYEVO_MARGIN = 1.05


class KernelChoiceError(ValueError):
    """A kernel-choice table or entry that cannot be used; the message is one line."""


def _quoted(values: Sequence[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def shape_key(op: str, dtype: str, shape: Mapping[str, Any]) -> str:
    """The key of ``op`` at ``dtype`` and ``shape`` (a mapping of the op's shape fields), as the C++
    ops build it for a call. Raises :class:`KernelChoiceError` on an unknown op, dtype or field, a
    missing field, or a value of the wrong type."""
    if op not in OPS:
        raise KernelChoiceError(f"unknown op '{op}' (expected {_quoted(OPS)})")
    if dtype not in DTYPES:
        raise KernelChoiceError(f"unknown dtype '{dtype}' (expected {_quoted(DTYPES)})")
    if not isinstance(shape, Mapping):
        raise KernelChoiceError(f"shape must be an object of {op}'s shape fields, got {shape!r}")
    fields = _C._kernel_choice_shape_key_fields(op)
    names = [name for name, _ in fields]
    unknown = sorted(set(shape) - set(names))
    missing = [name for name in names if name not in shape]
    if unknown or missing:
        raise KernelChoiceError(f"{op} shape: unknown fields {unknown}, missing fields {missing} "
                                f"(expected {', '.join(names)})")
    values = []
    for name, is_flag in fields:
        value = shape[name]
        if is_flag and not isinstance(value, bool):
            raise KernelChoiceError(f"{op} shape field {name} must be true or false, got {value!r}")
        if not is_flag and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise KernelChoiceError(f"{op} shape field {name} must be a non-negative integer, got {value!r}")
        values.append(int(value))
    return _C._kernel_choice_shape_key(op, dtype, values)


@dataclasses.dataclass(frozen=True)
class KernelChoiceTable:
    """A loaded table: its entries as in the file, and their choices by (device, capability, shape key).
    Which kernel a call runs is decided in C++ (``csrc/cuda_kernel_choice.cpp``), from these choices as
    :mod:`pyevo.ops` installs them."""

    entries: tuple[Mapping[str, Any], ...]
    choices: Mapping[tuple[str, str, str], str]

    def digest(self, device: str, capability: str) -> str:
        """A short name for this GPU's choices: "aten" when the table has none for it (every call runs
        ATen's), else 8 hex digits of a hash of its (shape key, kernel) pairs. Only what changes which
        code runs counts: new measured times with the same choices keep the digest."""
        mine = sorted(f"{key}={kernel}" for (d, c, key), kernel in self.choices.items()
                      if (d, c) == (device, capability))
        if not mine:
            return "aten"
        return hashlib.sha256("\n".join(mine).encode()).hexdigest()[:8]


def _entry_choice(entry: Any) -> tuple[tuple[str, str, str], str]:
    """((device, capability, shape key), kernel) of one entry, after checking its fields."""
    if not isinstance(entry, Mapping):
        raise KernelChoiceError(f"an entry must be an object, got {entry!r}")
    unknown = sorted(set(entry) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    missing = [name for name in REQUIRED_FIELDS if name not in entry]
    if unknown or missing:
        raise KernelChoiceError(f"unknown fields {unknown}, missing fields {missing}")
    for name in ("device", "capability", "date", "torch"):
        if not isinstance(entry[name], str) or not entry[name]:
            raise KernelChoiceError(f"{name} must be a non-empty string, got {entry[name]!r}")
    major, _, minor = entry["capability"].partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise KernelChoiceError(f"capability must be 'major.minor' (e.g. '9.0'), got '{entry['capability']}'")
    if entry["kernel"] not in KERNELS:
        raise KernelChoiceError(f"unknown kernel '{entry['kernel']}' (expected {_quoted(KERNELS)})")
    for name in ("pyevo_ms", "aten_ms"):
        value = entry[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise KernelChoiceError(f"{name} must be a positive number of milliseconds, got {value!r}")
    key = shape_key(entry["op"], entry["dtype"], entry["shape"])
    return (entry["device"], entry["capability"], key), entry["kernel"]


def _table_of(entries: Any) -> KernelChoiceTable:
    if not isinstance(entries, list):
        raise KernelChoiceError(f"entries must be a list, got {type(entries).__name__}")
    choices: dict[tuple[str, str, str], str] = {}
    for index, entry in enumerate(entries):
        try:
            where, kernel = _entry_choice(entry)
        except KernelChoiceError as error:
            raise KernelChoiceError(f"entry {index}: {error}") from None
        if where in choices:
            raise KernelChoiceError(f"entry {index}: a second entry for {where[0]} ({where[1]}) {where[2]}")
        choices[where] = kernel
    return KernelChoiceTable(tuple(types.MappingProxyType(dict(e)) for e in entries),
                             types.MappingProxyType(choices))


def load_kernel_choices(path: str | Path) -> KernelChoiceTable:
    """The table in the JSON file ``path``, every entry checked. Raises :class:`KernelChoiceError`, one
    line naming the file and the entry, for anything it cannot use: unreadable JSON, another format,
    an unknown op, dtype, kernel or field, a missing field, two entries for one GPU and shape."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise KernelChoiceError(f"{path}: not a readable JSON file ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or set(data) - {"format", "entries", "note"}:
        raise KernelChoiceError(f"{path}: not a kernel-choice table of format {FORMAT} "
                                "(an object with 'format', 'entries' and optionally 'note')")
    try:
        return _table_of(data.get("entries"))
    except KernelChoiceError as error:
        raise KernelChoiceError(f"{path}: {error}") from None


def write_kernel_choices(path: str | Path, entries: Sequence[Mapping[str, Any]], note: str | None = None) -> None:
    """Writes ``entries`` as a table file (checked first, as :func:`load_kernel_choices` checks it), atomically:
    the benchmark rewrites it after every case, and a killed run must not leave half a table to commit."""
    from pyevo.runfolder import atomic_write_text

    _table_of(list(entries))
    data: dict[str, Any] = {"format": FORMAT}
    if note:
        data["note"] = note
    data["entries"] = [dict(entry) for entry in entries]
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def choose_kernel(pyevo_ms: float, aten_ms: float) -> str:
    """The entry's kernel from the two measured times: pyevo's only where it is faster by
    :data:`PYEVO_MARGIN`."""
    return "pyevo" if aten_ms >= PYEVO_MARGIN * pyevo_ms else "aten"


def cuda_device_identity(device: torch.device | str) -> tuple[str, str]:
    """(name, compute capability) of a CUDA device as the table names them: ("NVIDIA H100 80GB HBM3",
    "9.0")."""
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"

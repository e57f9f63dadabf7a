"""The run folder: every stage writes its result atomically, and a resumed run skips finished ones.

A stage is finished when its result file exists; results are written to a temporary name, synced
to disk and renamed, so an interrupted run (or a machine that loses power) never leaves a
half-written result behind. Files get the user's usual mode (0666 less the umask), not the 0600 of
a temporary file. Digests let a resumed run tell a damaged artifact from a good one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch


def user_umask() -> int:
    """The process's umask (read without changing it): files and folders get 0666 / 0777 less it."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that readers see either nothing / the old content, or all of the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~user_umask())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(path)  # a full disk says which file it stopped
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (read in chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_digest(tensors: Iterable[torch.Tensor]) -> str:
    """A short sha256 of tensors' shapes, dtypes and bytes: what a stage key needs to notice a teacher
    changed in place, or other data under the same name."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()[:16]


def folder_write_error(folder: str | Path) -> str | None:
    """Why no file could be created in ``folder`` (created with its parents if missing), or None if one can.

    Asked of the nearest folder that exists: it must be a folder, and a probe file must be creatable and
    removable in it. The probe, not ``os.access``, decides: root passes every permission check, but not a
    read-only file system or /proc. Nothing is left behind."""
    ancestor = Path(folder).expanduser().absolute()
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a folder"
    try:
        fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".pyevo-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        return f"{ancestor} is not writable ({error.strerror or error})"
    return None

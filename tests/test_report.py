"""The report's plots are written as every other artifact is: whole or not at all."""
import errno
import os

import pytest
import torch

from pyevo import report


def test_a_plot_that_fails_to_write_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    path = tmp_path / "samples.png"
    report._plot_samples(path, {"teacher": torch.zeros(4, 1, 8, 8), "student": torch.ones(4, 1, 8, 8)}, 4)
    before = path.read_bytes()
    assert before[:8] == b"\x89PNG\r\n\x1a\n"

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        report._plot_samples(path, {"teacher": torch.ones(4, 1, 8, 8), "student": torch.zeros(4, 1, 8, 8)}, 4)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.png"]  # no temporary left behind

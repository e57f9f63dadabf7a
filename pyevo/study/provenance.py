"""Which code made a unit's result: a unit's key holds its settings, not the code, so each result names the
commit its code ran at and the page groups the results by the last commit that changed the code."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODE_PATHS = ("pyevo", "csrc", "kernels", "setup.py")  # what a result depends on (not experiments/, tests/)


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def code_version() -> str | None:
    """HEAD, with "+changes" where the code differs from it (None outside a git checkout)."""
    head = _git("rev-parse", "--short=12", "HEAD")
    if head is None:
        return None
    changed = _git("status", "--porcelain", "--", *CODE_PATHS)
    return head + ("+changes" if changed else "")


def code_commit(version: str) -> str:
    """The last commit at or before ``version`` that changed the code (commits of results alone in between
    change nothing a unit computes); ``version`` itself where git cannot tell."""
    commit, plus, changes = version.partition("+")
    last = _git("log", "-1", "--format=%h", "--abbrev=12", commit, "--", *CODE_PATHS)
    return (last or commit) + plus + changes

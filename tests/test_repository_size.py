"""The repository stays small enough to travel: tracked files under 40 MiB in all (a GPU
machine receives at most 64 MiB with the working tree, and the sample runs are most of it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 40 * 2**20


def test_tracked_files_stay_under_the_repository_budget():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    files = [ROOT / name for name in listed if name and (ROOT / name).is_file()]
    assert len(files) > 100  # a real listing of this checkout, not an empty one
    size = sum(f.stat().st_size for f in files)
    assert size < BUDGET, f"tracked files take {size / 2**20:.1f} MiB of {BUDGET / 2**20:.0f}"

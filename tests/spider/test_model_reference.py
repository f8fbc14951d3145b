"""How run.json names its base model, and how readers find it again (issue 23, item 3)."""

from __future__ import annotations

import os

from spider import rundir
from spider.rundir import RunDir, base_model_dir, model_reference

BUNDLED = rundir.REPO_ROOT / "sample_checkpoints" / "tiny-llava-base"


def test_a_model_inside_the_project_is_named_relative_to_it(tmp_path):
    ref = model_reference(BUNDLED, tmp_path / "run")
    assert ref["repo"] == "sample_checkpoints/tiny-llava-base"
    assert ref["path"] == str(BUNDLED.resolve())
    outside = tmp_path / "model"
    outside.mkdir()
    assert "repo" not in model_reference(outside, tmp_path / "run")


def test_the_project_relative_name_finds_the_model_when_the_others_are_stale(tmp_path):
    """A run kept where it was while the checkout moved: the absolute path and the path
    relative to the run point at nothing, the name relative to the project still works."""
    run = RunDir(tmp_path / "run")
    ref = {**model_reference(BUNDLED, run.path), "path": "/gone/tiny-llava-base",
           "relative": "../../gone/tiny-llava-base"}
    run.write_run({"model": ref})
    assert base_model_dir(run) == BUNDLED.resolve()


def test_old_runs_with_absolute_or_run_relative_paths_still_load(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_run({"model": {"path": str(BUNDLED)}})
    assert base_model_dir(run) == BUNDLED
    # as runs recorded it before the repository-relative reference: absolute and run-relative
    old = RunDir(tmp_path / "runs" / "old")
    old.write_run({"model": {"path": "/gone/tiny-llava-base",
                             "relative": os.path.relpath(BUNDLED, old.path)}})
    assert base_model_dir(old) == BUNDLED.resolve()

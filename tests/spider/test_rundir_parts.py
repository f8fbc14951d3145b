"""The statistics of a large run as Parquet parts while it writes (``spider.rundir``, "At
scale"): which runs write parts, the merges, the readers (whole frame, live tail), a resume
that drops steps, the compaction at the end, and the listing's fingerprint."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from spider import rundir
from spider.errors import UserError
from spider.rundir import RunDir, StatisticsRow

TENSORS = 5


def _step(step: int, tensors: int = TENSORS) -> list[StatisticsRow]:
    """One logged step's rows: values that tell the step and the tensor apart."""
    return [StatisticsRow(step, f"model.layers.{t}.mlp.up_proj.weight", 10 + t,
                          {"mask_density": step / 1000 + t / 10}, float(step + t), 100.0 + t)
            for t in range(tensors)]


@pytest.fixture
def parts(monkeypatch):
    """Every step of :func:`_step` goes to a part; 4 parts of fewer than 4 steps' rows
    (small) at the end are merged into one (which is then not small)."""
    monkeypatch.setattr(rundir, "LAYERS_PARTS_MIN_ROWS", TENSORS)
    monkeypatch.setattr(rundir, "LAYERS_PARTS_MERGE", 4)
    monkeypatch.setattr(rundir, "_PARTS_MERGE_TIERS", (4 * TENSORS,))


def _steps(run: RunDir) -> list[int]:
    frame = run.read_layers_frame()
    return frame["step"].tolist() if len(frame) else []


def _expected(steps) -> list[int]:
    return [s for s in steps for _ in range(TENSORS)]


def _names(run: RunDir) -> list[str]:
    return sorted(p.name for p in run.layers_parts_dir.iterdir())


def test_a_small_run_keeps_layers_jsonl(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in (1, 2, 3):
        run.append_layers(_step(step))
    assert run.layers_file.exists() and not run.layers_parts_dir.exists()
    assert _steps(run) == _expected([1, 2, 3])


def test_a_large_run_writes_one_part_per_step_and_merges_them(tmp_path, parts):
    run = RunDir(tmp_path / "run")
    for step in range(1, 4):
        run.append_layers(_step(step))
    assert not run.layers_file.exists()
    assert _names(run) == [rundir.part_name(s, s) for s in (1, 2, 3)]
    run.append_layers(_step(4))  # the fourth small part: merged into one covering 1..4
    assert _names(run) == [rundir.part_name(1, 4)]
    for step in range(5, 12):
        run.append_layers(_step(step))
    assert _steps(run) == _expected(range(1, 12))
    assert len(_names(run)) < 11
    assert [r["step"] for r in run.read_layers()] == _expected(range(1, 12))
    assert run.layers_files() == [run.layers_parts_dir / n for n in _names(run)]


def test_a_log_grown_large_goes_on_in_parts_and_keeps_its_rows(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.append_layers(_step(1))
    run.append_layers(_step(2))
    monkeypatch.setattr(rundir, "LAYERS_PARQUET_MIN_BYTES", run.layers_file.stat().st_size)
    run.append_layers(_step(3))
    run.append_layers(_step(4))
    assert run.layers_file.exists() and _names(run) == [rundir.part_name(3, 3),
                                                        rundir.part_name(4, 4)]
    frame = run.read_layers_frame()
    assert frame["step"].tolist() == _expected([1, 2, 3, 4])
    assert frame["update_norm"].tolist() == [float(s + t) for s in (1, 2, 3, 4)
                                             for t in range(TENSORS)]
    assert run.compact_layers()
    assert not run.layers_file.exists() and not run.layers_parts_dir.exists()
    pd.testing.assert_frame_equal(run.read_layers_frame(), frame)


def test_parts_left_covered_by_a_killed_merge_are_read_once_and_removed(tmp_path, parts):
    run = RunDir(tmp_path / "run")
    for step in range(1, 4):
        run.append_layers(_step(step))
    saved = tmp_path / "saved"
    shutil.copytree(run.layers_parts_dir, saved)
    run.append_layers(_step(4))  # merged: 1..4
    for part in saved.iterdir():  # as if killed after the merged part's rename
        shutil.copy(part, run.layers_parts_dir / part.name)
    (run.layers_parts_dir / ".tmp-part-half.parquet").write_bytes(b"PAR1 half")
    assert len(_names(run)) == 5
    assert _steps(run) == _expected(range(1, 5))
    run.append_layers(_step(5))  # the next append removes the parts the merge covered
    assert _names(run) == [".tmp-part-half.parquet", rundir.part_name(1, 4),
                           rundir.part_name(5, 5)]
    assert _steps(run) == _expected(range(1, 6))
    run.remove_temporaries()  # as --resume does: a write a kill cut short
    assert _names(run) == [rundir.part_name(1, 4), rundir.part_name(5, 5)]


def test_a_resume_drops_the_steps_after_it_from_every_part(tmp_path, parts):
    run = RunDir(tmp_path / "run")
    for step in range(1, 11):  # parts 1..4, 5..8, 9, 10
        run.append_layers(_step(step))
    assert _names(run) == [rundir.part_name(1, 4), rundir.part_name(5, 8),
                           rundir.part_name(9, 9), rundir.part_name(10, 10)]
    run.truncate_layers(6)  # 5..8 straddles: rewritten as 5..6
    assert _names(run) == [rundir.part_name(1, 4), rundir.part_name(5, 6)]
    assert _steps(run) == _expected(range(1, 7))
    for step in range(7, 10):  # the resumed run writes them again
        run.append_layers(_step(step))
    frame = run.read_layers_frame()
    assert frame["step"].tolist() == _expected(range(1, 10))
    assert not frame.duplicated(["step", "param"]).any()
    run.truncate_layers(0)
    assert _steps(run) == []


def test_a_resume_of_a_compacted_run_turns_it_back_into_a_part(tmp_path, parts):
    run = RunDir(tmp_path / "run")
    for step in range(1, 6):
        run.append_layers(_step(step))
    assert run.compact_layers()
    run.layers_parts_dir.mkdir()  # and a leftover of the parts the compaction replaced
    shutil.copy(run.layers_parquet_file, run.layers_parts_dir / rundir.part_name(1, 5))
    run.truncate_layers(3)
    assert not run.layers_parquet_file.exists()
    assert _names(run) == [rundir.part_name(1, 3)]
    run.append_layers(_step(4))
    assert _steps(run) == _expected(range(1, 5))


def test_the_live_tail_reads_parts_as_they_come_merges_once_and_a_resume_again(tmp_path,
                                                                              parts):
    run = RunDir(tmp_path / "run")
    tail = run.tail_layers()
    assert not tail.read() and tail.rows == []
    keys = []
    for step in range(1, 10):
        run.append_layers(_step(step))
        assert tail.read()
        key = (tail.inode, tail.offset)
        assert key not in keys  # the key the live view caches its heatmap by changes
        keys.append(key)
        assert [r["step"] for r in tail.rows] == _expected(range(1, step + 1))
    assert not tail.read()
    run.truncate_layers(5)
    assert tail.read() and [r["step"] for r in tail.rows] == _expected(range(1, 6))
    run.append_layers(_step(6))
    assert tail.read() and [r["step"] for r in tail.rows] == _expected(range(1, 7))
    assert run.compact_layers()
    assert tail.read() and [r["step"] for r in tail.rows] == _expected(range(1, 7))
    assert not tail.read()


def test_a_damaged_part_is_named(tmp_path, parts):
    run = RunDir(tmp_path / "run")
    for step in range(1, 4):
        run.append_layers(_step(step))
    part = run.layers_parts_dir / rundir.part_name(2, 2)
    part.write_bytes(part.read_bytes()[:40])
    with pytest.raises(UserError, match=rundir.part_name(2, 2)):
        run.read_layers_frame()
    assert not run.compact_layers()  # nothing is lost to a compaction of a damaged part
    assert part.exists()


def test_the_listing_fingerprint_sees_a_new_part(tmp_path, parts):
    run = RunDir(tmp_path / "run")
    run.write_run({"status": rundir.DONE})
    run.append_layers(_step(1))
    info = {**run.read_run(), rundir.LISTING_KEY: run.listing_record()}
    assert run.listing_current(info)
    run.append_layers(_step(2))
    assert not run.listing_current(info)


def test_clear_removes_the_parts(tmp_path, parts):
    run = RunDir(tmp_path / "run")
    run.write_run({"status": rundir.FAILED})
    run.append_layers(_step(1))
    run.clear()
    assert not run.layers_parts_dir.exists()


def test_a_reader_that_a_compaction_overtakes_still_gets_every_row(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.append_layers(_step(1))  # in the log
    monkeypatch.setattr(rundir, "LAYERS_PARTS_MIN_ROWS", TENSORS)
    run.append_layers(_step(2))  # in a part
    read_log = rundir._read_jsonl_table_or_frame
    calls = []

    def compact_first(path):  # the run ends between the reader's read of the parts and the log
        if not calls:
            calls.append(path)
            assert RunDir(path.parent).compact_layers()
        return read_log(path)

    monkeypatch.setattr(rundir, "_read_jsonl_table_or_frame", compact_first)
    assert _steps(run) == _expected([1, 2]) and calls

"""Statistics at scale: the bulk reader of layers.jsonl gives the row-by-row reader's frame,
a 7B-shaped run writes Parquet parts as it goes (the frame of the same rows written as
layers.jsonl, a fifth of the size or less), a finished run's large log or parts are
compacted to layers.parquet (same frame), and a kill or damage around the compaction never
loses or hides rows (the parts themselves: tests/spider/test_rundir_parts.py and
tests/faults/test_parquet_statistics.py)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from analysis import list_runs, load_run
from analysis.run import layers_frame
from bench.bench_layers_scale import make_run
from bench.bench_listing import link_tree
from spider import rundir
from spider.methods import build_method
from spider.recorder import RunRecorder
from spider.rundir import RunDir, RunInfoWriter
from tests.sample_logs import expand_to_jsonl

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "sample_checkpoints" / "runs"
FIXTURES = REPO / "tests" / "analysis" / "fixtures"
SOURCES = [SAMPLES / "spider", SAMPLES / "lora", FIXTURES / "run-v1-dare",
           FIXTURES / "run-v2-spider"]


def _log_copy(source: Path, path: Path) -> Path:
    """A hard-linked copy of ``source`` with its statistics as ``layers.jsonl`` (the bundled
    samples keep them compacted): the log is a new file, so changing it leaves ``source``
    alone."""
    link_tree(source, path)
    if (path / rundir.LAYERS_PARQUET_FILE).exists():
        expand_to_jsonl(path)
    return path


def _row_by_row(path: Path) -> pd.DataFrame:
    run = load_run(path)
    return layers_frame(run._dir.read_layers(), run.name, run.method)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_the_bulk_reader_and_the_parquet_file_give_the_row_by_row_frame(tmp_path, source):
    path = _log_copy(source, tmp_path / source.name)
    expected = _row_by_row(path)
    pd.testing.assert_frame_equal(load_run(path).layers, expected)
    rows = RunDir(path).read_layers()
    assert RunDir(path).compact_layers(min_bytes=0)
    assert not (path / rundir.LAYERS_FILE).exists()
    assert RunDir(path).layers_files() == [path / rundir.LAYERS_PARQUET_FILE]
    pd.testing.assert_frame_equal(load_run(path).layers, expected)
    # read_layers still gives every row (a field a row lacked now reads NaN)
    again = RunDir(path).read_layers()
    assert len(again) == len(rows)
    for old, new in zip(rows[:50], again[:50]):
        for key, value in new.items():
            if key in old:
                assert old[key] == value or (math.isnan(old[key]) and math.isnan(value))
            else:
                assert math.isnan(value)


def test_a_log_the_bulk_parser_cannot_take_is_read_row_by_row_and_kept(tmp_path):
    path = tmp_path / "run"
    _log_copy(SAMPLES / "spider", path)
    log = path / rundir.LAYERS_FILE
    data = log.read_bytes()
    log.unlink()
    expected_rows = len(data.splitlines())
    log.write_bytes(data + b'{"step": 151, "param": "x", "nu')  # a torn last line
    assert len(load_run(path).layers) == expected_rows
    assert not RunDir(path).compact_layers(min_bytes=0) and log.exists()
    log.write_bytes(data.replace(b'"update_norm": ', b'"update_norm": Infinity, "spare": ', 1))
    frame = load_run(path).layers
    assert len(frame) == expected_rows and math.isinf(frame["update_norm"].max())
    assert frame["spare"].notna().sum() == 1


def test_a_kill_between_the_parquet_write_and_the_log_removal_reads_once(tmp_path):
    path = tmp_path / "run"
    _log_copy(SAMPLES / "spider", path)
    expected = load_run(path).layers
    keep = (path / rundir.LAYERS_FILE).read_bytes()
    assert RunDir(path).compact_layers(min_bytes=0)
    (path / rundir.LAYERS_FILE).write_bytes(keep)  # as if killed before the unlink
    pd.testing.assert_frame_equal(load_run(path).layers, expected)
    listed = list_runs(path)
    assert listed["ok"].iloc[0], listed["problem"].iloc[0]


def test_a_damaged_parquet_file_is_named(tmp_path):
    path = tmp_path / "runs" / "run"
    _log_copy(SAMPLES / "spider", path)
    RunDir(path).compact_layers(min_bytes=0)
    info = RunDir(path).read_run()
    info[rundir.LISTING_KEY] = RunDir(path).listing_record()
    RunDir(path).write_run(info)
    assert list_runs(path.parent)["ok"].iloc[0]
    parquet = path / rundir.LAYERS_PARQUET_FILE
    data = parquet.read_bytes()
    parquet.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match=rundir.LAYERS_PARQUET_FILE):
        load_run(path).layers  # noqa: B018
    listed = list_runs(path.parent)
    assert not listed["ok"].iloc[0]
    assert rundir.LAYERS_PARQUET_FILE in listed["problem"].iloc[0]


def test_the_recorder_compacts_a_large_log_when_the_run_is_done(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "LAYERS_PARQUET_MIN_BYTES", 0)
    model = nn.Linear(4, 3)
    method = build_method("full", model)
    theta0 = {n: t.detach().clone() for n, t in method.effective_weights().items()}
    run = RunDir(tmp_path / "run")
    recorder = RunRecorder(run, method, theta0, RunInfoWriter(run, {}))
    recorder.start(config={"steps": 4}, model=None, seed=0, device="cpu",
                   parallel={"mode": "none", "world_size": 1}, trainable={}, steps=4)
    for step in (2, 4):
        with torch.no_grad():
            model.weight.add_(0.1)
        recorder.write_statistics(step, method.statistics())
    before = run.read_layers_frame()
    recorder.done(4)
    assert run.layers_files() == [run.layers_parquet_file]
    pd.testing.assert_frame_equal(run.read_layers_frame(), before)
    assert run.listing_current(run.read_run())


def test_a_7b_shaped_run_is_parquet_while_it_writes_and_a_fifth_or_less_of_the_log(tmp_path):
    path = make_run(tmp_path / "run", steps=40)
    legacy = make_run(tmp_path / "legacy", steps=40, jsonl=True)  # the same rows, as before
    run = RunDir(path)
    assert not run.layers_file.exists()  # a 7B run writes Parquet from its first step
    files = run.layers_files()
    assert files and all(f.parent == run.layers_parts_dir for f in files)
    assert len(files) < 40  # the per-step parts were merged as they piled up
    frame = load_run(path).layers
    assert len(frame) == 40 * 292 and frame["layer"].max() == 31
    # runs written before (layers.jsonl) load to the very same frame
    pd.testing.assert_frame_equal(frame.drop(columns="run"),
                                  load_run(legacy).layers.drop(columns="run"))
    jsonl = RunDir(legacy).layers_file.stat().st_size
    assert sum(f.stat().st_size for f in files) * 5 <= jsonl
    assert run.compact_layers()  # a run with parts always ends as one file
    assert run.layers_files() == [run.layers_parquet_file]
    assert not run.layers_parts_dir.exists()
    assert run.layers_parquet_file.stat().st_size * 5 <= jsonl
    pd.testing.assert_frame_equal(load_run(path).layers, frame)
    shutil.rmtree(path)


def test_the_live_tail_reads_a_compacted_log(tmp_path):
    path = tmp_path / "run"
    _log_copy(SAMPLES / "spider", path)
    run = RunDir(path)
    tail = run.tail_layers()
    assert tail.read() and len(tail.rows) == 645
    assert run.compact_layers(min_bytes=0)
    assert tail.read() and len(tail.rows) == 645 and not tail.read()
    fresh = run.tail_layers()
    assert fresh.read() and len(fresh.rows) == 645


def test_the_recorder_writes_parts_as_it_goes_and_one_file_when_done(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "LAYERS_PARTS_MIN_ROWS", 2)  # nn.Linear: 2 tensors a step
    model = nn.Linear(4, 3)
    method = build_method("full", model)
    theta0 = {n: t.detach().clone() for n, t in method.effective_weights().items()}
    run = RunDir(tmp_path / "run")
    recorder = RunRecorder(run, method, theta0, RunInfoWriter(run, {}))
    recorder.start(config={"steps": 4}, model=None, seed=0, device="cpu",
                   parallel={"mode": "none", "world_size": 1}, trainable={}, steps=4)
    for step in (2, 4):
        with torch.no_grad():
            model.weight.add_(0.1)
        recorder.write_statistics(step, method.statistics())
        # on disk as a part before write_statistics returns: readable while the run goes on
        assert run.layers_files()[-1].name == rundir.part_name(step, step)
        assert run.read_layers_frame()["step"].max() == step
    assert not run.layers_file.exists()
    before = run.read_layers_frame()
    moved = before.loc[before["param"] == "weight", "update_norm"].tolist()
    assert len(moved) == 2 and moved[1] > moved[0] > 0  # the weight moved further by step 4
    recorder.done(4)
    assert run.layers_files() == [run.layers_parquet_file]
    assert not run.layers_parts_dir.exists()
    pd.testing.assert_frame_equal(run.read_layers_frame(), before)
    assert run.listing_current(run.read_run())

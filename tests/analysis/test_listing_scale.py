"""Listing at scale: a finished run with a listing record lists from run.json alone, and
lists exactly as reading its logs would; a file changed since falls back to reading them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis import list_runs
from bench.bench_listing import finished_copy, link_tree
from spider import rundir

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "sample_checkpoints" / "runs"
NAMES = ("spider", "dare", "lwf")


def _listed(root: Path) -> pd.DataFrame:
    return list_runs(root).drop(columns="path").reset_index(drop=True)


def test_a_recorded_run_lists_as_reading_its_logs_does(tmp_path, monkeypatch):
    for name in NAMES:
        link_tree(SAMPLES / name, tmp_path / "old" / name)
        finished_copy(SAMPLES / name, tmp_path / "new" / name)
    slow = _listed(tmp_path / "old")
    assert slow["ok"].all()
    # the record is trusted: the logs are not read at all
    monkeypatch.setattr("analysis.run._check_run", lambda run: (_ for _ in ()).throw(
        AssertionError(f"{run} read")))
    fast = _listed(tmp_path / "new")
    pd.testing.assert_frame_equal(slow, fast)


def test_a_file_changed_after_the_record_is_read_and_named(tmp_path):
    run = finished_copy(SAMPLES / "spider", tmp_path / "runs" / "damaged")
    finished_copy(SAMPLES / "spider", tmp_path / "runs" / "healthy")
    assert rundir.RunDir(run).listing_current(rundir.RunDir(run).read_run())
    layers, = rundir.RunDir(run).layers_files()  # the log, or the compacted Parquet file
    data = layers.read_bytes()
    layers.unlink()  # a hard link: replace, not change the shared file
    layers.write_bytes(data[:100] + b"not json\n" + data[100:])
    listed = list_runs(tmp_path / "runs").set_index("name")
    assert listed.loc["healthy", "ok"]
    assert not listed.loc["damaged", "ok"]
    assert layers.name in listed.loc["damaged", "problem"]


def test_a_checkpoint_gone_or_added_is_noticed(tmp_path):
    run = finished_copy(SAMPLES / "spider", tmp_path / "run")
    folder = rundir.RunDir(run)
    steps = folder.checkpoint_steps()
    link_tree(folder.checkpoint_dir(steps[-1]), folder.checkpoint_dir(steps[-1] + 1))
    assert not folder.listing_current(folder.read_run())
    listed = list_runs(run)
    assert listed["checkpoints"].iloc[0] == len(steps) + 1


def test_a_missing_base_model_is_still_named(tmp_path):
    run = finished_copy(SAMPLES / "spider", tmp_path / "run")
    folder = rundir.RunDir(run)
    info = folder.read_run()
    info["model"] = {"path": str(tmp_path / "gone"), "relative": "../gone"}
    folder.write_run(info)
    listed = list_runs(run)
    assert not listed["ok"].iloc[0] and "base model" in listed["problem"].iloc[0]


def test_a_running_run_is_read_from_its_logs(tmp_path):
    run = finished_copy(SAMPLES / "spider", tmp_path / "run")
    folder = rundir.RunDir(run)
    info = folder.read_run()
    info["status"] = rundir.RUNNING
    info.pop("pid", None)
    folder.write_run(info)
    before = list_runs(run)
    data = (run / rundir.METRICS_FILE).read_bytes()
    (run / rundir.METRICS_FILE).unlink()
    (run / rundir.METRICS_FILE).write_bytes(data + b'{"event": "train", "step": 151, "lo')
    assert before["ok"].iloc[0] and list_runs(run)["ok"].iloc[0]  # a torn tail: still writing


def test_a_finished_training_run_carries_a_current_listing_record(tmp_path):
    import spider.train

    out = tmp_path / "run"
    spider.train.main(["--output-dir", str(out), "--model", str(REPO / "sample_checkpoints" /
                                                              "tiny-llava-base"),
                       "--method", "spider", "--steps", "2", "--log-every", "1",
                       "--save-every", "2", "--eval-every", "2", "--eval-limit", "1",
                       "--batch-size", "2", "--train-size", "4", "--train", "llm",
                       "--train-last-layers", "1", "--device", "cpu"])
    folder = rundir.RunDir(out)
    assert folder.listing_current(folder.read_run())
    fast = list_runs(out)
    info = folder.read_run()
    del info[rundir.LISTING_KEY]
    folder.write_run(info)
    pd.testing.assert_frame_equal(fast, list_runs(out))

"""The live Train view's reader (app/watch.py): the run directory's incremental reader, and
every heatmap value of the statistics vocabulary."""

from __future__ import annotations

import shutil
from pathlib import Path

from app import watch
from spider import statistics
from spider.rundir import RunDir
from tests.sample_logs import expand_to_jsonl

SAMPLE = Path(__file__).resolve().parents[2] / "sample_checkpoints" / "runs" / "spider"


def test_the_live_view_reads_new_lines_only_and_offers_every_heatmap_value(tmp_path):
    run_dir = tmp_path / "spider"
    shutil.copytree(SAMPLE, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    expand_to_jsonl(run_dir)  # a run of this size writes its statistics log as it goes
    w = watch.RunWatch(run_dir)
    snap = w.poll()
    assert snap.changed and not w.poll().changed
    assert set(statistics.LAYERS_FILE_COLUMNS) <= set(snap.layers.columns)
    assert list(watch.LIVE_HEATMAP_VALUES) == list(statistics.heatmap_values())
    cache: dict = {}
    for value in watch.LIVE_HEATMAP_VALUES:
        w.heatmap_value = value
        heat = watch.live_figures(w, snap, cache)[2]
        assert heat is not None
        assert heat.layout.title.text.startswith(watch.live_value_label(value))
    # a new logged step: read from the remembered offset, drawn with the new column
    last = max(r["step"] for r in RunDir(run_dir).read_layers())
    rows = [{**r, "step": last + 10, "mask_churn": 0.25}
            for r in RunDir(run_dir).read_layers() if r["step"] == last]
    RunDir(run_dir).append_layers(rows)
    snap = w.poll()
    assert snap.changed and snap.layers["step"].max() == last + 10
    assert (snap.layers.loc[snap.layers["step"] == last + 10, "mask_churn"] == 0.25).all()
    w.heatmap_value = "mask_churn"
    assert watch.live_figures(w, snap, cache)[2] is not None
    from analysis import explore

    matrix = explore.layer_step_matrix(snap.layers, "mask_churn")
    assert (matrix.loc[matrix["step"] == last + 10, "mask_churn"] == 0.25).all()


def test_the_train_page_offers_every_heatmap_value_of_the_vocabulary(app_page, runs_dir):
    shutil.copytree(SAMPLE, runs_dir / "spider", ignore=shutil.ignore_patterns("checkpoints"))
    at = app_page("train")
    assert not at.exception
    box = at.selectbox(key="train_heat_value")
    assert box.options == [watch.live_value_label(v) for v in watch.LIVE_HEATMAP_VALUES]
    box.set_value("mask_churn").run()
    assert not at.exception
    assert at.selectbox(key="train_heat_value").value == "mask_churn"

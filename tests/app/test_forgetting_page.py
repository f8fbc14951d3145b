"""The "Why it forgot" page through Streamlit's AppTest, and its figures and sentence."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from analysis.attribute import attribution_frame, best_reverts
from analysis.figures.attribution import DRIFT_METRICS, attribution_bars, drift_curves
from spider.rundir import AttributionRow, EvalEvent, RunDir
from tests.app.test_compare_page import SAMPLES, chart, charts

ROWS = [AttributionRow(150, "component", "(none)", {"upstream": 0.5, "downstream": 0.9}, 0, 100),
        AttributionRow(150, "component", "projector", {"upstream": 0.6, "downstream": 0.88},
                       2, 100),
        AttributionRow(150, "component", "llm", {"upstream": 0.8, "downstream": 0.3}, 40, 100),
        AttributionRow(150, "component", "(all)", {"upstream": 0.9, "downstream": 0.1}, 42, 100)]


def test_attribution_frame_differences_and_sentence():
    frame = attribution_frame(ROWS, "r", "full")
    by_group = frame.set_index("group")
    assert by_group.loc["(none)", "dU"] == 0
    assert by_group.loc["llm", "dU"] == pytest.approx(0.3)
    assert by_group.loc["llm", "dD"] == pytest.approx(-0.6)
    # projector: +0.1 U for 0.02 D beats llm's +0.3 U for 0.6 D
    sentence = best_reverts(frame, top=1)
    assert sentence.startswith("Reverting projector (U +0.100 for D -0.020)")
    assert "no single group" in best_reverts(frame[frame["group"].isin(["(none)", "(all)"])])


def test_attribution_bars_sort_by_upstream_recovered():
    figure = attribution_bars(attribution_frame(ROWS))
    recovered, lost = figure.data
    assert list(recovered.y) == ["projector", "llm"]  # bottom to top: most on top
    assert list(lost.x) == pytest.approx([0.02, 0.6])


def test_drift_curves_draw_one_panel_per_metric():
    metrics = pd.DataFrame([
        {"run": "a", "method": "full", "step": s, "split": "upstream", "metric": m, "value": v}
        for s in (0, 50) for m, v in zip(DRIFT_METRICS, (0.0, 0.1, 0.2, 0.3), strict=True)])
    spec = drift_curves(metrics).to_plotly_json()
    assert len(spec["data"]) == len(DRIFT_METRICS)
    assert "no drift" in drift_curves(metrics.iloc[0:0]).to_plotly_json()["layout"][
        "annotations"][0]["text"]


@pytest.fixture
def forgot_run(runs_dir):
    path = runs_dir / "forgot"
    shutil.copytree(SAMPLES / "full", path)
    run = RunDir(path)
    run.append_attribution(ROWS)
    run.append_events([EvalEvent(s, "upstream", m, v, 100) for s in (0, 150)
                       for m, v in zip(DRIFT_METRICS, (0.0, 0.1, 0.2, 0.3), strict=True)])
    return path


def test_the_page_shows_what_reverting_buys_back_and_the_drift(app_page, forgot_run):
    at = app_page("forgetting", query={"runs": ["forgot"]})
    assert not at.exception
    assert at.selectbox[0].value == str(forgot_run)
    assert any("Reverting projector" in m.value for m in at.markdown)
    bars = chart(at, "Reverting each group")
    assert set(bars["data"][0]["y"]) == {"projector", "llm"}
    assert chart(at, "Output drift")


def test_a_run_without_attribution_says_how_to_compute_it(app_page, runs_dir):
    # the full sample's logs without its attribution, and without drift metrics (as a run
    # made before they were added)
    path = runs_dir / "unattributed"
    shutil.copytree(SAMPLES / "full", path, ignore=shutil.ignore_patterns(
        "checkpoints", "attribution.jsonl"))
    metrics = path / "metrics.jsonl"
    metrics.write_text("".join(line for line in metrics.read_text().splitlines(True)
                               if not any(m in line for m in DRIFT_METRICS)))
    at = app_page("forgetting", query={"runs": ["unattributed"]})
    assert not at.exception
    assert at.selectbox[0].value == str(path)
    assert any("python -m analysis.attribute" in c.value for c in at.code)
    assert any("no drift metrics" in i.value for i in at.info)
    assert not [s for s in charts(at) if "Reverting" in str(s["layout"].get("title"))]

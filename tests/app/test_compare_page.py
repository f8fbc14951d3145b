"""The Compare page through Streamlit's AppTest: the runs table, the choice of runs (carried
in the URL), curves, trade-off plane, cells, and runs that are not results.

Expected numbers are computed here from ``analysis`` directly, so the tests follow the
sample runs when they are re-made.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import analysis
from analysis import explore

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints" / "runs"


def copy_run(name: str, dest: Path, **info_changes) -> Path:
    """A copy of a sample run's logs (no checkpoints) with run.json fields changed."""
    shutil.copytree(SAMPLES / name, dest, ignore=shutil.ignore_patterns("checkpoints"))
    info = json.loads((dest / "run.json").read_text())
    info["model"]["path"] = str(SAMPLES.parent / "tiny-llava-base")
    info["model"].pop("relative", None)
    info.update(info_changes)
    (dest / "run.json").write_text(json.dumps(info))
    return dest


def charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def chart(at, title_part: str) -> dict:
    for spec in charts(at):
        title = spec["layout"].get("title", {})
        if title_part in (title.get("text", "") if isinstance(title, dict) else str(title)):
            return spec
    raise AssertionError(f"no chart titled {title_part!r}")


def final_points(spec: dict) -> dict[str, tuple[float, float]]:
    """The trade-off plane's final point per run: name -> (U, D)."""
    return {t["name"]: (_decode(t["x"])[-1], _decode(t["y"])[-1]) for t in spec["data"]
            if t.get("meta") == {"final": True}}


def _decode(values):
    """Plotly figure JSON may hold arrays as base64 typed arrays."""
    if isinstance(values, dict) and "bdata" in values:
        import base64

        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"]).tolist()
    return list(values)


def test_table_lists_every_sample_with_its_scores(app_page):
    at = app_page("compare")
    assert not at.exception
    table = at.dataframe[0].value.set_index("run")
    listed = analysis.list_runs(SAMPLES).set_index("name")
    assert sorted(table.index) == sorted(f"samples/{n}" for n in listed.index)
    for name, row in listed.iterrows():
        mine = table.loc[f"samples/{name}"]
        assert mine["method"] == row["method"]
        assert mine["U"] == pytest.approx(row["U"], nan_ok=True) and mine["D"] == pytest.approx(row["D"], nan_ok=True)
        summary = analysis.load_run(SAMPLES / name).summary.iloc[0]
        assert mine["E"] == pytest.approx(summary["E"], nan_ok=True) and (
            mine["O"] == pytest.approx(summary["O"], nan_ok=True))
    # first visit: SPIDER and full fine-tuning (and a few more) are chosen; the URL says so
    chosen = [at.dataframe[0].value["run"].tolist()[i] for i in range(2)]
    assert chosen == ["samples/spider", "samples/full"]  # chosen runs are listed first
    assert at.query_params["runs"][:2] == ["samples/spider", "samples/full"]
    assert len(at.query_params["runs"]) == len(at.multiselect(key="compare_pick").value)


def test_choosing_runs_updates_the_url_and_the_trade_off_plane(app_page):
    at = app_page("compare", query={"runs": ["samples/spider"]})
    assert at.multiselect(key="compare_pick").value == [str(SAMPLES / "spider")]
    at.multiselect(key="compare_pick").select(str(SAMPLES / "full")).run()
    assert not at.exception
    assert at.query_params["runs"] == ["samples/spider", "samples/full"]
    points = final_points(chart(at, "Trade-off"))
    for name in ("spider", "full"):
        summary = analysis.load_run(SAMPLES / name).summary.iloc[0]
        assert points[f"samples/{name}"] == pytest.approx((summary["U"], summary["D"]))
    assert set(points) == {"samples/spider", "samples/full"}
    assert [b.label for b in at.get("download_button")] == [
        "Runs table (CSV)", "2×2 cells (CSV)", "HTML report (opens offline)"]


def test_curves_follow_smoothing_and_the_time_axis(app_page):
    at = app_page("compare", query={"runs": ["samples/spider"]})
    run = analysis.load_run(SAMPLES / "spider")
    raw = explore.score_curves_frame(run.metrics, run.train)
    down = raw[raw["split"] == "downstream"]
    trace = [t for t in chart(at, "Scores over training")["data"]
             if t["xaxis"] == "x2"][0]
    assert _decode(trace["y"]) == pytest.approx(down["score"].tolist())
    assert _decode(trace["x"]) == down["step"].tolist()

    at.slider[0].set_value(0.5).run()
    at.radio[0].set_value("training time").run()
    assert not at.exception
    trace = [t for t in chart(at, "Scores over training")["data"] if t["xaxis"] == "x2"][0]
    assert _decode(trace["y"]) == pytest.approx(explore.smooth(down["score"], 0.5).tolist())
    seconds = run.train.set_index("step")["seconds"].cumsum()
    expected_x = [0.0 if s == 0 else seconds[s] for s in down["step"]]
    assert _decode(trace["x"]) == pytest.approx(expected_x)


def test_cells_explain_every_column_and_fill_the_downstream_cell(app_page):
    at = app_page("compare", query={"runs": ["samples/spider"]})
    spec = chart(at, "2×2 generalisation")
    z = spec["data"][0]["z"]
    z = np.array(_decode(z) if isinstance(z, dict) else z, dtype=float).reshape(1, -1)
    summary = analysis.load_run(SAMPLES / "spider").summary.iloc[0]
    assert z[0, 0] == pytest.approx(summary["D"])  # idimg-idq is the downstream test
    assert np.isfinite(z).all()  # no unexplained empty column
    text = " ".join(m.value for m in at.markdown)
    for name, _ in explore.CELL_MEANINGS.values():
        assert name in text


def test_failed_and_stopped_runs_are_listed_but_not_charted(app_page, runs_dir):
    copy_run("spider", runs_dir / "broke", status="failed", error="loss is not finite")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    copy_run("full", runs_dir / "vanished", status="running", pid=dead.pid)
    at = app_page("compare", query={"runs": ["broke", "vanished", "samples/spider"]})
    assert not at.exception
    table = at.dataframe[0].value.set_index("run")
    assert table.loc["broke", "status"] == "failed"
    assert table.loc["vanished", "status"] == "stopped unexpectedly"
    assert set(final_points(chart(at, "Trade-off"))) == {"samples/spider"}
    assert any("broke: failed" in i.value and "vanished: stopped unexpectedly" in i.value
               for i in at.info)
    at.checkbox[0].check().run()
    assert set(final_points(chart(at, "Trade-off"))) == {"samples/spider", "broke", "vanished"}


def test_a_damaged_run_is_named_and_the_page_still_draws(app_page, runs_dir):
    bad = runs_dir / "garbled"
    bad.mkdir()
    (bad / "run.json").write_text("{ not json")
    at = app_page("compare", query={"runs": ["garbled", "samples/spider"]})
    assert not at.exception
    table = at.dataframe[0].value.set_index("run")
    assert table.loc["garbled", "status"] == "damaged"
    assert any("garbled" in w.value and "run.json" in w.value for w in at.warning)
    assert set(final_points(chart(at, "Trade-off"))) == {"samples/spider"}


def test_runs_scored_on_different_numbers_of_examples_are_flagged(app_page, runs_dir):
    few = copy_run("spider", runs_dir / "few")
    lines = (few / "metrics.jsonl").read_text().splitlines()
    lines = [line.replace('"n": 100', '"n": 20') if '"downstream"' in line else line
             for line in lines]
    (few / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    at = app_page("compare", query={"runs": ["few", "samples/spider"]})
    assert not at.exception
    table = at.dataframe[0].value.set_index("run")
    assert table.loc["few", "D measured on"] == "test split (20 of 300)"
    assert table.loc["samples/spider", "D measured on"] == "test split (100 of 300)"
    warning = " ".join(w.value for w in at.warning)
    assert "different numbers of examples" in warning and "few: 20" in warning
    assert "samples/spider: 100" in warning


def test_runs_table_columns_fit_their_contents(app_page):
    at = app_page("compare")
    spec = json.loads(at.dataframe[0].proto.columns)
    table = at.dataframe[0].value
    # scores and "D measured on" come right after the run, method and status
    assert list(table.columns[:8]) == ["chosen", "run", "method", "status", "U", "D", "H",
                                       "D measured on"]
    for column in ("method", "options", "D measured on"):
        width = spec[column]["width"]
        longest = max(len(str(v)) for v in [*table[column], column])
        assert isinstance(width, int) and width >= 7 * longest, (column, width, longest)


def test_post_hoc_methods_are_said_to_act_after_training(app_page):
    at = app_page("compare", query={"runs": ["samples/spider", "samples/wise_ft"]})
    note = " ".join(c.value for c in at.caption)
    assert "act after training" in note and "samples/wise_ft (wise_ft)" in note
    at = app_page("compare", query={"runs": ["samples/spider", "samples/full"]})
    assert not any("act after training" in c.value for c in at.caption)


def test_runs_without_drift_metrics_are_said_to_lack_them(app_page, runs_dir):
    from analysis.figures.attribution import DRIFT_METRICS

    for name, source in (("old-spider", "spider"), ("old-full", "full")):
        # runs made before the drift metrics existed: the same logs without them
        path = copy_run(source, runs_dir / name)
        lines = (path / "metrics.jsonl").read_text().splitlines()
        kept = [line for line in lines if not any(f'"{m}"' in line for m in DRIFT_METRICS)]
        assert len(kept) < len(lines)
        (path / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    at = app_page("compare", query={"runs": ["old-spider", "old-full"]})
    assert not at.exception
    notes = [i.value for i in at.info if "no drift metrics" in i.value]
    assert len(notes) == 1 and notes[0].count(".") == 1  # one sentence
    assert not any("kl_to_base" in str(s["layout"].get("title")) for s in charts(at))
    # the bundled samples carry them: no such note, and the drift curves are drawn
    at = app_page("compare", query={"runs": ["samples/spider", "samples/full"]})
    assert not any("no drift metrics" in i.value for i in at.info)
    assert chart(at, "Output drift")


def test_drift_curves_and_forgetting_against_kl_across_runs(app_page, runs_dir):
    from analysis.figures.attribution import DRIFT_METRICS
    from spider.rundir import EvalEvent, RunDir

    kl = {"drifted": 0.4, "kept": 0.05}
    for name, source in (("drifted", "full"), ("kept", "spider")):
        path = copy_run(source, runs_dir / name)
        last = int(analysis.load_run(path).summary.iloc[0]["step"])
        RunDir(path).append_events([
            EvalEvent(s, "upstream", m, v * (s > 0), 100) for s in (0, last)
            for m, v in zip(DRIFT_METRICS, (kl[name], 0.1, 0.2, 0.3), strict=True)])
    at = app_page("compare", query={"runs": ["drifted", "kept"]})
    assert not at.exception
    assert not any("no drift metrics" in i.value for i in at.info)
    curves = chart(at, "Output drift")
    assert {t["name"].split(" (")[0] for t in curves["data"]} == {"drifted", "kept"}
    scatter = chart(at, "against output drift kl_to_base")
    points = {t["name"]: (_decode(t["x"])[0], _decode(t["y"])[0]) for t in scatter["data"]}
    for name, source in (("drifted", "full"), ("kept", "spider")):
        summary = analysis.load_run(SAMPLES / source).summary.iloc[0]
        assert points[name] == pytest.approx((kl[name], summary["F"]))


def test_chosen_runs_are_ticked_and_first_and_the_score_columns_have_words(app_page):
    """Issue 25, item 6: with two runs chosen the table says which (ticked, listed first, or
    alone with the toggle) and the score letters carry their words in the headers."""
    at = app_page("compare", query={"runs": ["samples/full", "samples/spider"]})
    assert not at.exception
    table = at.dataframe[0].value
    assert table["run"].tolist()[:2] == ["samples/full", "samples/spider"]
    assert table["chosen"].tolist() == [True, True] + [False] * (len(table) - 2)
    assert len(table) == len(analysis.list_runs(SAMPLES))
    spec = json.loads(at.dataframe[0].proto.columns)
    headers = {letter: spec[letter]["label"] for letter in "UDHEFO"}
    assert headers == {"U": "U upstream", "D": "D downstream", "H": "H balance",
                       "E": "E task gained", "F": "F upstream change", "O": "O overall"}
    assert all(len(spec[letter]["help"]) > 10 for letter in "UDHEFO")
    assert any("2 chosen, ticked and listed first" in c.value for c in at.caption)

    at.toggle(key="compare_only_chosen").set_value(True).run()
    table = at.dataframe[0].value
    assert table["run"].tolist() == ["samples/full", "samples/spider"]
    assert table["chosen"].all()

"""analysis.report: a self-contained HTML report, its CSV tables and its command line."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from plotly.offline import get_plotlyjs

from analysis import load_run, report, stats
from analysis.report import CSV_TABLES, export_csv, main, report_tables, run_labels, write_report

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_checkpoints" / "runs"
BASE = ROOT / "sample_checkpoints" / "tiny-llava-base"
SAMPLE_RUNS = ("dare", "full", "hybrid", "l2", "lora", "magnitude_mask", "spider")
VOID = {"meta", "br", "img", "hr", "input", "link", "col", "area", "base", "wbr", "source"}


class Structure(HTMLParser):
    """Checks that tags nest and close, and collects scripts, headings and table cells."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.scripts: list[dict] = []
        self.script_sizes: list[int] = []
        self.text: dict[str, list[str]] = {"h1": [], "h2": [], "h3": [], "td": [], "th": []}
        self.doctype = False

    def handle_decl(self, decl):
        self.doctype = decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts.append(dict(attrs))
            self.script_sizes.append(0)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "script":
            self.script_sizes[-1] += len(data)
        elif self.stack and self.stack[-1] in self.text:
            self.text[self.stack[-1]].append(data)


def parse(document: str) -> Structure:
    parser = Structure()
    parser.feed(document)
    parser.close()
    return parser


@pytest.fixture(scope="module")
def sample_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    write_report([SAMPLES / name for name in SAMPLE_RUNS], path, title="Samples <&> report")
    return path


def test_the_report_is_valid_self_contained_html_naming_every_run(sample_report):
    document = sample_report.read_text(encoding="utf-8")
    size = sample_report.stat().st_size
    assert size < 10_000_000, f"report weighs {size / 1e6:.1f} MB"
    assert document.startswith("<!DOCTYPE html>")
    tree = parse(document)
    assert tree.doctype and tree.errors == [] and tree.stack == []
    # plotly.js is inlined exactly once and nothing is fetched from elsewhere
    assert all("src" not in attrs for attrs in tree.scripts)
    assert max(tree.script_sizes) > 3_000_000
    assert sum(s > 1_000_000 for s in tree.script_sizes) == 1
    assert get_plotlyjs()[:60] in document  # the library's own header: inlined whole
    around = document.replace(get_plotlyjs(), "")  # (the library mentions a map-data URL)
    assert "http://" not in around and "https://" not in around and "<link" not in around
    # the title is escaped, every run is named in the tables and the mask sections
    assert tree.text["h1"] == ["Samples <&> report"] and "Samples &lt;&amp;&gt; report" in document
    cells = set(tree.text["td"])
    headings = " ".join(tree.text["h3"])
    for name in SAMPLE_RUNS:
        assert name in cells
        assert f"{name} (" in headings
    assert {"Runs", "Summary", "Scores over training", "Trade-off plane"} <= set(tree.text["h2"])
    # plotly figures: 2x2 cells, score curves, trade-off plane, and heatmaps for the masking
    # methods: spider, magnitude, and dare: its step-150 statistics are logged after the
    # post-hoc drop, so its mask is not all ones there
    assert document.count('class="plotly-graph-div"') == 6
    assert "Every weight is free to move" in document  # full, l2, hybrid
    assert "No mask recorded" in document  # lora logs no mask statistics


def test_the_summary_table_shows_the_runs_scores(sample_report):
    cells = parse(sample_report.read_text(encoding="utf-8")).text["td"]
    info = json.loads((SAMPLES / "spider" / "run.json").read_text())
    tree = parse(sample_report.read_text(encoding="utf-8"))
    header = tree.text["th"]
    start = header.index("U") - 2  # the summary table: run, method, U, D, H, E, F, O, ...
    width = len(stats.SUMMARY_TABLE_COLUMNS)
    assert header[start:start + width] == list(stats.SUMMARY_TABLE_COLUMNS)
    rows = [cells[i:i + width] for i, cell in enumerate(cells) if cell == "spider"
            and i + width <= len(cells) and cells[i + 1] == "spider" and cells[i + 2][:1] == "0"]
    assert len(rows) == 1
    shown = dict(zip(stats.SUMMARY_TABLE_COLUMNS, rows[0]))
    for key in ("U", "D", "H", "E", "F", "O"):
        assert shown[key] == f"{info['summary'][key]:.3f}", key
    assert shown["step"] == "150"


def test_report_tables_and_csv_export_round_trip(tmp_path):
    runs = [load_run(SAMPLES / "spider"), load_run(SAMPLES / "lora")]
    tables = report_tables(runs)
    assert set(tables) == set(CSV_TABLES)
    assert tuple(tables["summary"].columns) == stats.SUMMARY_TABLE_COLUMNS
    assert tables["summary"]["run"].tolist() == ["spider", "lora"]
    files = export_csv(runs, tmp_path / "csv")
    assert [f.name for f in files] == [f"{name}.csv" for name in CSV_TABLES]
    for name in CSV_TABLES:
        back = pd.read_csv(tmp_path / "csv" / f"{name}.csv")
        frame = tables[name]
        assert list(back.columns) == list(frame.columns), name
        assert len(back) == len(frame), name
        for column in frame.columns:
            if pd.api.types.is_numeric_dtype(frame[column]):
                pd.testing.assert_series_equal(back[column].astype(float),
                                               frame[column].astype(float), check_names=False,
                                               rtol=1e-12, atol=0)
            else:
                assert back[column].astype(str).tolist() == frame[column].astype(str).tolist()
    assert set(pd.read_csv(tmp_path / "csv" / "layers.csv")["run"]) == {"spider", "lora"}


def test_the_command_line_writes_report_and_csv(tmp_path, capsys):
    out = tmp_path / "out" / "r.html"
    path = main([str(SAMPLES / "spider"), str(SAMPLES / "full"), "--output", str(out),
                 "--csv", str(tmp_path / "tables")])
    assert path == out and out.exists()
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "2 runs" in printed
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == sorted(
        f"{n}.csv" for n in CSV_TABLES)
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.html"]  # no temp files left


def test_a_folder_argument_stands_for_its_runs_and_damaged_ones_are_skipped(tmp_path, capsys):
    (tmp_path / "tiny-llava-base").symlink_to(BASE, target_is_directory=True)
    (tmp_path / "runs").mkdir()
    for name in ("spider", "l2"):
        shutil.copytree(SAMPLES / name, tmp_path / "runs" / name)
    (tmp_path / "runs" / "l2" / "run.json").write_text("{broken")
    out = tmp_path / "r.html"
    main([str(tmp_path / "runs"), "--output", str(out)])
    err = capsys.readouterr().err
    assert "skipped" in err and "l2/run.json" in err
    tree = parse(out.read_text(encoding="utf-8"))
    assert "spider" in tree.text["td"] and "l2" not in tree.text["td"]


@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "does not exist"),
    (["{sample}", "--base", "nope"], "--base 'nope' is not one of the runs"),
    (["{sample}", "--output", "{tmp}"], "is a folder"),
    (["{tmp}"], "neither a run directory nor a folder holding runs"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    argv = [a.format(missing=tmp_path / "missing", sample=SAMPLES / "spider", tmp=tmp_path)
            for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert "Traceback" not in err


def test_a_failed_render_leaves_the_old_report_untouched(tmp_path, monkeypatch):
    out = tmp_path / "report.html"
    out.write_text("old report")

    def broken(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(report.figures, "compare_score_curves", broken)
    with pytest.raises(RuntimeError):
        write_report([SAMPLES / "spider"], out)
    assert out.read_text() == "old report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_runs_with_the_same_name_get_distinct_labels(tmp_path):
    for parent in ("a", "b"):
        (tmp_path / parent).mkdir()
        shutil.copytree(SAMPLES / "spider", tmp_path / parent / "spider")
    runs = [load_run(tmp_path / "a" / "spider"), load_run(tmp_path / "b" / "spider"),
            load_run(SAMPLES / "full")]
    labels = run_labels(runs)
    assert labels == ["a/spider", "b/spider", "full"]
    summary = report_tables(runs)["summary"]
    assert summary["run"].tolist() == labels


def test_the_report_draws_as_the_app_does(tmp_path):
    """Issue 23: colour by run (full and hybrid were both blue), the app's heatmap (Viridis,
    not Blues, no overlapping subplot titles), D in the idimg-idq cell, tables that scroll
    within the page instead of running off it."""
    import plotly.io as pio

    from analysis import explore, figures

    names = ("spider", "full", "hybrid")
    document = report.render_report([SAMPLES / n for n in names], labels=list(names))
    specs = [json.loads(s) for s in re.findall(
        r'Plotly\.newPlot\(\s*"[^"]+",\s*(\[.*?\]),\s*\{', document, flags=re.S)]
    assert specs, "no figure data found"
    colors = figures.run_colors(names)
    curves = next(d for d in specs if any("(full)" in str(t.get("name")) for t in d))
    by_run = {t["name"].split(" (")[0]: t["line"]["color"] for t in curves if t.get("line")}
    assert by_run["full"] == colors["full"] != by_run["hybrid"] == colors["hybrid"]
    heat = [d for d in specs if d and d[0].get("type") == "heatmap"]
    scales = {json.dumps(d[0]["colorscale"]) for d in heat}
    viridis = json.dumps(pio.from_json(figures.layer_step_heatmap(
        explore.layer_step_matrix(load_run(SAMPLES / "spider").layers.assign(run="s"),
                                  "mask_density"), "mask_density", (0, 1)).to_json()
    ).data[0].colorscale)
    assert viridis in scales
    # the 2x2 table: idimg-idq is D, as on the Compare page
    tree = parse(document)
    header = tree.text["th"]
    assert "idimg-idq" in header
    summary = load_run(SAMPLES / "spider").summary.iloc[0]
    assert f"{summary['D']:.3f}" in tree.text["td"]
    assert "overflow-x: auto" in document and "overflow-wrap: anywhere" in document

"""The class handout (``python -m analysis.handout``, issue 25 item 8): the rule, the
forgetting curve and the layer heatmap of the sample runs, in one self-contained HTML file that
prints on one A4 or Letter page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import analysis
from analysis import handout
from tests.app.test_compare_page import _decode

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints" / "runs"


@pytest.fixture(scope="module")
def document() -> str:
    return handout.render_handout()  # the defaults: the SPIDER and full samples


def _figures(document: str) -> list[dict]:
    """The plotly figures embedded in the page: (data, layout) of each Plotly.newPlot call."""
    decoder, found = json.JSONDecoder(), []
    for match in re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*', document):
        data, end = decoder.raw_decode(document, match.end())
        layout, _ = decoder.raw_decode(document, re.compile(r",\s*").match(document, end).end())
        found.append({"data": data, "layout": layout})
    return found


def test_the_handout_holds_the_rule_the_curve_and_the_heatmap(document):
    assert "w = G / (I + G) if G &gt; I, else 0" in document
    assert "θ ← θ0 (1 − w) + θ w" in document
    figures = _figures(document)
    assert len(figures) == 2
    curve, heatmap = figures
    # the forgetting curve: each sample run's upstream score at every evaluated step
    spider = analysis.load_run(SAMPLES / "spider").metrics
    upstream = spider[(spider["split"] == "upstream") & (spider["metric"] == "score")]
    lines = {t["name"]: t for t in curve["data"] if t.get("xaxis", "x") == "x"}
    assert set(lines) == {"spider (spider)", "full (full)"}
    assert _decode(lines["spider (spider)"]["y"]) == pytest.approx(
        upstream.drop_duplicates("step", keep="last").sort_values("step")["value"].tolist())
    # the layer heatmap of the SPIDER run: share free to move, on its whole 0–100 % range
    assert heatmap["data"][0]["type"] == "heatmap"
    assert (heatmap["data"][0]["zmin"], heatmap["data"][0]["zmax"]) == (0.0, 1.0)
    assert "spider" in heatmap["layout"]["title"]["text"]
    # a sentence with each run's old-task score, first and last evaluation
    first, last = upstream.sort_values("step")["value"].iloc[[0, -1]]
    assert f"spider {first:.2f} → {last:.2f}" in document


def test_the_handout_is_self_contained(document):
    # plotly.js is inlined (its own code mentions web addresses in strings; it fetches none
    # for these figures): outside the scripts, no attribute may point at another host
    outside = re.sub(r"<script\b[^>]*>.*?</script>", "", document, flags=re.S | re.I)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", outside, flags=re.I)
    assert not re.search(r"<script\b[^>]*\bsrc\s*=", document, flags=re.I)
    assert not re.search(r"<link\b", document, flags=re.I)
    assert "@media print" in document
    assert document.count("<script") == 1 + len(_figures(document))


def test_the_handout_prints_on_one_a4_and_one_letter_page(document, tmp_path, chromium):
    path = tmp_path / "handout.html"
    path.write_text(document, encoding="utf-8")
    page = chromium.new_page()
    try:
        page.goto(path.as_uri())
        page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
        assert page.locator(".js-plotly-plot").count() == 2
        for size in ("A4", "Letter"):
            pdf = page.pdf(format=size, print_background=True)
            assert len(re.findall(rb"/Type\s*/Page[^s]", pdf)) == 1, size
    finally:
        page.close()


def test_the_command_writes_the_file_and_refuses_bad_input(tmp_path, capsys):
    out = handout.main([str(SAMPLES / "spider"), str(SAMPLES / "full"),
                        "-o", str(tmp_path / "h.html")])
    assert out.read_text(encoding="utf-8").count("Plotly.newPlot") == 2

    for argv in ([str(tmp_path / "no-such-run"), "-o", str(tmp_path / "x.html")],
                 ["-o", str(tmp_path)]):
        with pytest.raises(SystemExit) as stop:
            handout.main(argv)
        assert stop.value.code != 0
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: ")
    assert not (tmp_path / "x.html").exists()


def test_a_handout_without_a_spider_run_says_why_there_is_no_heatmap():
    document = handout.render_handout([SAMPLES / "full"])
    assert len(_figures(document)) == 1
    assert "No SPIDER run among these" in document

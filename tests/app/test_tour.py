"""The Learn page's tour (issue 25, item 8): five stops, each a link whose address opens the
exact view it promises; opened here as a fresh session would open it (AppTest with the link's
query parameters), and the view checked widget by widget."""

from __future__ import annotations

from urllib.parse import parse_qs

import pytest

import analysis
from app import tour
from tests.app.test_compare_page import SAMPLES

pytestmark = pytest.mark.usefixtures("one_thread")

PRESENT = [tour.SPIDER, tour.FULL]


def _stop(page: str) -> tour.Stop:
    (stop,) = [s for s in tour.STOPS if s.page == f"views/{page}.py"]
    return stop


def _open(app_page, page: str):
    at = app_page(page, query=_stop(page).query_params(PRESENT))
    assert not at.exception, at.exception
    return at


def _widget(elements, label: str):
    found = [e for e in elements if e.label.startswith(label)]
    assert found, f"no widget labelled {label!r}"
    return found[0]


def test_five_stops_each_with_two_sentences():
    assert [s.page.split("/")[-1] for s in tour.STOPS] == [
        "compare.py", "layers.py", "parameters.py", "forgetting.py", "train.py"]
    for stop in tour.STOPS:
        sentences = [s for s in stop.say.replace("?", ".").split(". ") if s.strip()]
        assert len(sentences) == 2, stop.say
    # a stop whose runs are missing links without ?runs= (and the page disables it)
    assert tour.common.QUERY_KEY not in _stop("layers").query_params([])
    assert _stop("train").query_params([]) == {"preset": "spider_vs_full"}


def test_learn_links_every_stop_with_its_address(app_page):
    at = app_page("learn")
    assert not at.exception
    links = [e.proto for e in at.get("page_link")]
    by_page = {link.page: link for link in links if link.label in {s.label for s in tour.STOPS}}
    assert len(by_page) == len(tour.STOPS)
    for stop in tour.STOPS:
        link = by_page[stop.page.removeprefix("views/").removesuffix(".py")]
        assert link.label == stop.label and not link.disabled
        expected = {k: v if isinstance(v, list) else [v]
                    for k, v in stop.query_params(PRESENT).items()}
        assert parse_qs(link.query_string) == expected
    # the two sentences of each stop are on the page next to its link
    text = " ".join(m.value for m in at.markdown)
    assert all(stop.say in text for stop in tour.STOPS)
    # and the handout is offered for download
    assert any(e.proto.label.startswith("Handout for the class") for e in at.get(
        "download_button"))


def test_stop_compare_shows_spider_and_full(app_page):
    at = _open(app_page, "compare")
    chosen = _widget(at.multiselect, "Runs to compare").value
    assert chosen == [str(SAMPLES / "spider"), str(SAMPLES / "full")]


def test_stop_layers_shows_spider_alone_at_its_last_step(app_page):
    at = _open(app_page, "layers")
    assert _widget(at.selectbox, "Run").value == str(SAMPLES / "spider")
    assert _widget(at.selectbox, "Side by side with").value == "(none)"
    assert _widget(at.selectbox, "Heatmap shows").value == "mask_density"
    last = int(analysis.load_run(SAMPLES / "spider").layers["step"].max())
    assert _widget(at.select_slider, "Step").value == last


def test_stop_parameters_shows_one_tensor_of_spider(app_page):
    at = _open(app_page, "parameters")
    assert _widget(at.selectbox, "Run").value == "samples/spider"
    assert _widget(at.selectbox, "Parameter").value == tour.TOUR_TENSOR


def test_stop_why_it_forgot_shows_full_fine_tuning(app_page):
    at = _open(app_page, "forgetting")
    assert _widget(at.selectbox, "Run").value == str(SAMPLES / "full")
    attributed = not analysis.load_run(SAMPLES / "full").attribution.empty
    if attributed:  # the sample runs are re-made with an attribution
        assert any(m.value.startswith("Reverting") for m in at.markdown)
    else:
        assert any("python -m analysis.attribute" in c.value for c in at.code)


def test_stop_train_fills_the_spider_vs_full_preset(app_page):
    at = _open(app_page, "train")
    assert at.multiselect(key="train_methods").value == ["spider", "full"]

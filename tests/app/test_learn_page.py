"""The Learn page (AppTest): its numbers are SPIDER's own, and its widgets change them."""

import pytest
import torch

from analysis.worked_example import ExampleSettings, run_worked_example
from spider.methods.spider import SpiderOptions, keep_weight

pytestmark = pytest.mark.usefixtures("one_thread")


def _metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _expected(settings: ExampleSettings) -> dict[str, str]:
    """What the page must show, from spider's keep_weight on the example's theta0 and S."""
    example = run_worked_example(settings)
    w, _ = keep_weight(torch.from_numpy(example.theta0),
                       torch.from_numpy(example.last.grad_sum),
                       SpiderOptions(**settings.spider_options))
    n = w.numel()
    free = int((w > 0).sum())
    return {
        "Free to move (w > 0)": f"{free} of {n}",
        "Pinned to θ0 (w = 0)": f"{n - free} of {n}",
        "Mean keep-weight w": f"{float(w.mean()):.3f}",
    }


def _check(at, settings: ExampleSettings) -> None:
    assert not at.exception
    shown = _metrics(at)
    for label, value in _expected(settings).items():
        assert shown[label] == value, label


def test_learn_page_explains_and_shows_spiders_mask(app_page):
    at = app_page("learn")
    assert not at.exception
    assert at.title[0].value == "Learn: what SPIDER does"
    assert any("forgetting" in m.value for m in at.markdown)
    formulas = " ".join(e.value for e in at.latex)
    assert r"\dfrac{G}{I+G}" in formulas and r"\theta_0\,(1-w) + \theta\,w" in formulas
    _check(at, ExampleSettings())
    # the near-tie table lists the entries with the smallest |G - I| first
    at = app_page("learn", query={"learn_careful": "true"})  # the detail opened
    table = at.dataframe[0].value
    assert list(table.columns)[:3] == ["row", "col", "G − I"]
    assert table["G − I"].abs().is_monotonic_increasing


def test_sliders_toggles_and_reseed_change_the_mask(app_page):
    at = app_page("learn")
    before = _metrics(at)
    at.slider(key="learn_steps").set_value(25).run()
    _check(at, ExampleSettings(steps=25))
    at.select_slider(key="learn_lr").set_value(0.05).run()
    at.slider(key="learn_noise").set_value(2.5).run()
    settings = ExampleSettings(steps=25, lr=0.05, noise=2.5)
    _check(at, settings)
    assert _metrics(at) != before

    at.toggle(key="learn_binary").set_value(True).run()
    binary = ExampleSettings(steps=25, lr=0.05, noise=2.5, mask="binary")
    _check(at, binary)
    # with a binary mask the mean keep-weight is the share of free weights
    shown = _metrics(at)
    free, n = (int(x) for x in shown["Free to move (w > 0)"].split(" of "))
    assert shown["Mean keep-weight w"] == f"{free / n:.3f}"

    at.toggle(key="learn_binary").set_value(False)
    at.toggle(key="learn_no_norm").set_value(True).run()
    _check(at, ExampleSettings(steps=25, lr=0.05, noise=2.5, normalize=False))
    at.radio(key="learn_accumulate").set_value("fisher").run()
    _check(at, ExampleSettings(steps=25, lr=0.05, noise=2.5, normalize=False,
                               accumulate="fisher"))

    at.button(key="learn_reseed").click().run()
    _check(at, ExampleSettings(steps=25, lr=0.05, noise=2.5, normalize=False,
                               accumulate="fisher", seed=1))
    assert any(c.value == "seed 1" for c in at.caption)


def test_start_here_links_select_the_sample_runs(app_page):
    at = app_page("learn")
    links = {link.proto.label.split(": ")[0]: link.proto for link in at.page_link}
    assert {"1 · Compare", "2 · Layers", "3 · Parameters"} <= set(links)
    assert "runs=samples%2Fspider" in links["1 · Compare"].query_string
    assert "runs=samples%2Ffull" in links["1 · Compare"].query_string
    assert "param=model.language_model.layers.3.mlp.down_proj.weight" in \
        links["3 · Parameters"].query_string
    assert not any(link.disabled for link in links.values())


def test_a_link_with_runs_selects_them_for_the_next_page(app_page):
    at = app_page("learn")
    # a "start here" link: same session, new URL query
    at.query_params["runs"] = ["samples/spider"]
    at.query_params["param"] = "model.multi_modal_projector.linear_1.weight"
    at.switch_page("views/parameters.py").run()
    assert not at.exception
    assert at.selectbox[0].value == "samples/spider"
    assert at.selectbox[1].value == "model.multi_modal_projector.linear_1.weight"


def test_no_normalisation_under_the_binary_mask_says_why_nothing_changes(app_page):
    at = app_page("learn")
    assert not any("No effect with the binary mask" in c.value for c in at.caption)
    before = [m.value for m in at.metric]
    at.toggle(key="learn_binary").set_value(True).run()
    binary = [m.value for m in at.metric]
    at.toggle(key="learn_no_norm").set_value(True).run()
    assert not at.exception
    assert [m.value for m in at.metric] == binary  # indeed no effect...
    assert any("No effect with the binary mask" in c.value for c in at.caption)  # ...and why
    assert binary != before
    # the normalisation's divisor is named in words, not as the ambiguous mean(w>0)
    formulas = " ".join(e.value for e in at.get("latex"))
    assert "mean(w>0)" not in formulas.replace(" ", "")
    assert r"\bar w_{+}=\frac{\sum_{i:\,w_i>0} w_i}{\#\{i : w_i>0\}}" in formulas
    assert any("not the share of weights that are free" in c.value for c in at.caption)


def test_the_example_is_in_the_address(app_page):
    """Issue 25 item 4: a link or a reload with the example's settings shows that example,
    the seed included; re-seeding writes the new seed to the address."""
    query = {"learn_steps": "25", "learn_lr": "0.05", "learn_noise": "2.5",
             "learn_accumulate": "|gradient| (ablation)", "learn_seed": "2"}
    at = app_page("learn", query=query)
    settings = ExampleSettings(steps=25, lr=0.05, noise=2.5, accumulate="abs", seed=2)
    _check(at, settings)
    assert any(c.value == "seed 2" for c in at.caption)
    at.button(key="learn_reseed").click().run()
    _check(at, ExampleSettings(steps=25, lr=0.05, noise=2.5, accumulate="abs", seed=3))
    assert at.query_params["learn_seed"] == "3"
    # a seed that is not a number is ignored, not a traceback
    at = app_page("learn", query={"learn_seed": "x1"})
    _check(at, ExampleSettings())


def test_the_float_rounding_detail_is_collapsed_for_the_careful_reader(app_page):
    at = app_page("learn")
    (careful,) = [e for e in at.expander if e.label.startswith("For the careful reader")]
    assert not careful.proto.expanded
    # closed, its chart and table are not drawn at all (the first page stays light) ...
    assert not careful.dataframe and len(at.get("plotly_chart")) == 3
    # ... and opened (its state is in the address), the ulps table lives inside it, not on
    # the page's main flow, beside the tie chart
    at = app_page("learn", query={"learn_careful": "true"})
    (careful,) = [e for e in at.expander if e.label.startswith("For the careful reader")]
    assert len(careful.dataframe) == 1 and "ulps" in careful.dataframe[0].value.columns
    assert len(at.get("plotly_chart")) == 4


def test_why_it_forgot_is_explained_with_links_to_its_pages(app_page):
    at = app_page("learn")
    assert not at.exception
    links = {link.proto.label: link.proto for link in at.page_link}
    assert links["Why it forgot"].page.endswith("forgetting")
    assert links["Output drift on Compare"].page.endswith("compare")
    text = " ".join(m.value for m in at.markdown)
    assert "Reading an attribution" in text and "U recovered" in text
    for measure in ("kl_to_base", "format errors", "content errors", "answer-type drift"):
        assert measure in text

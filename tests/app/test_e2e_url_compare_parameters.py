"""In Chromium: every view setting of Compare and Parameters sits in the page address
(issue 25, item 4), so a reload or a shared link gives the same view.

Each test sets values other than the defaults through the page's own widgets, then opens
the address the page shows in a fresh browser context (no session, no cookies: what a person
who was sent the link gets) and reads the same widgets back.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from tests.app.conftest import wait_idle

EXCEPTION = "[data-testid='stException']"
DOWN = "model.language_model.layers.3.mlp.down_proj.weight"


@contextmanager
def _fresh_page(chromium):
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    try:
        yield context.new_page()
    finally:
        context.close()


def _widget(page, testid: str, label: str):
    return page.locator(f"[data-testid='{testid}']", has_text=label).first


def _radio_value(page, label: str) -> str:
    return _widget(page, "stRadio", label).evaluate(
        "b => { const r = b.querySelector('input[type=radio]:checked');"
        " return r ? r.closest('label').innerText.trim() : ''; }")


def _pick_radio(page, label: str, option: str) -> None:
    _widget(page, "stRadio", label).get_by_text(option, exact=True).click()
    wait_idle(page)


def _checked(page, label: str) -> bool:
    return _widget(page, "stCheckbox", label).locator("input[type=checkbox]").is_checked()


def _click_check(page, label: str) -> None:
    _widget(page, "stCheckbox", label).get_by_text(label, exact=True).click()
    wait_idle(page)


def _slider_value(page, label: str) -> str:
    return _widget(page, "stSlider", label).get_by_test_id("stSliderThumbValue").inner_text()


def _press_slider(page, label: str, key: str, times: int = 1) -> None:
    handle = _widget(page, "stSlider", label).get_by_role("slider")
    handle.focus()
    for _ in range(times):
        handle.press(key)
    page.wait_for_timeout(400)  # the slider sends its value when the keys stop
    wait_idle(page)


def _type(page, label: str, text: str) -> None:
    field = page.get_by_label(label, exact=True)
    field.fill(text)
    field.press("Enter")
    wait_idle(page)


def _compare_view(page) -> dict:
    return {
        "x axis": _radio_value(page, "x axis"),
        "smoothing": _slider_value(page, "Smoothing"),
        "log": _checked(page, "Log scale (y)"),
        "bad": _checked(page, "Also chart failed"),
        "only chosen": _checked(page, "Only the chosen runs"),
        "name": page.get_by_label("Name contains", exact=True).input_value(),
        "cells": _radio_value(page, "Show"),
    }


def test_compare_view_survives_a_reload_in_a_fresh_browser(streamlit_server, browser_page,
                                                           chromium):
    page = browser_page
    page.goto(f"{streamlit_server.url}/compare?runs=samples/spider&runs=samples/full")
    wait_idle(page)
    default = _compare_view(page)
    assert default == {"x axis": "step", "smoothing": "0.00", "log": False, "bad": False,
                       "only chosen": False, "name": "", "cells": "score"}, default
    _pick_radio(page, "x axis", "training time")
    _press_slider(page, "Smoothing", "ArrowRight", 3)
    _click_check(page, "Log scale (y)")
    _click_check(page, "Also chart failed, cancelled, damaged and stopped runs")
    _click_check(page, "Only the chosen runs")
    _type(page, "Name contains", "spider")
    _pick_radio(page, "Show", "change since the base model")
    changed = _compare_view(page)
    assert changed == {"x axis": "training time", "smoothing": "0.15", "log": True,
                       "bad": True, "only chosen": True, "name": "spider",
                       "cells": "change since the base model"}, changed
    assert page.locator(EXCEPTION).count() == 0
    address = page.url
    assert "compare_x=" in address and "runs=samples" in address

    with _fresh_page(chromium) as again:
        again.goto(address)
        wait_idle(again)
        assert _compare_view(again) == changed
        assert again.locator(EXCEPTION).count() == 0


WHAT_IF, REGION = "What if (another SPIDER option)", "A region at full resolution"


def _open_tab(page, label: str) -> None:
    page.get_by_role("tab", name=label).click()
    wait_idle(page)


def _parameters_view(page) -> dict:
    """The view's settings, read in both of the sections that hold them (one tab open at a
    time); ends with the region's tab open."""
    view = {"step": _slider_value(page, "Checkpoint step"),
            "find": page.get_by_label("Find a parameter", exact=True).input_value()}
    _open_tab(page, WHAT_IF)
    view.update(mask=_radio_value(page, "Mask"), normalisation=_radio_value(page, "Normalisation"))
    _open_tab(page, REGION)
    view.update({"rows from": page.get_by_label("Rows from", exact=True).input_value(),
                 "columns from": page.get_by_label("Columns from", exact=True).input_value()})
    return view


def test_parameters_view_survives_a_reload_in_a_fresh_browser(streamlit_server, browser_page,
                                                              chromium):
    page = browser_page
    page.goto(f"{streamlit_server.url}/parameters?runs=samples/spider&param={DOWN}")
    wait_idle(page)
    default = _parameters_view(page)
    _press_slider(page, "Checkpoint step", "Home")
    _type(page, "Find a parameter", "down_proj")
    _open_tab(page, WHAT_IF)
    _pick_radio(page, "Mask", "weighted" if default["mask"] == "binary" else "binary")
    _pick_radio(page, "Normalisation", "off")
    _open_tab(page, REGION)
    _type(page, "Rows from", "10")
    _type(page, "Columns from", "20")
    changed = _parameters_view(page)
    assert all(changed[k] != default[k] for k in changed), (default, changed)
    assert page.locator(EXCEPTION).count() == 0
    address = page.url
    assert "params_section=" in address  # the open tab is in the address too

    with _fresh_page(chromium) as again:
        again.goto(address)
        wait_idle(again)
        assert again.get_by_role("tab", name=REGION).get_attribute("aria-selected") == "true"
        # Streamlit's frontend draws a bound number input with its default and sets the
        # address's value a moment later (up to ~1 s here while the heatmaps draw): read the
        # view once it has settled, for up to 15 s
        deadline = time.monotonic() + 15
        while (view := _parameters_view(again)) != changed and time.monotonic() < deadline:
            again.wait_for_timeout(250)
        assert view == changed
        assert again.locator(EXCEPTION).count() == 0

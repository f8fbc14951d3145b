"""The Compare page with hundreds of runs (issue 24): filters by method, status, data and name
narrow the chooser and the runs table, and the table is paged.

The runs are hard-linked copies of sample runs (``bench.bench_app.make_many_runs``, the
generator ``bench_app --runs 300`` times the pages with); what each filter should keep is
computed here from ``analysis.list_runs`` of the folder, not from the page.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import analysis
from bench.bench_app import FAILED_EVERY, MANY_SOURCES, make_many_runs

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints" / "runs"
COUNT = 300
TABLE_PAGE_ROWS = 50  # app/views/compare.py's TABLE_PAGE_ROWS (the page is a script: not imported)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def many(runs_dir) -> pd.DataFrame:
    """300 runs in the user's runs folder; returns their listing (``analysis.list_runs``)
    and the samples', with the ids the app gives them."""
    make_many_runs(runs_dir, COUNT)
    mine = analysis.list_runs(runs_dir).assign(
        id=lambda f: [Path(p).name for p in f["path"]])
    samples = analysis.list_runs(SAMPLES).assign(id=lambda f: "samples/" + f["name"])
    return pd.concat([samples, mine], ignore_index=True)


def _open(app_page):
    at = app_page("compare", timeout=900)
    assert not at.exception, at.exception
    return at


def _table(at) -> pd.DataFrame:
    return at.dataframe[0].value


def _listed(at) -> pd.DataFrame:
    """Every row of the runs table, page after page (back on page 1 after)."""
    try:
        label = at.number_input(key="compare_table_page").label
    except KeyError:
        return _table(at)
    frames = []
    for number in range(1, int(label.split("of ")[1].rstrip(")")) + 1):
        at.number_input(key="compare_table_page").set_value(number).run()
        frames.append(_table(at))
    at.number_input(key="compare_table_page").set_value(1).run()
    return pd.concat(frames, ignore_index=True)


def _picker_ids(at) -> list[str]:
    return [o.split(" (")[0] for o in at.multiselect(key="compare_pick").options]


def test_hundreds_of_runs_are_paged_and_filtered(app_page, many):
    assert len(many) == COUNT + len(list(SAMPLES.iterdir()))
    assert (many["status"] == "failed").sum() == COUNT // FAILED_EVERY
    at = _open(app_page)
    chosen = at.query_params["runs"]
    assert len(chosen) >= 2

    # paged: the first page holds TABLE_PAGE_ROWS runs, chosen ones first and ticked
    table = _table(at)
    assert len(table) == TABLE_PAGE_ROWS < len(many)
    assert table["run"].tolist()[:len(chosen)] == chosen
    assert table["chosen"].tolist() == [r in chosen for r in table["run"]]
    n_pages = -(-len(many) // TABLE_PAGE_ROWS)
    pager = at.number_input(key="compare_table_page")
    assert pager.label == f"Table page (of {n_pages})"
    # every run once over all the pages
    seen = []
    for number in range(1, n_pages + 1):
        at.number_input(key="compare_table_page").set_value(number).run()
        assert not at.exception
        seen += _table(at)["run"].tolist()
        assert len(_table(at)) == min(TABLE_PAGE_ROWS, len(many) - (number - 1) * TABLE_PAGE_ROWS)
    assert sorted(seen) == sorted(many["id"])
    assert any(f"runs {TABLE_PAGE_ROWS * (n_pages - 1) + 1}–{len(many)} of {len(many)}"
               in c.value for c in at.caption)
    at.number_input(key="compare_table_page").set_value(1).run()

    # method: the table and the chooser narrow to that method (plus the chosen runs)
    at.multiselect(key="compare_method").set_value(["lora"]).run()
    assert not at.exception
    lora = set(many.loc[many["method"] == "lora", "id"])
    assert len(lora) == COUNT // len(MANY_SOURCES) + 1  # the copies and samples/lora
    table = _listed(at)
    others = set(table.loc[~table["chosen"], "run"])
    assert others == lora - set(chosen) and set(table.loc[table["chosen"], "run"]) == set(chosen)
    assert set(_picker_ids(at)) == lora | set(chosen)
    assert any(f"{len(lora)} of {len(many)} runs match the filters" in c.value
               for c in at.caption)

    # status on top of method: the failed LoRA runs only
    at.multiselect(key="compare_status").set_value(["failed"]).run()
    failed_lora = set(many.loc[(many["method"] == "lora") & (many["status"] == "failed"), "id"])
    assert failed_lora and failed_lora < lora
    table = _listed(at)
    assert set(table.loc[~table["chosen"], "run"]) == failed_lora - set(chosen)
    assert (table.loc[~table["chosen"], "status"] == "failed").all()

    # data alone: the hybrid copies (upstream data mixed in) and samples/hybrid
    at.multiselect(key="compare_method").set_value([]).run()
    at.multiselect(key="compare_status").set_value([]).run()
    hybrid_data = analysis.load_run(SAMPLES / "hybrid")
    from analysis.overview import data_text

    wanted = data_text(hybrid_data.config)
    at.multiselect(key="compare_data").set_value([wanted]).run()
    expected = set(many.loc[[Path(p).name == "hybrid" or _source(p) == "hybrid"
                             for p in many["path"]], "id"])
    table = _listed(at)
    assert set(table.loc[~table["chosen"], "run"]) == expected - set(chosen)
    assert set(_picker_ids(at)) == expected | set(chosen)

    # name words, and only the chosen runs
    at.multiselect(key="compare_data").set_value([]).run()
    at.text_input(key="compare_search").set_value("run-000").run()
    table = _table(at)
    assert set(table.loc[~table["chosen"], "run"]) == {f"run-{i:04d}" for i in range(10)}
    at.toggle(key="compare_only_chosen").set_value(True).run()
    assert _table(at)["run"].tolist() == chosen and _table(at)["chosen"].all()


def _source(path: str) -> str:
    """The sample run a copy links to (``make_many_runs`` takes them in turn)."""
    name = Path(path).name
    if not name.startswith("run-"):
        return ""
    return MANY_SOURCES[int(name.removeprefix("run-")) % len(MANY_SOURCES)]

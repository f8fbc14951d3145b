"""The Parameters page (AppTest): its numbers equal direct computations from the checkpoint
files, it says plainly what a run did not keep, and non-SPIDER runs show what they have."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import analysis
from spider.methods.spider import SpiderOptions, keep_weight
from spider.rundir import RunDir, group_file

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints" / "runs"
DOWN = "model.language_model.layers.3.mlp.down_proj.weight"
PROJ = "model.multi_modal_projector.linear_1.weight"


def _widget(elements, label_start: str):
    found = [e for e in elements if e.label.startswith(label_start)]
    assert found, f"no widget labelled {label_start!r}"
    return found[0]


def _metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _direct_masks(run_dir: Path, param: str, **changes):
    """The mask as trained and under ``changes``, by spider's keep_weight on theta0 (base
    model) and S read straight from the last checkpoint's file."""
    run = analysis.load_run(run_dir)
    step = run.steps[-1]
    with safe_open(str(group_file(RunDir(run_dir).checkpoint_dir(step), "method")),
                   framework="pt") as handle:
        grad_sum = handle.get_tensor(f"grad_sum/{param}").float()
    theta0 = run.theta0(param).float()
    now, _ = keep_weight(theta0, grad_sum, SpiderOptions(**run.options))
    alt, _ = keep_weight(theta0, grad_sum, SpiderOptions(**{**run.options, **changes}))
    return now, alt


WHAT_IF = "What if (another SPIDER option)"
REGION = "A region at full resolution"
FLIPS = "Mask flips between checkpoints"


def test_spider_tensor_numbers_and_what_if_equal_direct_computations(app_page):
    at = app_page("parameters", query={"runs": ["samples/spider"], "param": DOWN,
                                       "params_section": WHAT_IF})
    assert not at.exception
    assert _widget(at.selectbox, "Run").value == "samples/spider"
    assert _widget(at.selectbox, "Parameter").value == DOWN
    now, binary = _direct_masks(SAMPLES / "spider", DOWN, mask="binary")
    shown = _metrics(at)
    assert shown["Free to move (w > 0)"] == f"{float((now > 0).double().mean()):.2%}"
    assert shown["Mean keep-weight w"] == f"{float(now.double().mean()):.3f}"
    assert shown["Shape"] == "×".join(map(str, now.shape))
    # the what-if opens on the other mask option: binary
    changed = {k: v for k, v in shown.items() if k.startswith("Weights whose w changes")}
    assert list(changed.values()) == [f"{int((now != binary).sum()):,}"]
    assert shown["Switch pinned ↔ free"] == "0"
    # heatmaps of I, G, w and Δ, one figure within the size budget
    charts = at.get("plotly_chart")
    panels = json.loads(charts[0].proto.spec)
    assert [t["name"] for t in panels["data"]] == ["importance_pre", "importance_ft", "mask",
                                                  "delta"]
    assert len(charts[0].proto.spec) < 2_000_000

    at.radio(key="params_whatif_mask").set_value("weighted")
    at.radio(key="params_whatif_norm").set_value(False).run()
    assert not at.exception
    _, raw = _direct_masks(SAMPLES / "spider", DOWN, normalize=False)
    shown = _metrics(at)
    changed = [v for k, v in shown.items() if k.startswith("Weights whose w changes")]
    assert changed == [f"{int((now != raw).sum()):,}"]
    assert shown[next(k for k in shown if k.startswith("Mean w (as trained"))] == \
        f"{float(raw.double().mean()):.3f}"


def test_search_by_words_and_regex(app_page):
    at = app_page("parameters", query={"runs": ["samples/spider"]})
    at.text_input(key="params_query").set_value("projector linear_2").run()
    options = _widget(at.selectbox, "Parameter").options
    assert options and all("projector" in o and "linear_2" in o for o in options)
    at.text_input(key="params_query").set_value(r"layers\.3\..*(gate|up)_proj")
    at.toggle(key="params_regex").set_value(True).run()
    options = [o.split("  —")[0] for o in _widget(at.selectbox, "Parameter").options]
    assert sorted(options) == [
        "model.language_model.layers.3.mlp.gate_proj.weight",
        "model.language_model.layers.3.mlp.up_proj.weight"]
    at.text_input(key="params_query").set_value("([").run()
    assert not at.exception
    assert any("is not valid" in e.value for e in at.error)


def _copy_keeping_only(source: Path, target: Path, pattern: str) -> None:
    """A copy of a run whose checkpoints keep only tensors matching ``pattern`` (as a run
    trained with ``--save-tensors pattern`` would)."""
    shutil.copytree(source, target)
    for folder in (target / "checkpoints").iterdir():
        for group in ("weights", "method"):
            file = folder / f"{group}.safetensors"
            with safe_open(str(file), framework="pt") as handle:
                # method flags (no "/" in the key) belong to no parameter: always kept
                tensors = {k: handle.get_tensor(k) for k in handle.keys()
                           if re.search(pattern, k) or (group == "method" and "/" not in k)}
            save_file(tensors, str(file))
        meta = json.loads((folder / "meta.json").read_text())
        meta["save_tensors"] = pattern
        (folder / "meta.json").write_text(json.dumps(meta))
    info = json.loads((target / "run.json").read_text())
    info["config"]["save_tensors"] = pattern
    (target / "run.json").write_text(json.dumps(info))


def test_a_tensor_the_run_did_not_keep_is_said_plainly(app_page, runs_dir):
    _copy_keeping_only(SAMPLES / "spider", runs_dir / "partial", "multi_modal_projector")
    at = app_page("parameters", query={"runs": ["partial"], "param": DOWN})
    assert not at.exception
    assert _widget(at.selectbox, "Run").value == "partial"
    assert _widget(at.selectbox, "Parameter").value == DOWN
    notes = " ".join(i.value for i in at.info)
    assert "did not save the tensor" in notes and "multi_modal_projector" in notes
    assert not at.get("plotly_chart")
    # the parameter's logged statistics are shown instead
    logged = at.dataframe[0].value
    assert "Share of weights free to move (w > 0)" in logged.columns and len(logged) >= 1
    # in words (spider.statistics), not column names; no "None" for a value not logged
    from spider import statistics

    assert not set(logged.columns) & set(statistics.STATISTICS)
    assert all(logged[c].dtype.kind in "fiu" for c in logged.columns)
    # a kept one still draws
    _widget(at.selectbox, "Parameter").set_value(PROJ).run()
    assert not at.exception and at.get("plotly_chart")


@pytest.mark.parametrize("name", ["full", "lora", "magnitude_mask"])
def test_runs_of_other_methods_show_what_they_have(app_page, name):
    if not (SAMPLES / name / "checkpoints").is_dir():
        pytest.fail(f"sample run {name} has no checkpoints")
    at = app_page("parameters", query={"runs": [f"samples/{name}"]})
    assert not at.exception
    text = " ".join(m.value for m in at.markdown)
    assert "Not available: I (pre-training importance), G (fine-tuning importance)" in text
    assert "has, per weight: " in text and "the update Δ and the weight θ." in text
    assert "only SPIDER ranks weights" in text
    assert not any(s.value.startswith("What if") for s in at.subheader)
    chart = at.get("plotly_chart")[0]
    names = [t["name"] for t in json.loads(chart.proto.spec)["data"]]
    expected = ["mask", "delta"] if name == "magnitude_mask" else ["delta"]
    assert names == expected
    run = analysis.load_run(SAMPLES / name)
    delta = run.tensor(run.steps[-1], _widget(at.selectbox, "Parameter").value, "delta")
    assert _metrics(at)["Weights unchanged (Δ = 0)"] == f"{float((delta == 0).double().mean()):.2%}"
    assert torch.is_tensor(delta)


def test_a_tensor_that_fits_is_drawn_weight_by_weight_and_downloaded_whole(app_page):
    """Issue 23: the 160×448 down projection was pooled 1×2 (hover "block mean"), and the
    .npz held the pooled cells."""


    at = app_page("parameters", query={"runs": ["samples/spider"], "param": DOWN})
    assert not at.exception
    run = analysis.load_run(SAMPLES / "spider")
    mask = run.tensor(run.steps[-1], DOWN, "mask")
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    for trace in spec["data"]:
        assert (len(trace["y"]), len(trace["x"])) == tuple(mask.shape)  # no pooling
        assert "block" not in trace["hovertemplate"] and "pooled" not in trace["hovertemplate"]
        assert trace["colorbar"]["title"]["text"] in ("I", "G", "w", "Δ = θ − θ0")
    titles = " ".join(a["text"] for a in spec["layout"]["annotations"])
    assert "cell = one weight" in titles and "block mean" not in titles
    assert any("Each cell is one weight" in c.value and f"{mask.shape[0]}×{mask.shape[1]}"
               in c.value for c in at.caption)
    # the download is the tensors at full resolution (analysis.tensors.tensors_npz, tested
    # in tests/analysis/test_tensors.py)
    assert any(b.label == "Download the tensors (.npz, every weight)"
               for b in at.get("download_button"))


def test_options_are_written_one_way(app_page):
    """Issue 23: ``normalize=True`` in one place, ``normalize=true`` in another."""
    at = app_page("parameters", query={"runs": ["samples/spider"], "param": DOWN})
    text = " ".join(m.value for m in at.markdown) + " ".join(i.value for i in at.info)
    assert "normalize=true" in text and "normalize=True" not in text


def _chart(at, title_part: str) -> dict:
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        if title_part in spec["layout"].get("title", {}).get("text", ""):
            return spec
    raise AssertionError(f"no chart titled {title_part!r}")


def test_a_region_is_drawn_entry_by_entry_with_exact_values(app_page):
    at = app_page("parameters", query={"runs": ["samples/spider"], "param": DOWN,
                                       "params_section": REGION})
    assert not at.exception
    at.number_input(key="params_r0").set_value(10)
    at.number_input(key="params_r1").set_value(20)
    at.number_input(key="params_c0").set_value(100)
    at.number_input(key="params_c1").set_value(130).run()
    assert not at.exception
    run = analysis.load_run(SAMPLES / "spider")
    delta = run.tensor(run.steps[-1], DOWN, "delta")
    spec = _chart(at, "rows 10–19, columns 100–129")
    trace = next(t for t in spec["data"] if t["name"] == "delta")
    assert trace["x"] == list(range(100, 130)) and trace["y"] == list(range(10, 20))
    assert "row %{y}, col %{x}" in trace["hovertemplate"]
    assert "%{z:.9g}" in trace["hovertemplate"]
    z = trace["z"]
    from tests.app.test_compare_page import _decode

    values = np.array(_decode(z) if isinstance(z, dict) else z, dtype=np.float32)
    assert np.array_equal(values.reshape(10, 30), delta[10:20, 100:130].numpy())


def test_a_large_region_is_pooled_and_labelled_with_whole_tensor_indices():
    from analysis.figures.tensors import region_panels

    t = torch.arange(600 * 300, dtype=torch.float32).reshape(600, 300)
    spec = region_panels({"weight": t}, "p", (50, 600), (0, 300)).to_plotly_json()
    trace = spec["data"][0]
    assert len(trace["y"]) <= 256 and trace["y"][0].startswith("50–")
    assert "pooled" in trace["hovertemplate"]


def test_mask_flips_between_checkpoints_equal_the_masks_sides(app_page):
    at = app_page("parameters", query={"runs": ["samples/spider"], "param": DOWN,
                                       "params_section": FLIPS})
    assert not at.exception
    run = analysis.load_run(SAMPLES / "spider")
    a, b = run.steps[0], run.steps[-1]
    free_a = run.tensor(a, DOWN, "mask") > 0
    free_b = run.tensor(b, DOWN, "mask") > 0
    shown = _metrics(at)
    assert shown["Pinned → free"] == f"{int((~free_a & free_b).sum()):,}"
    assert shown["Free → pinned"] == f"{int((free_a & ~free_b).sum()):,}"
    spec = _chart(at, "Mask flips")
    assert f"from step {a} to step {b}" in spec["layout"]["title"]["text"]
    z = spec["data"][0]["z"]
    from tests.app.test_compare_page import _decode

    flips = np.array(_decode(z) if isinstance(z, dict) else z, dtype=float).reshape(
        free_a.shape)
    assert np.array_equal(flips, (free_b.int() - free_a.int()).numpy())


def test_downloads_hold_every_weight_and_the_updated_entries(app_page):
    import io

    import pandas as pd
    from safetensors.torch import load

    from analysis.tensors import (
        tensor_views,
        tensors_safetensors,
        updated_entries,
        updated_entries_csv,
    )

    at = app_page("parameters", query={"runs": ["samples/spider"], "param": DOWN})
    labels = [b.label for b in at.get("download_button")]
    assert "Download the tensors (.safetensors, every weight)" in labels
    assert any(label.startswith("Download the updated entries (.csv") for label in labels)
    run = analysis.load_run(SAMPLES / "spider")
    step = run.steps[-1]
    views = tensor_views(run, step, DOWN)
    loaded = load(tensors_safetensors(views, DOWN, step))
    for kind, tensor in views.items():
        assert torch.equal(loaded[kind], tensor)
    moved = pd.read_csv(io.BytesIO(updated_entries_csv(updated_entries(run, step, DOWN))),
                        dtype={"theta0": np.float32, "value": np.float32,
                               "delta": np.float32})
    delta = views["delta"]
    assert len(moved) == int((delta != 0).sum())
    weight = run.tensor(step, DOWN, "weight")
    rows, cols = moved["row"].to_numpy(), moved["col"].to_numpy()
    assert np.array_equal(moved["delta"].to_numpy(), delta.numpy()[rows, cols])
    assert np.array_equal(moved["value"].to_numpy(), weight.numpy()[rows, cols])
    assert np.array_equal(moved["theta0"].to_numpy(),
                          run.theta0(DOWN).float().numpy()[rows, cols])
    assert f"{len(moved):,} rows" in next(b.label for b in at.get("download_button")
                                          if "updated entries" in b.label)


def test_a_tensor_the_run_did_not_train_is_listed_as_frozen(app_page):
    """--train mlp_gate_up leaves down_proj frozen: it is listed, marked frozen (not "tensor
    not saved"), and picking it says it never moved, citing the run's --train."""
    at = app_page("parameters", query={"runs": ["samples/full-mlp_gate_up"], "param": DOWN})
    assert not at.exception
    box = _widget(at.selectbox, "Parameter")
    assert box.value == DOWN
    labels = list(box.options)  # as the page formats them
    assert f"{DOWN}  — frozen (not trained in this run)" in labels
    assert not any("gate_proj" in o and "frozen" in o for o in labels)
    assert any(o.startswith("vision_tower") and "frozen" in o for o in labels)
    notes = " ".join(i.value for i in at.info)
    assert "is frozen: not trained in this run (`--train mlp_gate_up`)" in notes
    assert "did not save the tensor" not in notes
    assert not at.get("plotly_chart")


def test_the_bf16_rounding_is_a_sentence_beside_free_and_unchanged(app_page, runs_dir):
    """Issue 25, item 6: "free to move" beside a larger "unchanged" share is explained on
    the page (not in a tooltip): checkpoints saved in bf16 round small updates back to θ0."""
    from analysis.tensors import tensor_views

    run = analysis.load_run(SAMPLES / "spider")
    dtype = run.config["save_dtype"]
    assert dtype != "float32"  # the samples are saved in bf16, as the issue saw them
    views = tensor_views(run, run.steps[-1], DOWN)
    unchanged = float((views["delta"] == 0).double().mean())
    pinned = float((views["mask"] == 0).double().mean())
    assert unchanged > pinned  # what made the two numbers read as a contradiction

    at = app_page("parameters", query={"runs": ["samples/spider"], "param": DOWN})
    assert not at.exception
    shown = _metrics(at)
    assert shown["Weights unchanged (Δ = 0)"] == f"{unchanged:.2%}"
    sentence = [m.value for m in at.markdown if m.value.startswith("**Why Δ = 0")]
    assert len(sentence) == 1
    assert f"Why Δ = 0 for {unchanged:.2%} of the weights while only {pinned:.2%} were " \
        "pinned" in sentence[0]
    assert f"saved its checkpoints in {dtype}" in sentence[0]
    assert "rounds back to θ0" in sentence[0]

    # a run that saved float32 has no rounding to explain
    shutil.copytree(SAMPLES / "spider", runs_dir / "f32")
    info = json.loads((runs_dir / "f32" / "run.json").read_text())
    info["config"]["save_dtype"] = "float32"
    (runs_dir / "f32" / "run.json").write_text(json.dumps(info))
    at = app_page("parameters", query={"runs": ["f32"], "param": DOWN})
    assert not at.exception
    assert not any(m.value.startswith("**Why Δ = 0") for m in at.markdown)


def test_one_section_is_drawn_at_a_time_and_the_address_chooses_it(app_page):
    """Below the panels, only the open tab's section is computed and drawn (they cost the
    browser ~0.4 s a visit drawn together); the address picks the tab."""
    def figures(at):
        return [json.loads(c.proto.spec)["layout"].get("title", {}).get("text", "")
                for c in at.get("plotly_chart")[1:]]

    at = app_page("parameters", query={"runs": ["samples/spider"], "param": DOWN})
    assert not at.exception
    assert [s.value for s in at.subheader if s.value in ("Statistics", "Distributions")] == [
        "Statistics"]
    assert len(at.get("plotly_chart")) == 1 and len(at.dataframe) == 1  # panels and table
    # every section's widgets stay (their values and the address survive a tab switch)
    assert at.number_input(key="params_r0").value == 0
    assert at.radio(key="params_whatif_mask").value == "binary"
    for section, words in ((REGION, "rows 0–63"), (FLIPS, "Mask flips"),
                           ("Distributions", "")):
        at = app_page("parameters", query={"runs": ["samples/spider"], "param": DOWN,
                                           "params_section": section})
        assert not at.exception
        assert len(figures(at)) == 1 and words in figures(at)[0], (section, figures(at))
        assert "Statistics" not in [s.value for s in at.subheader]
    # a run of another method has no what-if tab: an address asking for it opens the first
    at = app_page("parameters", query={"runs": ["samples/full"], "params_section": WHAT_IF})
    assert not at.exception
    assert "Statistics" in [s.value for s in at.subheader]

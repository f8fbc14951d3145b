"""Frozen parts: what a run did not train (its ``--train`` / ``--train-last-layers``) shows as
frozen, not as "not recorded", from run.json and the base model's file header
(``analysis.tensors.parameter_status``, ``analysis.explore.frozen_layers``, the heatmap's
grey rows); trained but not logged stays apart from frozen."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

import analysis
from analysis import explore
from analysis.figures import layer_step_heatmap
from analysis.figures.heatmaps import FROZEN_COLOR
from analysis.tensors import parameter_status, train_setting
from tests.sample_logs import layers_jsonl_lines

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints" / "runs"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def test_attn_run_trained_the_attention_projections_of_the_language_model_only():
    run = analysis.load_run(SAMPLES / "spider-attn")
    status = parameter_status(run)
    assert train_setting(run) == "--train attn"
    trained = status[status["trained"]]
    assert len(trained) == 16  # q k v o x 4 decoder layers
    assert set(trained["component"]) == {"llm"} and set(trained["module"]) == set(ATTN)
    assert trained["logged"].all()  # every trained tensor has statistics
    frozen = status[~status["trained"]]
    assert not frozen["logged"].any()
    assert {"vision", "projector"} <= set(frozen["component"])
    assert {"gate_proj", "up_proj", "down_proj", "embeddings", "lm_head"} <= set(frozen["module"])
    # the vision q/k/v/o are frozen: attn is a language-model subset
    assert not status[(status["component"] == "vision") & status["module"].isin(ATTN)][
        "trained"].any()


def test_mlp_gate_up_leaves_down_proj_frozen_in_every_layer():
    status = parameter_status(analysis.load_run(SAMPLES / "full-mlp_gate_up"))
    mlp = status[status["module"].isin(["gate_proj", "up_proj", "down_proj"])]
    assert mlp.loc[mlp["module"] != "down_proj", "trained"].all()
    assert not mlp.loc[mlp["module"] == "down_proj", "trained"].any()
    layers = explore.frozen_layers(status)
    blocks = layers[(layers["component"] == "llm") & layers["layer"].notna()]
    assert len(blocks) == 4 and not blocks["all_frozen"].any()  # gate and up trained there
    assert all("down_proj" in m for m in blocks["frozen_modules"])
    only_down = explore.frozen_layers(status, modules=["down_proj"])
    assert len(only_down) == 4 and only_down["all_frozen"].all()
    assert set(layers.loc[layers["all_frozen"], "component"]) == {"vision", "projector", "llm"}


def test_trained_but_not_logged_is_not_frozen(tmp_path):
    """--train-last-layers 2: layers 0-1 frozen; layer 3's rows removed from the log: trained
    (it moved) but not logged."""
    out = tmp_path / "run"
    out.mkdir()
    info = json.loads((SAMPLES / "spider-attn" / "run.json").read_text())
    info["config"]["train_last_layers"] = 2
    info["model"].pop("relative")
    (out / "run.json").write_text(json.dumps(info))
    rows = [line for line in layers_jsonl_lines(SAMPLES / "spider-attn")
            if ".layers.3." not in json.loads(line)["param"]]
    (out / "layers.jsonl").write_text("\n".join(rows) + "\n")
    shutil.copy(SAMPLES / "spider-attn" / "metrics.jsonl", out / "metrics.jsonl")
    run = analysis.load_run(out)
    assert train_setting(run) == "--train attn --train-last-layers 2"
    status = parameter_status(run)
    attn = status[(status["component"] == "llm") & status["module"].isin(ATTN)]
    assert not attn.loc[attn["layer"] < 2, "trained"].any()
    assert attn.loc[attn["layer"] >= 2, "trained"].all()
    assert attn.loc[attn["layer"] == 2, "logged"].all()
    assert not attn.loc[attn["layer"] == 3, "logged"].any()  # trained, not logged


def test_heatmap_draws_frozen_layers_as_grey_rows_that_say_why():
    run = analysis.load_run(SAMPLES / "spider-attn")
    layers = run.layers.assign(run="attn")
    frozen = explore.frozen_layers(parameter_status(run))
    matrix = explore.layer_step_matrix(layers, "mask_density", frozen)
    assert explore.layer_step_matrix(layers, "mask_density").columns.tolist() == [
        c for c in matrix.columns if c != "frozen"]  # without frozen=: as before
    grey = matrix[matrix["frozen"]]
    assert set(grey["name"]) == set(frozen.loc[frozen["all_frozen"], "name"])
    assert grey["mask_density"].isna().all()
    assert set(grey["step"]) == set(layers["step"])
    names = list(matrix.drop_duplicates("name").sort_values("order")["name"])
    assert names[0].startswith("vision encoder") and names[-1] == "language model · block 3"

    fig = layer_step_heatmap(matrix, "mask_density", (0, 1), train=train_setting(run))
    overlay = [t for t in fig.data if t.name == "frozen"]
    assert len(overlay) == 1
    trace = overlay[0]
    assert "frozen: not trained in this run (--train attn)" in trace.hovertemplate
    assert trace.colorscale[0][1] == FROZEN_COLOR and trace.showscale is False
    z = np.asarray(trace.z, dtype=float)
    is_grey = np.isin(np.asarray(trace.y), list(grey["name"]))
    assert np.isfinite(z[is_grey]).all() and np.isnan(z[~is_grey]).all()
    # a filter that keeps only frozen modules: every row grey, not "nothing logged"
    status = parameter_status(run)
    down = explore.frozen_layers(status, modules=["down_proj"])
    only = explore.layer_step_matrix(explore.filter_layers(layers, None, ["down_proj"]),
                                     "mask_density", down, steps=layers)
    assert len(only) and only["frozen"].all()
    fig = layer_step_heatmap(only, "mask_density", (0, 1), train="--train attn")
    assert [t.name for t in fig.data][-1] == "frozen"

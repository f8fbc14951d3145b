"""In Chromium: the Parameters page's new downloads (.safetensors and the updated entries'
CSV) arrive whole, one after another, and equal the checkpoint's tensors."""

import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load

import analysis
from tests.app.test_e2e_views import LAPTOP, _download, laptop_page  # noqa: F401

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints" / "runs"
DOWN = "model.language_model.layers.3.mlp.down_proj.weight"


def test_parameters_downloads_arrive_whole(streamlit_server, laptop_page):  # noqa: F811
    from tests.app.conftest import wait_idle

    page = laptop_page
    page.goto(f"{streamlit_server.url}/parameters?runs=samples/spider&param={DOWN}")
    wait_idle(page)
    run = analysis.load_run(SAMPLES / "spider")
    step = run.steps[-1]
    delta = run.tensor(step, DOWN, "delta")
    csv_label = page.get_by_role("button", name="Download the updated entries").inner_text()
    for _ in range(2):  # one after another: a rerun must not drop the other file
        tensors = load(_download(page, "Download the tensors (.safetensors, every weight)"))
        assert torch.equal(tensors["delta"], delta)
        moved = pd.read_csv(io.BytesIO(_download(page, csv_label.strip())),
                            dtype={"delta": np.float32})
        assert list(moved.columns) == ["row", "col", "theta0", "value", "delta"]
        assert len(moved) == int((delta != 0).sum())
        assert np.array_equal(moved["delta"].to_numpy(),
                              delta.numpy()[moved["row"].to_numpy(), moved["col"].to_numpy()])
    log = streamlit_server.log.read_text(errors="replace")
    assert "MediaFileStorageError" not in log

"""analysis.tensors and analysis.figures.tensors on the bundled sample runs (read only)."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import analysis
from analysis.figures import figure_json_size
from analysis.figures.tensors import mask_change, value_histograms
from analysis.tensors import (
    KEPT_COLUMNS,
    STAT_COLUMNS,
    available_kinds,
    find_params,
    kept_tensors,
    tensor_statistics,
    tensor_views,
    tensors_npz,
    what_if_mask,
)
from spider.errors import UserError
from spider.methods.spider import SpiderOptions, keep_weight
from spider.rundir import RunDir, group_file

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints" / "runs"
DOWN = "model.language_model.layers.3.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def spider_run():
    return analysis.load_run(SAMPLES / "spider")


def _grad_sum_from_file(run, step: int, param: str) -> torch.Tensor:
    """S as the checkpoint stores it, read straight from its safetensors file."""
    file = group_file(RunDir(run.path).checkpoint_dir(step), "method")
    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(f"grad_sum/{param}").float()


def test_kept_tensors_lists_every_trainable_tensor_and_what_was_saved(spider_run):
    step = spider_run.steps[-1]
    kept = kept_tensors(spider_run, step)
    assert list(kept.columns) == list(KEPT_COLUMNS)
    saved = spider_run.params(step)
    assert kept.loc[kept["kept"], "param"].tolist() == saved
    assert set(kept["param"]) == set(spider_run.layers["param"]) | set(saved)
    down = kept.set_index("param").loc[DOWN]
    theta0 = spider_run.theta0(DOWN)
    assert down["shape"] == "×".join(map(str, theta0.shape)) and down["numel"] == theta0.numel()
    assert (down["component"], down["layer"], down["module"]) == ("llm", 3, "down_proj")
    not_saved = kept[~kept["kept"]]
    assert (not_saved["shape"] == "").all() and (not_saved["numel"] > 0).all()
    with pytest.raises(UserError, match="checkpoints are at steps"):
        kept_tensors(spider_run, 12345)


def test_available_kinds_follow_the_method():
    assert available_kinds("spider") == ("mask", "importance_pre", "importance_ft", "delta",
                                         "weight")
    assert available_kinds("full") == ("delta", "weight")
    assert available_kinds("lora") == ("delta", "weight")
    assert available_kinds("magnitude_mask") == ("mask", "delta", "weight")
    assert available_kinds("no-such-method") == ("delta", "weight")


def test_find_params_by_words_or_regex():
    names = ["model.language_model.layers.3.mlp.down_proj.weight",
             "model.language_model.layers.13.mlp.up_proj.weight",
             "model.multi_modal_projector.linear_1.bias"]
    assert find_params(names, "3 DOWN") == names[:1]
    assert find_params(names, "mlp") == names[:2]
    assert find_params(names, "") == names
    assert find_params(names, r"layers\.3\.", regex=True) == names[:1]
    assert find_params(names, r"proj(ector)?\.linear_\d\.bias$", regex=True) == names[2:]
    with pytest.raises(UserError, match=r"regular expression '\(\[' is not valid"):
        find_params(names, "([", regex=True)


def test_views_and_statistics_match_run_tensor(spider_run):
    step = spider_run.steps[-1]
    views = tensor_views(spider_run, step, DOWN)
    assert list(views) == ["importance_pre", "importance_ft", "mask", "delta"]
    mask = spider_run.tensor(step, DOWN, "mask")
    assert torch.equal(views["mask"], mask)
    table = tensor_statistics(views).set_index("kind")
    assert list(table.reset_index().columns) == list(STAT_COLUMNS)
    assert table.loc["mask", "share_zero"] == pytest.approx(float((mask == 0).double().mean()))
    assert table.loc["mask", "share_one"] == pytest.approx(float((mask == 1).double().mean()))
    assert table.loc["delta", "mean"] == pytest.approx(float(views["delta"].double().mean()))
    assert table.loc["importance_pre", "min"] > 0 and table.loc["importance_pre", "max"] < 1
    # the rebuilt mask is close to the one logged during training (bf16 saves move a few)
    logged = spider_run.layers
    row = logged[(logged["param"] == DOWN) & (logged["step"] == step)]
    assert float((mask > 0).double().mean()) == pytest.approx(
        float(row["mask_density"].iloc[0]), abs=1e-3)
    with pytest.raises(UserError):
        tensor_views(spider_run, step, "model.no.such.weight")


@pytest.mark.parametrize("changes", [{"mask": "binary"}, {"normalize": False},
                                     {"mask": "binary", "normalize": False}])
def test_what_if_counts_the_entries_a_direct_rebuild_changes(spider_run, changes):
    step = spider_run.steps[-1]
    result = what_if_mask(spider_run, step, DOWN, **changes)
    theta0 = spider_run.theta0(DOWN).float()
    grad_sum = _grad_sum_from_file(spider_run, step, DOWN)
    now, _ = keep_weight(theta0, grad_sum, SpiderOptions(**spider_run.options))
    alt, _ = keep_weight(theta0, grad_sum, SpiderOptions(**{**spider_run.options, **changes}))
    assert torch.equal(result.mask, spider_run.tensor(step, DOWN, "mask"))
    assert torch.equal(result.mask, now) and torch.equal(result.mask_alt, alt)
    assert result.changed == int((now != alt).sum()) > 0
    # these options change how far free weights move, never which are free
    assert result.flipped == 0
    assert result.alternative == {**result.options, **changes}
    row = result.as_row()
    assert row["share changed"] == pytest.approx(result.changed / now.numel())
    assert row["mean w what-if"] == pytest.approx(float(alt.double().mean()))


def test_what_if_refuses_what_it_cannot_answer(spider_run):
    step = spider_run.steps[-1]
    with pytest.raises(UserError, match="accumulate"):
        what_if_mask(spider_run, step, DOWN, accumulate="abs")
    with pytest.raises(UserError, match="must be one of"):
        what_if_mask(spider_run, step, DOWN, mask="soft")
    full = analysis.load_run(SAMPLES / "full")
    with pytest.raises(UserError, match="method 'full'"):
        what_if_mask(full, full.steps[-1], DOWN, mask="binary")


def test_value_histograms_count_exact_values_apart(spider_run):
    step = spider_run.steps[-1]
    views = tensor_views(spider_run, step, DOWN)
    fig = value_histograms(views, bins=20)
    bars = {t.name: np.asarray(t.y) for t in fig.data}
    mask = views["mask"]
    exact = float(((mask == 0) | (mask == 1)).double().mean())
    assert bars["mask"].sum() + exact == pytest.approx(1.0)
    assert bars["importance_pre"].sum() == pytest.approx(1.0)
    titles = [a.text for a in fig.layout.annotations]
    assert f"= 0: {float((mask == 0).double().mean()):.1%}" in titles[2]
    assert figure_json_size(fig) < 50_000


def test_mask_change_shows_the_pooled_difference():
    w = torch.rand(300, 700)
    alt = w.clone()
    alt[:10, :20] = 1.0
    fig = mask_change(w, alt, "p", "mask=binary", max_cells=100)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (100, 100)
    assert z[0, 0] == pytest.approx(float((alt - w)[:3, :7].mean()), rel=1e-5)
    assert np.all(z[10:, :] == 0)
    assert "pooled cell (3×7 weights)" in fig.data[0].hovertemplate
    assert figure_json_size(fig) < 2_000_000


def test_tensors_npz_holds_every_weight(spider_run):
    step = spider_run.steps[-1]
    views = tensor_views(spider_run, step, DOWN)
    data = np.load(io.BytesIO(tensors_npz(views, DOWN, step)), allow_pickle=False)
    assert str(data["param"]) == DOWN and int(data["step"]) == step
    for kind, tensor in views.items():
        assert data[kind].shape == tuple(tensor.shape) and data[kind].dtype == np.float32
        np.testing.assert_array_equal(data[kind], tensor.float().numpy())

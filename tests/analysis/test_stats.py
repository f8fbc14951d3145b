"""analysis.stats: numbers checked against hand calculations and against real SPIDER masks."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from analysis import stats
from spider.importance import rank
from spider.methods.spider import keep_weight
from spider.metrics import harmonic_mean
from spider.naming import parse_param_name

# --------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------

Q = "model.language_model.layers.0.self_attn.q_proj.weight"
UP = "model.language_model.layers.0.mlp.up_proj.weight"
EMBED = "model.language_model.embed_tokens.weight"
VISION_Q = "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"


def layer_row(run, method, step, param, numel, **values) -> dict:
    component, layer, module = parse_param_name(param)
    row = dict.fromkeys(stats.LAYERS_COLUMNS, np.nan)
    row.update(run=run, method=method, step=step, param=param, component=component,
               layer=layer, module=module, numel=numel)
    row.update(values)
    return row


def layers_frame(rows) -> pd.DataFrame:
    return pd.DataFrame.from_records(rows, columns=list(stats.LAYERS_COLUMNS))


def tensor_row(run, method, step, param, theta0, theta, importance_pre=None,
               importance_ft=None, mask=None) -> dict:
    """A layers row computed from real per-element tensors, as the trainer would log it."""
    delta = theta - theta0
    values = {
        "update_norm": float(delta.norm()),
        "update_rel_norm": float(delta.norm() / theta0.norm()),
    }
    if mask is not None:
        values.update(mask_mean=float(mask.double().mean()),
                      mask_density=float((mask > 0).double().mean()))
    if importance_pre is not None:
        values.update(
            importance_pre_mean=float(importance_pre.double().mean()),
            importance_ft_mean=float(importance_ft.double().mean()),
            frac_ft_gt_pre=float((importance_ft > importance_pre).double().mean()),
            importance_pre_sq_mean=float(importance_pre.double().square().mean()),
            importance_ft_sq_mean=float(importance_ft.double().square().mean()),
            importance_cross_mean=float((importance_pre.double() * importance_ft).mean()),
        )
    return layer_row(run, method, step, param, theta0.numel(), **values)


@pytest.fixture(scope="module")
def spider_tensors():
    """Two tensors of one layer with theta0, S, I, G and the SPIDER keep-weight w."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in ((Q, (48, 32)), (UP, (96, 32))):
        theta0 = torch.randn(shape, generator=generator)
        grad_sum = torch.randn(shape, generator=generator)
        w, _ = keep_weight(theta0, grad_sum)
        out[name] = {
            "theta0": theta0, "grad_sum": grad_sum, "I": rank(theta0), "G": rank(grad_sum),
            "w": w, "theta": theta0 + 0.01 * w * torch.randn(shape, generator=generator),
        }
    return out


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def test_missing_columns_are_named():
    frame = layers_frame([layer_row("r", "spider", 0, Q, 10, mask_density=0.5)])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['numel'\]"):
        stats.mask_density(frame.drop(columns=["numel"]))
    with pytest.raises(ValueError, match="split"):
        stats.summary_table(pd.DataFrame({"run": [], "method": [], "step": [], "metric": [],
                                          "value": []}))
    with pytest.raises(ValueError, match="cannot group by"):
        stats.mask_density(frame, by=("run",))
    with pytest.raises(TypeError):
        stats.layer_discrepancy({"run": []})


# --------------------------------------------------------------------------------------------
# discrepancy
# --------------------------------------------------------------------------------------------


def test_layer_discrepancy_weights_by_numel_and_skips_nan():
    frame = layers_frame([
        layer_row("r", "spider", 5, Q, 100, importance_pre_mean=0.5, importance_ft_mean=0.9,
                  frac_ft_gt_pre=0.8),
        layer_row("r", "spider", 5, UP, 300, importance_pre_mean=0.5, importance_ft_mean=0.5,
                  frac_ft_gt_pre=0.0),
        layer_row("r", "spider", 5, EMBED, 50, importance_pre_mean=0.4, importance_ft_mean=0.3,
                  frac_ft_gt_pre=0.1),
        layer_row("f", "full", 5, Q, 100),  # full fine-tuning: no importances
    ])
    out = stats.layer_discrepancy(frame)
    assert list(out.columns) == ["run", "method", "step", "component", "layer",
                                 *stats.LAYER_DISCREPANCY_VALUES]
    block = out[(out["run"] == "r") & (out["layer"] == 0)].iloc[0]
    assert block["numel"] == 400
    assert block["discrepancy_mean"] == pytest.approx((100 * 0.4 + 300 * 0.0) / 400)  # 0.1
    assert block["frac_ft_gt_pre"] == pytest.approx((100 * 0.8 + 0) / 400)  # 0.2, not 0.4
    embed = out[(out["run"] == "r") & out["layer"].isna()].iloc[0]
    assert embed["discrepancy_mean"] == pytest.approx(-0.1)
    full = out[out["run"] == "f"].iloc[0]
    assert math.isnan(full["discrepancy_mean"]) and full["numel"] == 100
    assert str(out["layer"].dtype) == "Int64"


def test_layer_discrepancy_equals_elementwise_over_the_whole_layer(spider_tensors):
    rows = [tensor_row("r", "spider", 7, name, t["theta0"], t["theta"], t["I"], t["G"], t["w"])
            for name, t in spider_tensors.items()]
    out = stats.layer_discrepancy(layers_frame(rows)).iloc[0]
    whole = stats.tensor_discrepancy(
        torch.cat([t["I"].reshape(-1) for t in spider_tensors.values()]),
        torch.cat([t["G"].reshape(-1) for t in spider_tensors.values()]),
    )
    assert out["discrepancy_mean"] == pytest.approx(whole["discrepancy_mean"], abs=1e-7)
    assert out["frac_ft_gt_pre"] == pytest.approx(whole["frac_ft_gt_pre"], abs=1e-12)
    # the correlation pooled from per-tensor moments is that of the concatenated layer
    assert out["correlation"] == pytest.approx(whole["correlation"], abs=1e-5)
    assert out["correlation"] != pytest.approx(0.0, abs=1e-3)  # a number, not a placeholder


def test_tensor_discrepancy_on_a_real_spider_mask(spider_tensors):
    t = spider_tensors[Q]
    out = stats.tensor_discrepancy(t["I"], t["G"])
    # SPIDER frees exactly the weights with G > I: the fraction is the mask density
    assert out["frac_ft_gt_pre"] == pytest.approx(float((t["w"] > 0).double().mean()), abs=0)
    assert out["discrepancy_mean"] == pytest.approx(float((t["G"] - t["I"]).double().mean()),
                                                    abs=1e-7)
    expected_r = np.corrcoef(t["I"].numpy().ravel(), t["G"].numpy().ravel())[0, 1]
    assert out["correlation"] == pytest.approx(expected_r, abs=1e-6)
    assert abs(out["correlation"]) < 0.2  # theta0 and S are unrelated here
    assert out["numel"] == 48 * 32


def test_tensor_discrepancy_hand_values_and_chunking(monkeypatch):
    pre = torch.tensor([0.2, 0.4, 0.6, 0.8])
    assert stats.tensor_discrepancy(pre, 1 - pre)["correlation"] == pytest.approx(-1.0)
    same = stats.tensor_discrepancy(pre, 0.5 * pre + 0.1)
    assert same["correlation"] == pytest.approx(1.0)
    assert same["discrepancy_mean"] == pytest.approx(-0.15)  # mean(0.1 - 0.5 * pre)
    assert same["frac_ft_gt_pre"] == 0.0
    assert math.isnan(stats.tensor_discrepancy(pre, torch.full((4,), 0.5))["correlation"])
    # the same numbers when the tensor is processed in many chunks
    generator = torch.Generator().manual_seed(3)
    a, b = torch.rand(1000, generator=generator), torch.rand(1000, generator=generator)
    whole = stats.tensor_discrepancy(a, b)
    original = stats._flat_chunks
    monkeypatch.setattr(stats, "_flat_chunks", lambda *t: original(*t, chunk=7))
    chunked = stats.tensor_discrepancy(a, b)
    for key in whole:
        assert chunked[key] == pytest.approx(whole[key], abs=1e-12)
    with pytest.raises(ValueError, match="shape"):
        stats.tensor_discrepancy(a, b[:10])


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------


def test_mask_density_is_numel_weighted_per_group_and_step():
    frame = layers_frame([
        layer_row("r", "spider", 1, Q, 100, mask_density=1.0, mask_mean=0.8),
        layer_row("r", "spider", 1, UP, 300, mask_density=0.2, mask_mean=0.1),
        layer_row("r", "spider", 2, Q, 100, mask_density=0.5, mask_mean=0.5),
        layer_row("r", "spider", 2, UP, 300, mask_density=0.5, mask_mean=0.5),
        layer_row("r", "spider", 1, VISION_Q, 1000, mask_density=0.0, mask_mean=0.0),
        layer_row("r", "spider", 2, VISION_Q, 1000, mask_density=0.0, mask_mean=0.0),
    ])
    per_layer = stats.mask_density(frame, by=("component", "layer"))
    assert list(per_layer.columns) == ["run", "method", "step", "component", "layer",
                                       "numel", "mask_mean", "mask_density"]
    llm = per_layer[per_layer["component"] == "llm"].set_index("step")
    assert llm.loc[1, "mask_density"] == pytest.approx((100 * 1.0 + 300 * 0.2) / 400)  # 0.4
    assert llm.loc[1, "mask_mean"] == pytest.approx((80 + 30) / 400)
    assert llm.loc[2, "mask_density"] == pytest.approx(0.5)
    per_module = stats.mask_density(frame)  # default: component, layer, module
    assert len(per_module) == 6
    overall = stats.mask_density(frame, by=()).set_index("step")
    assert overall.loc[1, "mask_density"] == pytest.approx(160 / 1400)
    assert overall.loc[1, "numel"] == 1400


def test_mask_density_from_real_spider_masks(spider_tensors):
    rows = [tensor_row("r", "spider", 3, name, t["theta0"], t["theta"], mask=t["w"])
            for name, t in spider_tensors.items()]
    out = stats.mask_density(layers_frame(rows), by=("layer",)).iloc[0]
    all_w = torch.cat([t["w"].reshape(-1) for t in spider_tensors.values()])
    assert out["mask_density"] == pytest.approx(float((all_w > 0).double().mean()), abs=1e-12)
    assert out["mask_mean"] == pytest.approx(float(all_w.double().mean()), abs=1e-7)
    # ARCHITECTURE.md, *The SPIDER rule*: unrelated weights and gradients free about half of the entries
    assert 0.4 < out["mask_density"] < 0.6


# --------------------------------------------------------------------------------------------
# update size and share
# --------------------------------------------------------------------------------------------


def test_update_size_combines_norms_as_root_sum_of_squares():
    frame = layers_frame([
        layer_row("r", "full", 10, Q, 100, update_norm=3.0, update_rel_norm=0.3),  # |theta0| 10
        layer_row("r", "full", 10, UP, 300, update_norm=4.0, update_rel_norm=0.4),  # |theta0| 10
    ])
    out = stats.update_size(frame).iloc[0]
    assert out["update_norm"] == pytest.approx(5.0)
    assert out["theta0_norm"] == pytest.approx(math.sqrt(200))
    assert out["update_rel_norm"] == pytest.approx(5.0 / math.sqrt(200))
    assert list(stats.update_size(frame).columns) == [
        "run", "method", "step", "component", "layer", *stats.UPDATE_SIZE_VALUES]


def test_update_size_from_real_tensors(spider_tensors):
    rows = [tensor_row("r", "spider", 3, name, t["theta0"], t["theta"])
            for name, t in spider_tensors.items()]
    out = stats.update_size(layers_frame(rows)).iloc[0]
    delta = torch.cat([(t["theta"] - t["theta0"]).reshape(-1) for t in spider_tensors.values()])
    theta0 = torch.cat([t["theta0"].reshape(-1) for t in spider_tensors.values()])
    assert out["update_norm"] == pytest.approx(float(delta.norm()), rel=1e-6)
    assert out["update_rel_norm"] == pytest.approx(float(delta.norm() / theta0.norm()), rel=1e-6)


def test_update_size_theta0_norm_is_carried_across_steps_and_unknown_is_nan():
    frame = layers_frame([
        # step 0: nothing moved yet; ||theta0|| of Q is learnt from step 10
        layer_row("r", "spider", 0, Q, 100, update_norm=0.0, update_rel_norm=0.0),
        layer_row("r", "spider", 0, UP, 300, update_norm=0.0, update_rel_norm=0.0),
        layer_row("r", "spider", 10, Q, 100, update_norm=2.0, update_rel_norm=0.2),
        # UP never moves: its ||theta0|| is unknown, so the layer's ratio is too
        layer_row("r", "spider", 10, UP, 300, update_norm=0.0, update_rel_norm=0.0),
        layer_row("r", "spider", 10, EMBED, 50, update_norm=1.0, update_rel_norm=0.5),
    ])
    out = stats.update_size(frame).set_index(["step", "layer"])
    assert out.loc[(0, 0), "update_rel_norm"] == 0.0  # nothing moved: 0 whatever theta0 is
    assert out.loc[(10, 0), "update_norm"] == pytest.approx(2.0)
    assert math.isnan(out.loc[(10, 0), "update_rel_norm"])
    embed = out[out.index.get_level_values("layer").isna()]
    assert embed.loc[embed.index[-1], "theta0_norm"] == pytest.approx(2.0)
    # with a theta0_norm column, nothing has to be derived
    known = frame.assign(theta0_norm=[10.0, 10.0, 10.0, 10.0, 2.0])
    out = stats.update_size(known).set_index(["step", "layer"])
    assert out.loc[(10, 0), "update_rel_norm"] == pytest.approx(2.0 / math.sqrt(200))


def test_update_share_sums_to_one_per_run_and_step():
    frame = layers_frame([
        layer_row("a", "full", 10, Q, 100, update_norm=3.0),
        layer_row("a", "full", 10, UP, 300, update_norm=4.0),  # layer 0: 9 + 16 = 25
        layer_row("a", "full", 10, EMBED, 50, update_norm=5.0),  # non-block: 25
        layer_row("a", "full", 20, Q, 100, update_norm=1.0),
        layer_row("b", "spider", 10, Q, 100, update_norm=0.0),
    ])
    out = stats.update_share(frame)
    at10 = out[(out["run"] == "a") & (out["step"] == 10)].set_index("layer", drop=False)
    assert at10["update_sq"].tolist() == pytest.approx([25.0, 25.0])
    assert at10["share"].tolist() == pytest.approx([0.5, 0.5])
    assert out[(out["run"] == "a") & (out["step"] == 20)]["share"].tolist() == [1.0]
    assert math.isnan(out[out["run"] == "b"]["share"].iloc[0])  # nothing moved


def test_moved_overlap_is_the_jaccard_index_of_moved_weights():
    a = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0])
    b = torch.tensor([0.0, -1.0, 3.0, 0.0, 0.0])
    assert stats.moved_overlap(a, b) == pytest.approx(1 / 3)  # {1, 3} vs {1, 2}
    assert stats.moved_overlap(a, a) == 1.0
    assert stats.moved_overlap(a, torch.tensor([5.0, 0, 5.0, 0, 5.0])) == 0.0
    assert stats.moved_overlap(torch.zeros(3), torch.zeros(3)) == 1.0
    small = torch.tensor([0.0, 1.0, 1e-9, 2.0, 0.0])
    assert stats.moved_overlap(a, small) < 1.0
    assert stats.moved_overlap(a, small, tol=1e-6) == 1.0
    assert stats.moved_overlap(a.numpy(), b.numpy()) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="shape"):
        stats.moved_overlap(a, b[:3])


def test_moved_overlap_of_two_spider_masks_matches_sets(spider_tensors):
    t = spider_tensors[Q]
    other = keep_weight(t["theta0"], torch.randn(t["theta0"].shape,
                                                 generator=torch.Generator().manual_seed(9)))[0]
    moved_a, moved_b = t["w"] > 0, other > 0
    expected = float((moved_a & moved_b).sum()) / float((moved_a | moved_b).sum())
    assert stats.moved_overlap(t["w"], other) == pytest.approx(expected)


def test_update_cosine():
    a = torch.tensor([[1.0, 0.0]])
    assert stats.update_cosine(a, torch.tensor([[1.0, 1.0]])) == pytest.approx(1 / math.sqrt(2))
    assert stats.update_cosine(a, -3 * a) == pytest.approx(-1.0)
    assert stats.update_cosine(a, torch.tensor([[0.0, 2.0]])) == pytest.approx(0.0)
    assert math.isnan(stats.update_cosine(a, torch.zeros(1, 2)))
    generator = torch.Generator().manual_seed(4)
    x, y = torch.randn(300, 7, generator=generator), torch.randn(300, 7, generator=generator)
    xs, ys = x.double().numpy().ravel(), y.double().numpy().ravel()
    expected = xs @ ys / np.linalg.norm(xs) / np.linalg.norm(ys)
    assert stats.update_cosine(x, y) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------


def metrics_frame(scores: dict) -> pd.DataFrame:
    """{(run, method): {step: {split: value}}} -> long metrics frame."""
    rows = []
    for (run, method), by_step in scores.items():
        for step, by_split in by_step.items():
            for split, value in by_split.items():
                rows.append((run, method, step, split, "score", value))
                rows.append((run, method, step, split, "exact_match", 1.0 - value))  # noise
    return pd.DataFrame(rows, columns=list(stats.METRICS_COLUMNS))


@pytest.fixture
def metrics():
    return metrics_frame({
        ("spider-1", "spider"): {
            0: {"upstream": 0.6, "downstream": 0.2},
            50: {"upstream": 0.58, "downstream": 0.5, "idimg-idq": 0.4},
            100: {"upstream": 0.55, "downstream": 0.7, "idimg-idq": 0.9, "idimg-oodq": 0.6,
                  "oodimg-idq": 0.5, "oodimg-oodq": 0.3},
            120: {"downstream": 0.75},  # upstream not evaluated here: not the final step
        },
        ("full-1", "full"): {
            0: {"upstream": 0.6, "downstream": 0.2},
            100: {"upstream": 0.3, "downstream": 0.8},
        },
    })


def test_summary_table_from_own_step_zero(metrics):
    out = stats.summary_table(metrics).set_index("run")
    assert list(stats.summary_table(metrics).columns) == list(stats.SUMMARY_TABLE_COLUMNS)
    spider = out.loc["spider-1"]
    assert spider["step"] == 100
    assert (spider["U"], spider["D"]) == (0.55, 0.7)
    assert spider["H"] == pytest.approx(2 * 0.55 * 0.7 / 1.25)
    assert spider["E"] == pytest.approx(0.5)  # 0.7 - 0.2
    assert spider["F"] == pytest.approx(-0.05)  # 0.55 - 0.6
    assert spider["O"] == pytest.approx(0.45)
    full = out.loc["full-1"]
    assert full["H"] == pytest.approx(harmonic_mean(0.3, 0.8))
    assert full["F"] == pytest.approx(-0.3)
    assert full["method"] == "full"


def test_summary_table_with_a_base_run_or_scores(metrics):
    base_only = metrics_frame({("base", "none"): {0: {"upstream": 0.5, "downstream": 0.1}}})
    both = pd.concat([metrics, base_only], ignore_index=True)
    out = stats.summary_table(both, base="base").set_index("run")
    assert out.loc["full-1", "E"] == pytest.approx(0.7)  # 0.8 - 0.1
    assert out.loc["full-1", "F"] == pytest.approx(-0.2)  # 0.3 - 0.5
    out = stats.summary_table(metrics, base={"upstream": 0.7, "downstream": 0.0})
    assert out.set_index("run").loc["spider-1", "O"] == pytest.approx(0.7 - 0.15)
    with pytest.raises(ValueError, match="no-such-run"):
        stats.summary_table(metrics, base="no-such-run")
    with pytest.raises(ValueError, match="downstream"):
        stats.summary_table(metrics, base={"upstream": 0.5})


def test_summary_table_without_step_zero_or_any_eval_gives_nan(metrics):
    late = metrics_frame({("late", "l2"): {10: {"upstream": 0.5, "downstream": 0.5}},
                          ("empty", "dare"): {10: {"downstream": 0.5}}})
    out = stats.summary_table(pd.concat([metrics, late])).set_index("run")
    assert out.loc["late", "U"] == 0.5 and math.isnan(out.loc["late", "E"])
    assert math.isnan(out.loc["empty", "U"]) and pd.isna(out.loc["empty", "step"])


def test_summary_table_keeps_the_last_value_of_a_re_evaluated_step(metrics):
    again = metrics_frame({("full-1", "full"): {100: {"upstream": 0.4}}})
    out = stats.summary_table(pd.concat([metrics, again])).set_index("run")
    assert out.loc["full-1", "U"] == 0.4


def test_cells_table_and_summary_with_cells(metrics):
    cells = stats.cells_table(metrics)
    assert list(cells.columns) == list(stats.CELLS_COLUMNS)
    assert cells["run"].tolist() == ["spider-1"]  # full-1 scored no cell
    row = cells.iloc[0]
    assert row["step"] == 100
    assert [row[c] for c in stats.CELLS] == [0.9, 0.6, 0.5, 0.3]
    with_cells = stats.summary_table(metrics, with_cells=True).set_index("run")
    assert with_cells.loc["spider-1", "oodimg-oodq"] == 0.3
    assert math.isnan(with_cells.loc["full-1", "idimg-idq"])


def test_score_table_is_the_path_over_steps(metrics):
    path = stats.score_table(metrics)
    spider = path[path["run"] == "spider-1"]
    assert spider["step"].tolist() == [0, 50, 100]  # 120 lacks upstream
    assert spider["H"].iloc[-1] == pytest.approx(harmonic_mean(0.55, 0.7))


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def test_to_csv_round_trips(tmp_path, metrics):
    path = stats.to_csv(stats.summary_table(metrics), tmp_path / "sub" / "summary.csv")
    back = pd.read_csv(path)
    assert back["run"].tolist() == ["spider-1", "full-1"]
    assert back["E"].tolist() == pytest.approx([0.5, 0.6])
    assert [p.name for p in path.parent.iterdir()] == ["summary.csv"]  # no temp file left


def test_stream_tensor_stats_matches_torch(tmp_path):
    generator = torch.Generator().manual_seed(5)
    first = {
        UP: 0.02 * torch.randn(64, 96, generator=generator) + 0.003,
        "model.language_model.norm.weight": 1 + 1e-4 * torch.randn(256, generator=generator),
    }
    second = {
        VISION_Q: torch.randn(32, 32, generator=generator).to(torch.bfloat16),
        "mask": (torch.rand(50, 40, generator=generator) > 0.5).float(),
        # signed zeros are zeros: 0 * (negative) = -0.0 is what a pinned update looks like
        "signed_zeros": torch.tensor([0.0, -0.0, 1.0, -2.0, -0.0, 3.0]),
        # several chunks (merged across threads), in float32 and in bf16
        "big": 0.02 * torch.randn(3_000_000, generator=generator) + 0.001,
        "big_bf16": torch.randn(700_000, generator=generator).to(torch.bfloat16),
    }
    save_file(first, str(tmp_path / "a.safetensors"))
    save_file(second, str(tmp_path / "b.safetensors"))
    out = stats.stream_tensor_stats(tmp_path)  # a directory: its files, sorted
    assert list(out.columns) == list(stats.STREAM_STATS_COLUMNS)
    assert out["param"].tolist() == [*sorted(first), *sorted(second)]  # files, then names
    for name, tensor in {**first, **second}.items():
        row = out.set_index("param").loc[name]
        t = tensor.double()
        assert row["numel"] == t.numel()
        assert row["mean"] == pytest.approx(float(t.mean()), rel=1e-6, abs=1e-9)
        assert row["std"] == pytest.approx(float(t.std()), rel=1e-5)  # incl. mean >> std
        assert row["norm"] == pytest.approx(float(t.norm()), rel=1e-5)
        assert row["frac_nonzero"] == pytest.approx(float((t != 0).double().mean()))
    assert out.set_index("param").loc["signed_zeros", "frac_nonzero"] == 0.5
    # accurate on 3M entries (torch's float32 vector_norm is off by ~5e-5 here)
    big = out.set_index("param").loc["big"]
    assert big["norm"] == pytest.approx(float(second["big"].double().norm()), rel=1e-5)
    assert big["std"] == pytest.approx(float(second["big"].double().std()), rel=1e-5)
    up = out.set_index("param").loc[UP]
    assert (up["component"], up["layer"], up["module"]) == ("llm", 0, "up_proj")
    assert up["shape"] == (64, 96) and up["dtype"] == "float32"
    assert out.set_index("param").loc[VISION_Q, "dtype"] == "bfloat16"


def test_stream_tensor_stats_names_an_unreadable_file(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="broken.safetensors"):
        stats.stream_tensor_stats(bad)
    with pytest.raises(OSError, match="missing.safetensors"):
        stats.stream_tensor_stats([tmp_path / "missing.safetensors"])

"""The bundled sample runs keep what the app's first impression promises (issue 11): one per
registered method plus data-hybrid, a SPIDER sample with every trainable tensor of its final
checkpoint, and baselines that do what they exist for (scripts/make_sample_runs.sh)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from analysis.run import list_runs, load_run
from spider.methods import available_methods
from spider.metrics import harmonic_mean

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_checkpoints" / "runs"
DOWN = "model.language_model.layers.3.mlp.down_proj.weight"
KEEP_EVERY_TENSOR = ("spider", "full")  # the two runs that can be attributed by reverting
DRIFT = ("kl_to_base", "answer_type_drift", "format_errors", "content_errors")

pytestmark = pytest.mark.usefixtures("one_thread")


def _moved_share(name: str, step: int = 150) -> float:
    """Share of DOWN's entries whose saved weight differs from theta0 at ``step``."""
    return float((load_run(SAMPLES / name).tensor(step, DOWN, "delta") != 0).float().mean())


def test_every_registered_method_and_data_hybrid_has_a_finished_sample():
    listed = list_runs(SAMPLES).set_index("name")
    for method in available_methods():
        assert method in listed.index, f"no sample run for method {method}"
        row = listed.loc[method]
        assert row["method"] == method and row["ok"] and row["status"] == "done", method
    hybrid = load_run(SAMPLES / "hybrid")
    assert hybrid.method == "full" and hybrid.config["hybrid_ratio"] == 0.25
    # like for like: one seed, one dataset, one length
    configs = [load_run(SAMPLES / name).config for name in listed.index]
    assert {(c["seed"], c["data"], c["steps"]) for c in configs} == {(0, "builtin:counting", 150)}


def test_the_spider_sample_keeps_every_trainable_tensor_of_its_final_checkpoint():
    run = load_run(SAMPLES / "spider")
    final = run.steps[-1]
    layers = run.layers[run.layers["step"] == final]
    trained = set(layers["param"])  # statistics cover every trainable parameter
    assert set(run.params(final)) == trained
    # ... and every trainable parameter is there: the counts agree with run.json
    assert int(layers["numel"].sum()) == run.info["trainable"]["total"]["trainable"] > 10**6
    components = {run.layers.loc[run.layers["param"] == p, "component"].iloc[0] for p in trained}
    assert components == {"llm", "projector"}
    for param in sorted(trained):
        mask = run.tensor(final, param, "mask")
        assert mask.shape == run.theta0(param).shape, param
        assert bool(torch.isfinite(mask).all()) and 0 <= float(mask.min()) <= float(mask.max()) <= 1
        # the mask was rebuilt from the checkpoint's S, not made up: it is not constant
        assert mask.numel() == 1 or float(mask.std()) > 0, param


def test_the_other_samples_keep_the_same_few_tensors_at_the_same_steps():
    for name in sorted(p.name for p in SAMPLES.iterdir() if (p / "run.json").is_file()):
        run = load_run(SAMPLES / name)
        assert run.steps == [75, 150], name
        if name in KEEP_EVERY_TENSOR:
            assert not run.config["save_tensors"], name
            continue
        pattern = run.config["save_tensors"]
        assert pattern, name  # only a few tensors, to stay small
        trained = set(run.layers.loc[run.layers["step"] == 150, "param"])
        for step in run.steps:
            kept = set(run.params(step))
            assert kept == {p for p in trained if re.search(pattern, p)}, (name, step)
            # the last block's down projection wherever it trains (not under --train attn
            # or mlp_gate_up: those keep the last block's tensors they train)
            assert (DOWN in kept) == (DOWN in trained) and 0 < len(kept) < 10, (name, step)


def test_l2_sample_pulls_towards_theta0_unlike_full_fine_tuning():
    """At the library's default lambda = 1e-3 the L2 sample equalled full fine-tuning to 16
    digits (the penalty's gradient is divided by each tensor's size); the sample's lambda is
    one where the pull is visible in the weights and in upstream retention."""
    l2, full = load_run(SAMPLES / "l2"), load_run(SAMPLES / "full")
    assert l2.options["lam"] >= 100
    moved_l2 = float(l2.tensor(150, DOWN, "delta").norm())
    moved_full = float(full.tensor(150, DOWN, "delta").norm())
    assert moved_l2 < 0.8 * moved_full
    assert l2.summary["U"].iloc[0] > full.summary["U"].iloc[0] + 0.1


def test_hft_sample_freezes_a_new_half_each_round_unlike_random_mask():
    """One round (HFT's default) is random_mask under another seed: half of every tensor
    never moves. In rounds, each round frees another random half, so most entries move."""
    hft = load_run(SAMPLES / "hft")
    rounds = -(-150 // hft.options["round_steps"])
    assert rounds >= 3
    assert _moved_share("random_mask") == pytest.approx(0.5, abs=0.01)
    # 1 - 0.5**rounds of the entries were free at some point (a few moves round away in bf16)
    assert _moved_share("hft") > 0.75
    mask = hft.tensor(150, DOWN, "mask")
    assert float(mask.mean()) == pytest.approx(0.5, abs=0.01)  # the last round's free half


def _final_scores(run) -> dict[str, float]:
    m = run.metrics
    last = m[m["step"] == m["step"].max()]
    return {f"{r.split}.{r.metric}": r.value for r in last.itertuples()}


def test_every_sample_logs_the_output_drift_measures_at_every_evaluation():
    for name in sorted(p.name for p in SAMPLES.iterdir() if (p / "run.json").is_file()):
        m = load_run(SAMPLES / name).metrics
        upstream = m[m["split"] == "upstream"]
        steps = sorted(upstream.loc[upstream["metric"] == "score", "step"].unique())
        for metric in DRIFT:
            logged = upstream[upstream["metric"] == metric].set_index("step")["value"]
            assert sorted(logged.index) == steps, (name, metric)
            assert (logged >= 0).all(), (name, metric)
        # the base model's distributions are the reference: no drift before training
        kl = upstream[upstream["metric"] == "kl_to_base"].set_index("step")["value"]
        assert kl.loc[0] == 0 and kl.loc[steps[-1]] > 0, name


def test_the_samples_that_keep_every_tensor_carry_an_attribution_by_every_grouping():
    for name in KEEP_EVERY_TENSOR:
        run = load_run(SAMPLES / name)
        frame = run.attribution
        assert set(frame["by"]) == {"component", "layer", "module"}, name
        assert set(frame["step"]) == {150}, name
        m = run.metrics
        at = {s: m[(m["step"] == s) & (m["metric"] == "score")].set_index("split")["value"]
              for s in (0, 150)}
        for by, rows in frame.groupby("by"):
            rows = rows.set_index("group")
            # everything reverted is the base model: the step-0 evaluation, exactly
            assert rows.loc["(all)", "U"] == at[0]["upstream"], (name, by)
            assert rows.loc["(all)", "D"] == at[0]["downstream"], (name, by)
            # nothing reverted re-scores the bf16 checkpoint: the run's own evaluation at
            # step 150 up to the rounding of the saved weights (one example in a hundred)
            assert abs(rows.loc["(none)", "U"] - at[150]["upstream"]) <= 0.011, (name, by)
            assert abs(rows.loc["(none)", "D"] - at[150]["downstream"]) <= 0.011, (name, by)
            assert len(rows) >= 4, (name, by)  # (none), (all) and at least two groups


def _readme_table() -> dict[str, dict[str, str]]:
    """sample_checkpoints/README.md's table of the sample runs: run -> column -> cell."""
    text = (ROOT / "sample_checkpoints" / "README.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header[:3] == ["run", "options", "U"], header
    table = {}
    for line in rows[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip("|"))]
        match = re.fullmatch(r"`([^`]+)`", cells[0])
        if not match or len(cells) != len(header):
            break  # the end of the first table
        table[match.group(1)] = dict(zip(header, cells))
    return table


def test_the_readme_table_gives_each_sample_runs_final_scores():
    table = _readme_table()
    names = sorted(p.name for p in SAMPLES.iterdir() if (p / "run.json").is_file())
    assert sorted(table) == names
    columns = {"U": "upstream.score", "D": "downstream.score", "KL": "upstream.kl_to_base",
               "number": "upstream.answer_type_drift", "form": "upstream.format_errors",
               "content": "upstream.content_errors"}
    for name in names:
        run = load_run(SAMPLES / name)
        final = _final_scores(run)
        for column, key in columns.items():
            cell = table[name][column]
            decimals = len(cell.split(".")[1])
            assert cell == f"{final[key]:.{decimals}f}", (name, column, cell, final[key])
        h = harmonic_mean(final["upstream.score"], final["downstream.score"])
        assert table[name]["H"] == f"{h:.3f}", name

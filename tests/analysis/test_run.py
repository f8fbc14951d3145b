"""analysis.run: loading run directories, rebuilding tensors honestly, flagging damage."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from analysis import stats
from analysis.run import LIST_COLUMNS, TENSOR_KINDS, RunReadError, list_runs, load_run
from spider.errors import UserError
from spider.importance import rank
from spider.methods.spider import SpiderOptions, keep_weight
from spider.naming import parse_param_name
from spider.rundir import RunDir, process_record
from tests.sample_logs import expand_to_jsonl

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_checkpoints" / "runs"
BASE = ROOT / "sample_checkpoints" / "tiny-llava-base"
# the bundled sample runs (scripts/make_sample_runs.sh decides which); these at least
CORE_SAMPLE_RUNS = ("dare", "full", "lora", "magnitude_mask", "spider")
SAMPLE_RUNS = tuple(sorted(p.name for p in SAMPLES.iterdir() if (p / "run.json").is_file()))
DOWN = "model.language_model.layers.3.mlp.down_proj.weight"
PROJ_BIAS = "model.multi_modal_projector.linear_1.bias"

pytestmark = pytest.mark.usefixtures("one_thread")


def copy_run(tmp_path: Path, name: str, as_name: str | None = None) -> Path:
    """A writable copy of a sample run in ``tmp_path/runs`` whose relative base-model
    reference (``../../tiny-llava-base``) resolves to the real base model."""
    (tmp_path / "runs").mkdir(exist_ok=True)
    base = tmp_path / "tiny-llava-base"
    if not base.exists():
        base.symlink_to(BASE, target_is_directory=True)
    target = tmp_path / "runs" / (as_name or name)
    shutil.copytree(SAMPLES / name, target)
    info = json.loads((target / "run.json").read_text())
    info["model"]["path"] = "/nonexistent/base"  # only the relative reference may work
    info["model"].pop("repo", None)  # (not the repository-relative one either)
    (target / "run.json").write_text(json.dumps(info))
    return target


def raw_tensor(file: Path, key: str) -> torch.Tensor:
    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(key)


# --------------------------------------------------------------------------------------------
# run.json and the frames
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLE_RUNS)
def test_every_sample_run_loads_and_its_scores_agree_with_run_json(name):
    run = load_run(SAMPLES / name)
    info = json.loads((SAMPLES / name / "run.json").read_text())
    assert run.name == name and run.method == info["method"] == run.config["method"]
    assert run.status == "done" and run.steps == [75, 150]
    assert run.options == info["options"]

    metrics = run.metrics
    assert tuple(metrics.columns) == stats.METRICS_COLUMNS
    assert set(metrics["run"]) == {name} and set(metrics["method"]) == {run.method}
    assert metrics["step"].max() == 150 and metrics["step"].min() == 0
    final = metrics[(metrics["step"] == 150) & (metrics["metric"] == "score")]
    scores = dict(zip(final["split"], final["value"]))

    summary = run.summary
    assert tuple(summary.columns) == stats.SUMMARY_TABLE_COLUMNS and len(summary) == 1
    row = summary.iloc[0]
    for key in ("U", "D", "H", "E", "F", "O"):
        assert row[key] == pytest.approx(info["summary"][key], abs=1e-12), key
    assert row["U"] == scores["upstream"] and row["D"] == scores["downstream"]
    assert row["step"] == 150

    train = run.train
    assert tuple(train.columns) == (*stats.TRAIN_COLUMNS, "seconds")
    raw = [json.loads(line) for line in (SAMPLES / name / "metrics.jsonl").open()]
    seconds = [e["seconds"] for e in raw if e.get("event") == "train"]
    assert train["seconds"].tolist() == pytest.approx(seconds) and min(seconds) > 0
    assert train["step"].tolist() == list(range(1, 151))
    assert train["loss"].iloc[-1] == pytest.approx(info["progress"]["loss"])


def test_layers_columns_values_and_parsed_names():
    run = load_run(SAMPLES / "spider")
    layers = run.layers
    assert tuple(layers.columns[: len(stats.LAYERS_COLUMNS)]) == stats.LAYERS_COLUMNS
    assert "theta0_norm" in layers.columns  # extra logged columns follow
    assert str(layers["layer"].dtype) == "Int64"
    # the rows as stored (the sample's log compacted to layers.parquet), read by pyarrow alone
    raw = pq.read_table(SAMPLES / "spider" / "layers.parquet").to_pylist()
    assert len(layers) == len(raw)
    for index in (0, 17, len(raw) - 1):
        row, expected = layers.iloc[index], raw[index]
        assert row["param"] == expected["param"] and row["step"] == expected["step"]
        assert row["mask_density"] == expected["mask_density"]
        assert row["update_norm"] == expected["update_norm"]
        component, layer, module = parse_param_name(expected["param"])
        assert (row["component"], row["module"]) == (component, module)
        assert (pd.isna(row["layer"]) and layer is None) or row["layer"] == layer
    down = layers[layers["param"] == DOWN]
    assert set(down["component"]) == {"llm"} and set(down["layer"]) == {3}
    assert set(down["module"]) == {"down_proj"} and set(down["numel"]) == {160 * 448}
    assert layers.loc[layers["param"] == PROJ_BIAS, "layer"].isna().all()
    assert set(layers["step"]) == set(range(10, 151, 10))
    # stats accepts the frame as it is
    density = stats.mask_density(layers, by=("component",))
    assert set(density["component"]) == {"llm", "projector"}


def test_lora_layers_have_nan_where_the_method_has_no_notion():
    layers = load_run(SAMPLES / "lora").layers
    assert layers["mask_density"].isna().all() and layers["importance_pre_mean"].isna().all()
    assert (layers["update_norm"] > 0).all()


def test_frames_are_read_lazily_once(monkeypatch):
    reads = {"events": 0, "layers": 0}
    original_events, original_layers = RunDir.read_events, RunDir.read_layers_frame

    def count_events(self):
        reads["events"] += 1
        return original_events(self)

    def count_layers(self):
        reads["layers"] += 1
        return original_layers(self)

    monkeypatch.setattr(RunDir, "read_events", count_events)
    monkeypatch.setattr(RunDir, "read_layers_frame", count_layers)
    run = load_run(SAMPLES / "spider")
    assert run.method == "spider" and run.steps == [75, 150]
    assert reads == {"events": 0, "layers": 0}
    run.metrics, run.train, run.summary, run.metrics  # noqa: B018
    assert reads == {"events": 1, "layers": 0}  # one read serves metrics, train and summary
    run.layers, run.layers  # noqa: B018
    assert reads == {"events": 1, "layers": 1}
    run.refresh().metrics  # noqa: B018
    assert reads["events"] == 2


def test_a_running_run_with_a_torn_last_line_loads(tmp_path):
    path = copy_run(tmp_path, "spider")
    info = json.loads((path / "run.json").read_text())
    info.update(status="running", **process_record())  # this process: alive
    (path / "run.json").write_text(json.dumps(info))
    with open(path / "metrics.jsonl", "a") as handle:
        handle.write('{"event": "eval", "step": 160, "split": "upstr')
    run = load_run(path)
    assert run.status == "running" and run.metrics["step"].max() == 150
    listed = list_runs(path)
    assert listed["ok"].tolist() == [True] and listed["problem"].tolist() == [""]


def test_a_bad_middle_line_names_the_file(tmp_path):
    path = copy_run(tmp_path, "full")
    lines = (path / "metrics.jsonl").read_text().splitlines()
    lines[3] = lines[3][:10]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run = load_run(path)
    with pytest.raises(RunReadError, match=r"metrics\.jsonl line 4"):
        run.metrics  # noqa: B018
    assert run.steps == [75, 150]  # the rest of the run still reads
    assert run.tensor(75, DOWN, "weight").shape == (160, 448)


def test_a_row_missing_a_field_names_the_file(tmp_path):
    path = copy_run(tmp_path, "spider")
    with open(expand_to_jsonl(path), "a") as handle:
        handle.write('{"step": 160, "numel": 3}\n')  # valid JSON, no "param"
    run = load_run(path)
    with pytest.raises(RunReadError, match=r"layers\.jsonl has malformed rows"):
        run.layers  # noqa: B018
    evals = (path / "metrics.jsonl").read_text().count('"event": "eval"')
    assert len(run.metrics) == evals > 0  # the other frames still read


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "not an object"),
    ('{"status": "done"}', "no 'config' object"),
])
def test_load_run_rejects_a_bad_run_json_naming_it(tmp_path, content, message):
    (tmp_path / "run.json").write_text(content)
    with pytest.raises(RunReadError, match=message) as error:
        load_run(tmp_path)
    assert str(tmp_path / "run.json") in str(error.value)


def test_load_run_rejects_what_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_run(tmp_path / "missing")
    with pytest.raises(UserError, match="no run.json"):
        load_run(tmp_path)


# --------------------------------------------------------------------------------------------
# Tensors from the sample runs
# --------------------------------------------------------------------------------------------


def test_weight_and_delta_are_the_checkpoint_tensor_and_its_difference_from_theta0():
    run = load_run(SAMPLES / "spider")
    checkpoint = SAMPLES / "spider" / "checkpoints" / "step-000075"
    stored = raw_tensor(checkpoint / "weights.safetensors", DOWN)
    assert stored.dtype == torch.bfloat16  # the sample runs save bf16
    weight = run.tensor(75, DOWN, "weight")
    assert weight.dtype == torch.float32 and torch.equal(weight, stored.float())

    theta0 = raw_tensor(BASE / "model.safetensors",
                        "language_model.model.layers.3.mlp.down_proj.weight")
    assert torch.equal(run.theta0(DOWN), theta0)
    delta = run.tensor(75, DOWN, "delta")
    # like with like: theta0 rounded to the saved dtype, so unmoved entries are exactly 0
    assert torch.equal(delta, stored.float() - theta0.to(torch.bfloat16).float())
    assert torch.allclose(delta, weight - theta0, atol=float(theta0.abs().max()) * 2**-8)


def test_pinned_weights_have_exactly_zero_delta_under_the_magnitude_mask():
    run = load_run(SAMPLES / "magnitude_mask")
    mask, delta = run.tensor(150, DOWN, "mask"), run.tensor(150, DOWN, "delta")
    pinned = raw_tensor(SAMPLES / "magnitude_mask" / "checkpoints" / "step-000150" /
                        "method.safetensors", f"pinned/{DOWN}")
    assert torch.equal(mask, (~pinned).float())
    assert float(mask.mean()) == 0.5
    assert torch.count_nonzero(delta[mask == 0]) == 0  # pinned: exactly theta0
    assert float((delta[mask == 1] != 0).float().mean()) > 0.95  # the free half moved


def test_spider_importances_are_the_ranks_training_used():
    run = load_run(SAMPLES / "spider")
    theta0 = run.theta0(DOWN)
    grad_sum = raw_tensor(SAMPLES / "spider" / "checkpoints" / "step-000150" /
                          "method.safetensors", f"grad_sum/{DOWN}")
    assert torch.equal(run.tensor(150, DOWN, "importance_pre"), rank(theta0))
    assert torch.equal(run.tensor(150, DOWN, "importance_ft"), rank(grad_sum.float()))
    w, _ = keep_weight(theta0, grad_sum.float(), SpiderOptions())
    assert torch.equal(run.tensor(150, DOWN, "mask"), w)


def test_spider_masks_rebuilt_from_bf16_checkpoints_match_the_logged_statistics():
    """Training logged mask statistics from float32 S at step 150; the checkpoint keeps S in
    bf16. The rebuilt masks must agree to the rounding of S (a few entries near G = I)."""
    run = load_run(SAMPLES / "spider")
    logged = run.layers[run.layers["step"] == 150].set_index("param")
    for param in run.params(150):
        w = run.tensor(150, param, "mask").double()
        assert float((w > 0).double().mean()) == pytest.approx(
            logged.loc[param, "mask_density"], abs=1e-3), param
        assert float(w.mean()) == pytest.approx(logged.loc[param, "mask_mean"], abs=1e-3), param


def test_dare_mask_is_all_ones_before_finalize_and_the_kept_set_after():
    run = load_run(SAMPLES / "dare")
    assert torch.equal(run.tensor(75, DOWN, "mask"), torch.ones(160, 448))
    final = run.tensor(150, DOWN, "mask")
    kept = raw_tensor(SAMPLES / "dare" / "checkpoints" / "step-000150" / "method.safetensors",
                      f"kept/{DOWN}")
    assert torch.equal(final, kept.float())
    assert 0.08 < float(final.mean()) < 0.12  # p_drop = 0.9


@pytest.mark.parametrize("name, kind, message", [
    ("full", "mask", "method 'full' .* has no mask"),
    ("lora", "mask", "method 'lora' .* has no mask"),
    ("l2", "importance_ft", "method 'l2' .* has no importance_ft"),
    ("magnitude_mask", "importance_pre", "method 'magnitude_mask' .* has no importance_pre"),
])
def test_kinds_a_method_does_not_have_are_clear_errors(name, kind, message):
    run = load_run(SAMPLES / name)
    with pytest.raises(ValueError, match=message):
        run.tensor(150, DOWN, kind)
    assert run.tensor(150, DOWN, "delta").shape == (160, 448)  # delta works for every method


def test_bad_requests_are_clear_errors():
    run = load_run(SAMPLES / "spider")
    with pytest.raises(ValueError, match=r"no checkpoint at step 7.*steps: 75, 150"):
        run.tensor(7, DOWN, "weight")
    with pytest.raises(ValueError, match="unknown tensor kind 'grad'; choose from mask"):
        run.tensor(75, DOWN, "grad")
    with pytest.raises(ValueError, match=r"parameter 'bogus' does not exist in the model of "
                       r"run spider"):
        run.tensor(75, "bogus", "delta")
    with pytest.raises(ValueError, match=f"does not exist.*did you mean {DOWN}"):
        run.tensor(75, DOWN[:-1], "delta")
    # a name that does not exist is not blamed on the save_tensors regex, whether it would
    # match the regex or not
    for typo in (DOWN.replace("weight", "weigth"), DOWN.replace("layers.3", "layers.0")
                 .replace("weight", "weigth")):
        with pytest.raises(ValueError, match=r"does not exist.*did you mean") as info:
            run.tensor(75, typo, "weight")
        assert "regex" not in str(info.value)
    with pytest.raises(ValueError, match=r"was not trained in run spider"):
        run.tensor(75, "model.vision_tower.embeddings.patch_embedding.weight",
                   "weight")
    assert set(TENSOR_KINDS) == {"mask", "importance_pre", "importance_ft", "delta", "weight"}


def test_a_parameter_left_out_by_save_tensors_names_the_regex(tmp_path):
    from safetensors.torch import load_file, save_file

    path = copy_run(tmp_path, "spider")
    checkpoint = path / "checkpoints" / "step-000075"
    pattern = r"layers\.3\."
    weights = load_file(checkpoint / "weights.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.3." in k},
              checkpoint / "weights.safetensors")
    meta = json.loads((checkpoint / "meta.json").read_text())
    (checkpoint / "meta.json").write_text(json.dumps({**meta, "save_tensors": pattern}))
    run = load_run(path)
    with pytest.raises(ValueError, match=r"not saved in checkpoint step 75.*save_tensors regex"):
        run.tensor(75, "model.language_model.layers.0.mlp.down_proj.weight", "weight")
    assert run.tensor(75, DOWN, "weight").shape == (160, 448)


def test_a_truncated_checkpoint_file_is_named_and_other_steps_still_load(tmp_path):
    path = copy_run(tmp_path, "spider")
    damaged = path / "checkpoints" / "step-000075" / "weights.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:5000])
    run = load_run(path)
    with pytest.raises(RunReadError, match="damaged or not safetensors") as error:
        run.tensor(75, DOWN, "weight")
    assert str(damaged) in str(error.value)
    assert run.tensor(150, DOWN, "weight").shape == (160, 448)

    method_file = path / "checkpoints" / "step-000150" / "method.safetensors"
    method_file.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(RunReadError) as error:
        run.tensor(150, DOWN, "mask")
    assert str(method_file) in str(error.value)
    assert run.tensor(150, DOWN, "delta").shape == (160, 448)  # needs no method file


def test_a_missing_base_model_is_named(tmp_path):
    path = copy_run(tmp_path, "spider")
    (tmp_path / "tiny-llava-base").unlink()
    run = load_run(path)
    assert len(run.metrics) > 0  # frames need no base model
    with pytest.raises(RunReadError, match="base model of run .* is not at"):
        run.tensor(75, DOWN, "delta")


# --------------------------------------------------------------------------------------------
# Honesty: the rebuilt tensors are what the trainer's live method holds
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh_spider_run(tmp_path_factory):
    """A 3-step SPIDER ablation run (no normalisation, S = sum |grad|), float32 checkpoints,
    trained in-process by ``spider.train.train``; evaluation is stubbed (scores are not what
    this checks). Returns ``(run directory, live)`` where ``live.method`` is the trainer's
    method and ``live.theta0`` its weights before training."""
    torch.set_num_threads(1)
    from types import SimpleNamespace

    import spider.train
    from spider.hooks import Evaluator
    from spider.train import RunConfig, train

    live = SimpleNamespace()

    def quiet_evaluate(self, step):
        scores = {"upstream": 0.5, "downstream": 0.1 + step / 100}
        self.run.append_events([
            {"event": "eval", "step": step, "split": split, "metric": "score",
             "value": value, "n": 1} for split, value in scores.items()])
        return scores

    def keep_method(*args, **kwargs):
        model = load(*args, **kwargs)
        live.method = model.method
        live.theta0 = {n: t.detach().clone()
                       for n, t in model.method.effective_weights().items()}
        return model

    load = spider.train.load_model_and_method
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Evaluator, "evaluate", quiet_evaluate)
        patch.setattr(spider.train, "load_model_and_method", keep_method)
        out = tmp_path_factory.mktemp("fresh") / "run"
        cfg = RunConfig(output_dir=str(out), model=str(BASE), steps=3, eval_every=2,
                        save_every=2, log_every=1, eval_limit=1, batch_size=2, train_size=8,
                        warmup_steps=0, lr=1e-2,
                        options={"normalize": "false", "accumulate": "abs"},
                        save_dtype="float32", device="cpu")
        train(cfg)
    return out, live


def test_rebuilt_masks_and_importances_equal_the_live_method(fresh_spider_run):
    path, runner = fresh_spider_run
    run = load_run(path)
    assert run.steps == [2, 3] and run.options["normalize"] is False
    live = runner.method
    # the analysis rebuilds by the plain formulas (analysis.run, _rebuild); the fused passes
    # training took agree with them to float rounding only (tests/spider/methods/test_spider.py)
    live.fused = False
    masks, importances = live.masks(), live.importances()
    checked = 0
    for param in run.params(3):
        w = run.tensor(3, param, "mask")
        assert torch.equal(w, masks[param]), param
        assert torch.equal(run.tensor(3, param, "importance_pre"), importances[param]["pre"])
        assert torch.equal(run.tensor(3, param, "importance_ft"), importances[param]["ft"])
        checked += 1
    assert checked == len(live.params) > 20
    # The test can tell: the default options give another mask for this run.
    grad_sum = live.grad_sum[DOWN]
    default, _ = keep_weight(live.theta0[DOWN], grad_sum, SpiderOptions())
    assert not torch.equal(default, masks[DOWN])
    assert float(masks[DOWN].max()) < 1.0  # unnormalised G/(I+G) never reaches 1


def test_fresh_run_weights_deltas_and_theta0_names_match_the_trainer(fresh_spider_run):
    path, runner = fresh_spider_run
    run = load_run(path)
    weights = runner.method.effective_weights()
    for param in run.params(3):
        theta0 = run.theta0(param)
        assert torch.equal(theta0, runner.theta0[param]), param  # on-disk names mapped right
        weight = run.tensor(3, param, "weight")
        assert torch.equal(weight, weights[param].float())
        assert torch.equal(run.tensor(3, param, "delta"), weight - theta0.float())
    assert run.summary["D"].iloc[0] == pytest.approx(0.13)
    assert run.summary["E"].iloc[0] == pytest.approx(0.03)


V1_RUN = Path(__file__).resolve().parent / "fixtures" / "run-v1-dare"


def test_a_run_of_the_previous_format_still_loads(tmp_path):
    """Schema version 1 (no 'finalized' in checkpoint metadata, no process record): a
    trimmed copy of the DARE sample run as that version wrote it."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "tiny-llava-base").symlink_to(BASE, target_is_directory=True)
    path = tmp_path / "runs" / "dare"
    shutil.copytree(V1_RUN, path)
    assert json.loads((path / "run.json").read_text()).get("schema_version") == 1
    run = load_run(path)
    assert run.status == "done" and run.steps == [75, 150]
    assert [RunDir(path).checkpoint_meta(s).finalized for s in run.steps] == [False, True]
    bias = "model.multi_modal_projector.linear_2.bias"
    assert run.params(150) == ["model.multi_modal_projector.linear_1.bias", bias]
    assert torch.equal(run.tensor(75, bias, "mask"), torch.ones(160))  # before finalize
    kept = raw_tensor(path / "checkpoints" / "step-000150" / "method.safetensors",
                      f"kept/{bias}")
    assert torch.equal(run.tensor(150, bias, "mask"), kept.float())  # after it
    assert 0 < float(kept.float().mean()) < 0.5
    assert set(run.layers["param"]) == set(run.params(150)) and not run.metrics.empty
    listed = list_runs(tmp_path / "runs")
    assert listed["ok"].all() and listed["status"].tolist() == ["done"]


V2_RUN = Path(__file__).resolve().parent / "fixtures" / "run-v2-spider"


def test_a_schema_2_run_written_before_the_statistics_vocabulary_still_loads(tmp_path):
    """A trimmed copy of the SPIDER sample run as schema 2 wrote it before mask_churn was
    logged: it loads, its layers frame has every column (NaN for the new one), and the
    layer tables and heatmaps the pages draw come out of it."""
    from analysis import explore

    (tmp_path / "runs").mkdir()
    (tmp_path / "tiny-llava-base").symlink_to(BASE, target_is_directory=True)
    path = tmp_path / "runs" / "spider"
    shutil.copytree(V2_RUN, path)
    assert json.loads((path / "run.json").read_text())["schema_version"] == 2
    run = load_run(path)
    assert run.status == "done" and run.steps == [75, 150]
    layers = run.layers
    assert "mask_churn" not in RunDir(path).read_layers()[0]
    assert layers["mask_churn"].isna().all() and layers["mask_density"].notna().all()
    bias = "model.multi_modal_projector.linear_2.bias"
    mask = run.tensor(150, bias, "mask")
    row = layers[(layers["step"] == 150) & (layers["param"] == bias)].iloc[0]
    assert row["mask_mean"] == pytest.approx(float(mask.double().mean()), abs=1e-3)
    for value in explore.MATRIX_VALUES:
        matrix = explore.layer_step_matrix(layers, value)
        assert len(matrix) and (matrix[value].notna().any() or value == "mask_churn")
    assert not explore.layer_table(layers).empty
    listed = list_runs(tmp_path / "runs")
    assert listed["ok"].all() and listed["status"].tolist() == ["done"]


def _methods():
    from spider.methods import available_methods

    return available_methods()


@pytest.mark.parametrize("method", _methods())
def test_layers_statistics_agree_with_the_checkpoint_of_their_step(method, tmp_path):
    """What the layers table says about a step is what that step's checkpoint holds, for
    every method: before and after a post-hoc method's finalize (the last step)."""
    import spider.train

    out = tmp_path / "run"
    spider.train.main(["--output-dir", str(out), "--model", str(BASE), "--method", method,
                       "--steps", "4", "--log-every", "2", "--save-every", "2",
                       "--eval-every", "4", "--eval-limit", "1", "--batch-size", "2",
                       "--train-size", "8", "--train", "llm", "--train-last-layers", "1",
                       "--device", "cpu", "--lr", "1e-2", "--warmup-steps", "0"])
    run = load_run(out)
    assert run.steps == [2, 4]
    metas = {step: RunDir(out).checkpoint_meta(step) for step in run.steps}
    assert not metas[2].finalized and metas[4].finalized
    layers = run.layers
    checked = 0
    for step in run.steps:
        rows = layers[layers["step"] == step].set_index("param")
        assert set(rows.index) == set(run.params(step))
        for param in run.params(step):
            row = rows.loc[param]
            delta = run.tensor(step, param, "delta")
            assert row["update_norm"] == pytest.approx(float(delta.double().norm()),
                                                       rel=1e-5, abs=1e-9), (step, param)
            try:
                mask = run.tensor(step, param, "mask")
            except UserError:
                assert np.isnan(row["mask_mean"]) or row["mask_mean"] == 1.0
                continue
            assert row["mask_mean"] == pytest.approx(float(mask.double().mean()), abs=1e-6), \
                (step, param)
            assert row["mask_density"] == pytest.approx(float((mask > 0).double().mean()),
                                                        abs=1.5 / mask.numel()), (step, param)
            checked += 1
    from analysis.tensors import available_kinds

    if "mask" in available_kinds(method):  # not full, lora, l2, lwf: no per-weight mask
        assert checked > 0


# --------------------------------------------------------------------------------------------
# list_runs
# --------------------------------------------------------------------------------------------


def test_list_runs_over_the_samples():
    listed = list_runs(SAMPLES.parent)
    assert tuple(listed.columns) == LIST_COLUMNS
    assert sorted(listed["name"]) == sorted(SAMPLE_RUNS)
    assert set(CORE_SAMPLE_RUNS) <= set(SAMPLE_RUNS)
    assert listed["ok"].all() and (listed["problem"] == "").all()
    assert (listed["steps"] == 150).all() and (listed["checkpoints"] == 2).all()
    for row in listed.itertuples():
        info = json.loads((Path(row.path) / "run.json").read_text())
        assert row.method == info["method"] and row.status == "done"
        assert row.data == "builtin:counting"
        for key in ("U", "D", "H"):
            assert getattr(row, key) == pytest.approx(info["summary"][key], abs=1e-12)


def test_list_runs_flags_damaged_runs_and_never_raises(tmp_path):
    copy_run(tmp_path, "spider", "good")
    (copy_run(tmp_path, "full", "bad_json") / "run.json").write_text('{"config": ')
    truncated = copy_run(tmp_path, "l2", "truncated") / "checkpoints" / "step-000150"
    (truncated / "weights.safetensors").write_bytes(
        (truncated / "weights.safetensors").read_bytes()[:999])
    torn = copy_run(tmp_path, "lora", "torn_metrics") / "metrics.jsonl"
    torn.write_bytes(torn.read_bytes()[:-25])
    no_base = copy_run(tmp_path, "dare", "no_base")
    info = json.loads((no_base / "run.json").read_text())
    info["model"] = {"path": "/nowhere/base", "relative": "../../nowhere"}
    (no_base / "run.json").write_text(json.dumps(info))
    # a run's checkpoints/ is not searched for runs
    (no_base / "checkpoints" / "run.json").write_text("{}")

    listed = list_runs(tmp_path).set_index("name")
    assert sorted(listed.index) == ["bad_json", "good", "no_base", "torn_metrics", "truncated"]
    assert listed["ok"].to_dict() == {"bad_json": False, "good": True, "no_base": False,
                                      "torn_metrics": False, "truncated": False}
    problems = listed["problem"]
    assert problems["good"] == ""
    assert "bad_json/run.json" in problems["bad_json"] and "not valid JSON" in problems["bad_json"]
    assert "truncated/checkpoints/step-000150/weights.safetensors" in problems["truncated"]
    assert "torn_metrics/metrics.jsonl" in problems["torn_metrics"]
    assert "cut-off line" in problems["torn_metrics"]
    assert "base model" in problems["no_base"] and "/nowhere/base" in problems["no_base"]
    # what could be read is still listed
    assert listed.loc["truncated", "method"] == "l2" and listed.loc["truncated", "checkpoints"] == 2
    assert math.isnan(listed.loc["bad_json", "U"]) and listed.loc["good", "U"] > 0.5
    assert listed.loc["no_base", "U"] == pytest.approx(0.6401627756671745)


def test_a_run_whose_process_is_gone_is_listed_as_stopped_unexpectedly(tmp_path):
    import subprocess
    import sys

    from spider.rundir import STOPPED_UNEXPECTEDLY, process_record

    path = copy_run(tmp_path, "spider")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    record = process_record(child.pid)
    child.wait()
    info = json.loads((path / "run.json").read_text())
    info.update(status="running", **record)
    (path / "run.json").write_text(json.dumps(info))
    assert load_run(path).status == STOPPED_UNEXPECTEDLY
    row = list_runs(tmp_path / "runs").set_index("name").loc["spider"]
    assert row["status"] == STOPPED_UNEXPECTEDLY and row["ok"]
    info.update(process_record())  # this process: alive
    (path / "run.json").write_text(json.dumps(info))
    assert load_run(path).status == "running"


def test_list_runs_of_a_missing_root_names_it(tmp_path):
    with pytest.raises(UserError, match=f"runs folder {tmp_path / 'nope'} does not exist"):
        list_runs(tmp_path / "nope")
    empty = list_runs(tmp_path)
    assert empty.empty and tuple(empty.columns) == LIST_COLUMNS


def test_list_columns_have_stable_dtypes():
    listed = list_runs(SAMPLES / "spider")
    assert listed["ok"].dtype == bool and str(listed["steps"].dtype) == "Int64"
    assert listed["U"].dtype == np.float64

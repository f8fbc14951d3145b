"""The time estimate of the Train page (``app.watch.estimate``; issue 23, item 3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from app import watch
from spider.rundir import RunDir

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"


def _fake_run(folder: Path, model: dict, eval_seconds: float, scored: dict[str, int],
              eval_limit: int = 100) -> Path:
    run = RunDir(folder)
    run.write_run({"config": {"batch_size": 16, "eval_limit": eval_limit}, "model": model,
                   "device": "cpu", "status": "done",
                   "progress": {"step": 4, "steps": 4, "eval_seconds": eval_seconds}})
    events = [{"event": "train", "step": s, "loss": 1.0, "lr": 1e-4, "seconds": 0.5}
              for s in (1, 2, 3, 4)]
    events += [{"event": "eval", "step": step, "split": split, "metric": "score", "value": 0.5,
                "n": n} for step in (0, 4) for split, n in scored.items()]
    run.append_events(events)
    return folder


def test_the_bundled_samples_give_the_estimate_in_a_fresh_clone(tmp_path):
    """The samples' run.json names the model by the absolute path of the machine that made
    them; a clone elsewhere finds it by the reference relative to the run."""
    clone = tmp_path / "clone" / "sample_checkpoints"
    (clone / "tiny-llava-base").mkdir(parents=True)
    shutil.copy(SAMPLES / "tiny-llava-base" / "config.json", clone / "tiny-llava-base")
    shutil.copytree(SAMPLES / "runs" / "spider", clone / "runs" / "spider",
                    ignore=shutil.ignore_patterns("checkpoints", "resume", "*.safetensors"))
    info = json.loads((clone / "runs" / "spider" / "run.json").read_text())
    assert info["model"]["relative"] == "../../tiny-llava-base"
    info["model"]["path"] = "/some/other/machine/sample_checkpoints/tiny-llava-base"
    (clone / "runs" / "spider" / "run.json").write_text(json.dumps(info))
    found = watch.estimate(clone / "tiny-llava-base", 150, 16, 50, 100,
                           [clone / "runs" / "spider"], "cpu")
    assert found is not None and "from 1 earlier run of this model" in found.basis
    # 150 steps at the sample's own pace, 4 evaluations of the sample's own length
    assert abs(found.seconds - (150 * _median_step(info, clone / "runs" / "spider")
                                + 4 * info["progress"]["eval_seconds"])) < 1e-6


def _median_step(info: dict, run: Path) -> float:
    import statistics

    return statistics.median(e["seconds"] for e in RunDir(run).read_events()
                             if e.get("event") == "train")


def test_an_evaluation_costs_its_examples_actually_scored_per_split(tmp_path):
    """Per-example time times the examples an evaluation will score: a split smaller than
    the limit is scored whole, never scaled up to the limit."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    ref = {"path": str(model)}
    scored = {"upstream": 100, "downstream": 100, "small": 30}  # 230 examples in 10 s
    run = _fake_run(tmp_path / "run", ref, 10.0, scored)
    same = watch.estimate(model, 4, 16, 4, 100, [run], "cpu")
    assert abs(same.seconds - (4 * 0.5 + 2 * 10.0)) < 1e-9  # the same limit: its own time
    half = watch.estimate(model, 4, 16, 4, 50, [run], "cpu")
    assert abs(half.seconds - (4 * 0.5 + 2 * 10.0 / 230 * (50 + 50 + 30))) < 1e-9
    more = watch.estimate(model, 4, 16, 4, 1000, [run], "cpu")
    assert abs(more.seconds - (4 * 0.5 + 2 * 10.0 / 230 * (1000 + 1000 + 30))) < 1e-9
    # a run of another model, or on another device, is not gone by
    assert watch.estimate(tmp_path, 4, 16, 4, 100, [run], "cpu") is None
    assert watch.estimate(model, 4, 16, 4, 100, [run], "cuda") is None

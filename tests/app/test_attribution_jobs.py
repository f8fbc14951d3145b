"""The Train page's attribution jobs (``app.jobs.queue_attribution``): a finished run's
``python -m analysis.attribute`` queued, run by the supervisor with an argument list, its
state and log shown apart from the training runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import analysis
from analysis import attribute
from app import jobs
from spider.errors import UserError

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints" / "runs"


def _done_run(root: Path, name: str = "finished") -> Path:
    path = root / name
    shutil.copytree(SAMPLES / "full", path)
    info = json.loads((path / "run.json").read_text())
    info["model"]["path"] = str(SAMPLES.parent / "tiny-llava-base")
    info["model"].pop("relative", None)
    (path / "run.json").write_text(json.dumps(info))
    (path / "attribution.jsonl").unlink(missing_ok=True)
    return path


def test_groupings_are_the_clis():
    assert jobs.ATTRIBUTE_BY == tuple(attribute.BY)


def test_an_attribution_job_runs_through_the_queue(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = tmp_path / "runs"
    root.mkdir()
    run = _done_run(root)
    job = jobs.queue_attribution(root, run, "component", eval_limit=2,
                                 start_supervisor=False)
    assert job.command(root)[1:] == ["-m", "analysis.attribute", str(run.resolve()),
                                     "--by", "component", "--eval-limit", "2"]
    [view] = jobs.attribution_jobs(root)
    assert (view.name, view.state, view.target) == (job.name, "queued", run.resolve())
    # the training views leave it out: it is no run
    assert jobs.jobs_overview(root) == [] and jobs.ended_before_run(root) == []
    assert jobs.work_queue(root) == 1
    [view] = jobs.attribution_jobs(root)
    assert view.state == "done", view.log.read_text()[-2000:]
    assert "analysis.attribute" in view.log.read_text()
    frame = analysis.load_run(run).attribution
    assert set(frame["by"]) == {"component"} and "(none)" in set(frame["group"])
    assert jobs.jobs_overview(root) == [] and jobs.ended_before_run(root) == []
    assert [p.name for p in jobs.iter_user_runs(root)] == ["finished"]


def test_only_a_finished_run_is_queued_and_a_failure_has_its_error(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    run = _done_run(root)
    with pytest.raises(UserError, match="--by must be one of"):
        jobs.queue_attribution(root, run, "tensor", start_supervisor=False)
    with pytest.raises(UserError, match="not a run directory"):
        jobs.queue_attribution(root, tmp_path, "layer", start_supervisor=False)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "cancelled"}))
    with pytest.raises(UserError, match="only a finished run"):
        jobs.queue_attribution(root, run, "layer", start_supervisor=False)
    (run / "run.json").write_text(json.dumps(info))
    shutil.rmtree(run / "checkpoints")  # nothing to revert: the CLI says so and exits 2
    jobs.queue_attribution(root, run, "layer", start_supervisor=False)
    jobs.work_queue(root)
    [view] = jobs.attribution_jobs(root)
    assert view.state == "failed" and view.error and view.error.startswith("error:")

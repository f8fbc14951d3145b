"""The Train page's job logic (``app.jobs``) with real runner processes on tiny runs.

Every wait is for the event itself (a file, a status, a process ending), with a deadline
that only matters when something is broken.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app import jobs
from spider import rundir
from spider.rundir import RunDir

# A run of a few seconds (most of it loading the model and evaluating 4 examples per split).
TINY = {"steps": 3, "eval_every": 3, "eval_limit": 4, "batch_size": 4, "train_size": 32,
        "save_every": 3, "device": "cpu"}
# Long enough to be stopped in the middle: a checkpoint every 2 steps.
LONG = {**TINY, "steps": 150, "save_every": 2, "eval_every": 150, "log_every": 2}


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A user runs root; every runner left alive by a failing test is killed at the end."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    root = tmp_path / "runs"
    root.mkdir()
    yield root
    for record in jobs.active_records(root):
        if jobs.process_alive(record.get("pid"), record.get("pid_start")):
            os.killpg(record["pid"], signal.SIGKILL)


def wait_until(predicate, timeout: float = 240.0, what: str = "the event"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def status(root: Path, name: str) -> str:
    return jobs.run_status(root / name)


def ended(root: Path, name: str) -> dict | None:
    record = jobs.ended_record(root, name)
    return record if record and "returncode" in record else None


def test_launch_runs_queued_jobs_one_after_another_without_a_browser(root):
    first, second = jobs.launch(root, [{**TINY, "method": "full", "name": "a"},
                                       {**TINY, "method": "spider", "name": "b"}])
    assert (first.name, second.name) == ("a", "b")
    assert [v.name for v in jobs.jobs_overview(root)][:2] == ["a", "b"]
    wait_until(lambda: ended(root, "b"), what="both queued runs to end")

    a, b = ended(root, "a"), ended(root, "b")
    assert a["returncode"] == 0 and b["returncode"] == 0
    assert a["ended"] <= b["started"]  # the second started only after the first ended
    for name, method in (("a", "full"), ("b", "spider")):
        info = RunDir(root / name).read_run()
        assert info["status"] == "done" and info["method"] == method
        assert info["config"]["steps"] == 3
        assert status(root, name) == "done"
        log = (root / name / jobs.LOG_NAME).read_text()
        assert "step 3/3" in log and "spider.train" in log  # the runner's output, moved in
    assert not jobs.pending_jobs(root) and not jobs.active_records(root)
    assert not jobs.anything_running(root)
    wait_until(lambda: not jobs.supervisor_running(root), 30, "the supervisor to exit")


def _claim_all(root: str, out: str) -> None:
    claimed = []
    while (job := jobs.claim_next(root)) is not None:
        claimed.append(job.name)
    Path(out).write_text(json.dumps(claimed))


def test_two_claimers_never_take_the_same_job(root, tmp_path):
    names = [jobs.reserve_name(root, f"job{i:02d}") for i in range(40)]
    for name in names:
        jobs.enqueue(root, name, ["--steps", "1"])
    assert [j.name for j in jobs.pending_jobs(root)] == names  # queue order = enqueue order
    ctx = multiprocessing.get_context("fork")  # the claimers only touch files
    outs = [tmp_path / f"claimed{i}.json" for i in range(3)]
    procs = [ctx.Process(target=_claim_all, args=(str(root), str(out))) for out in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    claimed = [name for out in outs for name in json.loads(out.read_text())]
    assert sorted(claimed) == names  # every job claimed exactly once
    assert len(set(claimed)) == len(claimed)
    assert not jobs.pending_jobs(root)


def test_names_are_taken_once(root):
    assert jobs.reserve_name(root, "run") == "run"
    assert jobs.reserve_name(root, "run") == "run-2"
    (root / "x").mkdir()
    assert jobs.reserve_name(root, "x") == "x-2"
    with pytest.raises(jobs.UserError, match="letters, digits"):
        jobs.reserve_name(root, "../escape")
    jobs.enqueue(root, "run", [])
    with pytest.raises(jobs.UserError, match="already queued"):
        jobs.enqueue(root, "run", [])


def test_a_dead_or_reused_pid_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not jobs.process_alive(child.pid)  # gone
    mine = jobs.process_start_time(os.getpid())
    assert jobs.process_alive(os.getpid(), mine)
    assert not jobs.process_alive(os.getpid(), mine + 1)  # same pid, another process


def _fake_run(root: Path, name: str, **info) -> Path:
    run = root / name
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": {}, "method": "full",
                                              "status": "running", **info}))
    return run


def test_a_running_run_whose_process_is_gone_stopped_unexpectedly(root):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = _fake_run(root, "dead", pid=child.pid)
    assert jobs.run_status(dead) == jobs.STOPPED_UNEXPECTEDLY
    alive = _fake_run(root, "alive", pid=os.getpid())
    assert jobs.run_status(alive) == "running"
    with pytest.raises(jobs.UserError, match="is running; only a cancelled"):
        jobs.resume(root, "alive", start_supervisor=False)
    job = jobs.resume(root, "dead", start_supervisor=False)
    assert job.resume and job.command(root)[-1] == "--resume"


def test_a_job_whose_runner_was_replaced_by_another_process_shows_stopped(root):
    """An active record whose pid now belongs to another process (start time differs)."""
    name = jobs.reserve_name(root, "reused")
    jobs.enqueue(root, name, [])
    job = jobs.claim_next(root)
    record = {**job.to_json(), "pid": os.getpid(),
              "pid_start": jobs.process_start_time(os.getpid()) + 7, "log": ""}
    (root / ".queue" / "active" / f"{name}.json").write_text(json.dumps(record))
    _fake_run(root, name, pid=os.getpid(), pid_start_time=record["pid_start"])
    view = next(v for v in jobs.jobs_overview(root) if v.name == name)
    assert view.state == jobs.STOPPED_UNEXPECTEDLY
    assert not jobs.anything_running(root)


def test_a_resumed_job_is_starting_while_run_json_is_still_the_cancelled_attempts(root):
    """Issue 23: after Resume, the runner loads the model before it rewrites run.json, which
    still says ``cancelled`` (with the old pid). The job is starting, and the page keeps
    refreshing; it follows run.json once the runner has written its own pid there."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    _fake_run(root, "again", status="cancelled", pid=child.pid)
    jobs.resume(root, "again", start_supervisor=False)
    assert [(v.name, v.state) for v in jobs.jobs_overview(root)] == [("again", "queued")]
    job = jobs.claim_next(root)
    assert jobs.jobs_overview(root)[0].state == "starting"  # claimed, no process yet
    record = {**job.to_json(), "pid": os.getpid(),
              "pid_start": jobs.process_start_time(os.getpid()), "log": ""}
    (root / ".queue" / "active" / "again.json").write_text(json.dumps(record))
    assert jobs.jobs_overview(root)[0].state == "starting"
    assert jobs.anything_running(root)
    info = json.loads((root / "again" / "run.json").read_text())
    info.update(status="running", pid=os.getpid(),
                pid_start_time=jobs.process_start_time(os.getpid()))
    (root / "again" / "run.json").write_text(json.dumps(info))
    assert jobs.jobs_overview(root)[0].state == "running"
    (root / ".queue" / "active" / "again.json").unlink()  # not a runner: the fixture kills those


def test_cancel_a_queued_job_drops_it(root):
    jobs.enqueue(root, jobs.reserve_name(root, "q"), [])
    assert jobs.cancel(root, "q") == "dequeued"
    assert not jobs.pending_jobs(root)
    assert jobs.cancel(root, "q") == "not running"


def test_a_runner_that_refuses_its_input_ends_failed_with_its_error_line(root):
    """Input the page would have refused, given anyway: the runner's own error line is kept."""
    jobs.launch(root, [{**TINY, "method": "full", "name": "bad", "data": str(root / "no.json")}])
    wait_until(lambda: ended(root, "bad"), 120, "the runner to refuse")
    record = ended(root, "bad")
    assert record["returncode"] == 2
    assert record["error"].startswith("error: data file") and "no.json" in record["error"]
    (view,) = jobs.ended_before_run(root)
    assert (view.name, view.state, view.error) == ("bad", "failed", record["error"])
    assert "Traceback" not in jobs.log_file(root, "bad").read_text()


def _checkpoints(root: Path, name: str) -> list[int]:
    return RunDir(root / name).checkpoint_steps()


def _progress(root: Path, name: str) -> int:
    try:
        return rundir.read_progress(root / name).step
    except jobs.UserError:  # no run.json yet
        return -1


def test_kill_resume_cancel_resume(root):
    """A run killed outright shows stopped unexpectedly; Resume continues it; Cancel ends it
    cancelled with its checkpoints; Resume again finishes it."""
    (job,) = jobs.launch(root, [{**LONG, "method": "spider", "name": "long"}],
                         start_supervisor=False)
    assert jobs.ensure_supervisor(root)
    resume_state = root / "long" / "resume" / "meta.json"
    wait_until(lambda: _checkpoints(root, "long") and resume_state.exists(),
               what="a first checkpoint and resume state")
    assert status(root, "long") == "running"
    record = jobs.active_records(root)[0]
    os.killpg(record["pid"], signal.SIGKILL)  # a crash: no chance to save or say so
    wait_until(lambda: status(root, "long") == jobs.STOPPED_UNEXPECTEDLY,
               what="the killed run to show as stopped unexpectedly")
    assert not jobs.anything_running(root)
    killed_at = json.loads(resume_state.read_text())["step"]

    jobs.resume(root, "long")
    wait_until(lambda: _progress(root, "long") > killed_at + 2 and status(root, "long")
               == "running", what="the resumed run to train further")
    assert RunDir(root / "long").read_run()["resumed_at_step"] == killed_at
    assert jobs.cancel(root, "long", grace=60, wait=True) == "signalled"
    wait_until(lambda: ended(root, "long"), 60, "the supervisor to record the end")
    info = RunDir(root / "long").read_run()
    assert info["status"] == "cancelled" and status(root, "long") == "cancelled"
    kept = _checkpoints(root, "long")
    assert len(kept) >= 2 and max(kept) > killed_at  # checkpoints kept, none lost
    assert max(kept) < 150

    # the rest of the run, quickly: a resumed run keeps its stored settings, so it trains
    # the remaining steps; finishing proves resume picks up the cancelled state
    jobs.resume(root, "long")
    wait_until(lambda: status(root, "long") == "done", 600, "the resumed run to finish")
    info = RunDir(root / "long").read_run()
    assert info["progress"]["step"] == 150 and info["resumed_at_step"] >= killed_at
    log = (root / "long" / jobs.LOG_NAME).read_text()
    started = [line for line in log.splitlines() if line.startswith("$ ")]
    assert len(started) == 3 and started[1].endswith("--resume")  # one log, every attempt

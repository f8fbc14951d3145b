"""The run directory's whole-file writes, event log and checkpoint folders."""

import json
import socket
import subprocess
import sys
import time

import pytest
import torch

from spider import rundir
from spider.errors import UserError
from spider.rundir import (
    STOPPED_UNEXPECTEDLY,
    EvalEvent,
    RunDir,
    RunInfoWriter,
    StatisticsRow,
    TrainEvent,
    atomic_write_json,
    checkpoint_meta,
    checkpoint_run,
    effective_status,
    is_checkpoint,
    process_record,
    read_group,
    read_progress,
)


def test_run_file_round_trips_with_schema_version(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_run({"status": "running", "method": "spider"})
    info = run.read_run()
    assert info == {"schema_version": 2, "status": "running", "method": "spider"}
    assert [p.name for p in run.path.iterdir()] == ["run.json"]  # no temporary left behind


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": object()})  # not JSON-serialisable
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_events_skip_a_torn_last_line_and_truncate_for_resume(tmp_path):
    run = RunDir(tmp_path)
    run.append_events([{"step": s, "loss": 1.0 / s} for s in range(1, 6)])
    with open(run.metrics_file, "a") as fh:
        fh.write('{"step": 6, "lo')  # killed mid-write
    assert [e["step"] for e in run.read_events()] == [1, 2, 3, 4, 5]
    run.truncate_events(3)
    assert [e["step"] for e in run.read_events()] == [1, 2, 3]


def test_a_malformed_line_in_the_middle_names_the_file_and_line(tmp_path):
    run = RunDir(tmp_path)
    run.metrics_file.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl line 2 is not valid JSON"):
        run.read_events()


def test_checkpoints_are_whole_or_absent(tmp_path):
    run = RunDir(tmp_path / "run")
    weights = {"a.weight": torch.arange(6.0).view(2, 3)}
    path = run.write_checkpoint(10, {"weights": weights}, {"kind": "checkpoint"})
    # a half-made checkpoint (temporary folder, or no meta.json) is not listed
    (run.checkpoints_dir / ".tmp-step-000020.x").mkdir()
    (run.checkpoints_dir / "step-000030").mkdir()
    assert run.checkpoint_steps() == [10]
    assert is_checkpoint(path) and checkpoint_meta(path)["groups"] == ["weights"]
    assert checkpoint_run(path).path == run.path.resolve()
    assert torch.equal(read_group(path, "weights")["a.weight"], weights["a.weight"])
    # rewriting the same step replaces it whole
    run.write_checkpoint(10, {"weights": {"a.weight": torch.zeros(2, 3)}}, {})
    assert read_group(path, "weights")["a.weight"].sum() == 0
    run.write_checkpoint(40, {"weights": weights}, {})
    run.remove_checkpoints_after(10)
    assert run.checkpoint_steps() == [10]


def test_damaged_checkpoint_file_is_named(tmp_path):
    run = RunDir(tmp_path)
    path = run.write_checkpoint(1, {"weights": {"w": torch.ones(3)}}, {})
    data = (path / "weights.safetensors").read_bytes()
    (path / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"weights.safetensors is damaged"):
        read_group(path, "weights")
    with pytest.raises(UserError, match=r"method.safetensors does not exist"):
        read_group(path, "method")


# ------------------------------------------------------------------------- lifecycle
def _running(**process) -> dict:
    return {"status": "running", **process}


def test_a_live_process_is_running_and_a_gone_one_stopped_unexpectedly():
    assert effective_status(_running(**process_record())) == "running"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    record = process_record(child.pid)  # while it lives
    child.wait()
    assert record["pid_start_time"] is not None
    assert effective_status(_running(**record)) == STOPPED_UNEXPECTEDLY
    for ended in ("done", "failed", "cancelled"):  # only a run that says running is checked
        assert effective_status({**record, "status": ended}) == ended


def test_a_reused_pid_is_told_apart_by_its_start_time():
    # this very process stands in for the one that took over the pid of a dead run
    record = process_record()
    reused = {**record, "pid_start_time": record["pid_start_time"] - 1}
    assert effective_status(_running(**reused)) == STOPPED_UNEXPECTEDLY


def test_another_host_is_judged_by_its_heartbeat():
    other = {"pid": 1, "pid_start_time": 1, "hostname": socket.gethostname() + "-other",
             "heartbeat_interval_s": 10.0}
    now = time.time()
    fresh = _running(**other, heartbeat=now - 30)
    stale = _running(**other, heartbeat=now - 10.0 * rundir.HEARTBEAT_STALE_INTERVALS - 1)
    assert effective_status(fresh, now=now) == "running"
    assert effective_status(stale, now=now) == STOPPED_UNEXPECTEDLY
    assert effective_status(_running(**other), now=now) == "running"  # nothing to judge by


def test_the_heartbeat_thread_keeps_run_json_fresh_and_readable(tmp_path):
    run = RunDir(tmp_path / "run")
    writer = RunInfoWriter(run, {"status": "running", **process_record(),
                                 "progress": {"step": 0, "steps": 10}}, interval=0.02)
    writer.update()
    first = run.read_run()["heartbeat"]
    with writer.heartbeat():
        deadline = time.time() + 30
        beats = set()
        while len(beats) < 3 and time.time() < deadline:
            beats.add(run.read_run()["heartbeat"])  # never a torn file
            time.sleep(0.005)
        writer.update_progress(step=4, evaluating=True, eval_step=4)
    assert len(beats) >= 3 and min(beats) >= first
    assert writer._thread is None  # stopped on leaving
    progress = read_progress(run)
    assert (progress.status, progress.step, progress.steps, progress.evaluating,
            progress.eval_step) == ("running", 4, 10, True, 4)
    assert 0 <= progress.heartbeat_age_s < 30


def test_typed_records_write_the_documented_columns(tmp_path):
    run = RunDir(tmp_path)
    run.append_events([TrainEvent(1, 2.0, 1e-3, 0.5, 0.1), EvalEvent(0, "upstream", "score",
                                                                      0.9, 8)])
    assert run.read_events() == [
        {"event": "train", "step": 1, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.5, "seconds": 0.1},
        {"event": "eval", "step": 0, "split": "upstream", "metric": "score", "value": 0.9,
         "n": 8}]
    run.append_layers([StatisticsRow(2, "a.weight", 6, {"mask_mean": 0.5}, 3.0, 6.0)])
    row = run.read_layers()[0]
    assert tuple(row) == rundir.STATISTICS_COLUMNS
    assert row["update_rel_norm"] == 0.5 and row["mask_mean"] == 0.5
    assert row["mask_density"] != row["mask_density"]  # NaN: not reported by the method


def test_a_run_that_never_trained_may_be_started_again_in_place(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_run({"status": "failed", "progress": {"step": 0}})
    run.append_events([EvalEvent(0, "upstream", "score", 1.0)])
    assert run.never_trained()
    run.append_events([TrainEvent(1, 2.0, 1e-3, 0.5, 0.1)])
    assert not run.never_trained()  # it trained: keep it
    run.clear()
    assert list(run.path.iterdir()) == []
    (run.path / "notes.txt").write_text("mine")
    run.write_run({"status": "failed", "progress": {"step": 0}})
    assert not run.never_trained()  # a folder holding other things is never cleared


def test_version_1_checkpoints_still_read(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_run({"config": {"steps": 10}})
    for step in (5, 10):
        run.write_checkpoint(step, {"weights": {"w": torch.ones(2)}}, {})
        meta = run.checkpoint_dir(step) / "meta.json"
        old = json.loads(meta.read_text())
        del old["schema_version"]  # as version 1 wrote it: no version, no 'finalized'
        meta.write_text(json.dumps(old))
    assert [run.checkpoint_meta(s).finalized for s in (5, 10)] == [False, True]
    assert run.checkpoint_meta(5).schema_version == 1
    run.write_analysis_checkpoint(5, {"w": torch.ones(2)}, {}, finalized=True,
                                  method_meta={"method": "dare"})
    assert run.checkpoint_meta(5).finalized and run.checkpoint_meta(5).schema_version == 2


def test_a_kill_between_the_renames_of_a_resume_swap_loses_no_state(tmp_path):
    """The resume state is replaced by renaming the old folder away and the new one in; a
    kill between the two renames must not make ``--resume`` start again from step 0."""
    run = RunDir(tmp_path / "run")
    run.write_resume(2, {"weights": {"w": torch.ones(3)}}, {"note": "step 2"})
    # the next save got as far as its first rename: the old state sits under its .old name
    new = tmp_path / "run" / ".tmp-resume.new"
    new.mkdir()
    run.resume_dir.rename(rundir._previous_version(run.resume_dir))
    assert not run.resume_dir.exists()
    meta, groups = run.read_resume()
    assert meta["step"] == 2 and torch.equal(groups["weights"]["w"], torch.ones(3))
    assert run.resume_dir.is_dir()


def test_the_incremental_reader_returns_complete_lines_only_and_rereads_a_rewritten_log(
        tmp_path):
    from spider.rundir import LogTail, read_since

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    tail = run.tail_events()
    assert isinstance(tail, LogTail) and not tail.read()  # no file yet
    run.append_events([{"event": "train", "step": 1, "loss": 1.0}])
    assert tail.read() and [r["step"] for r in tail.rows] == [1]
    assert not tail.read()  # nothing new
    with open(run.metrics_file, "a") as fh:  # a line still being written waits
        fh.write('{"event": "train", "step": 2, "lo')
    assert not tail.read() and len(tail.rows) == 1
    with open(run.metrics_file, "a") as fh:
        fh.write('ss": 0.5}\nnot json\n')  # completed; a damaged line is skipped
    assert tail.read() and [r["step"] for r in tail.rows] == [1, 2]
    rows, offset = read_since(run.metrics_file, 0)
    assert [r["step"] for r in rows] == [1, 2] and offset == run.metrics_file.stat().st_size
    assert read_since(run.metrics_file, offset) == ([], offset)
    run.truncate_events(1)  # what --resume does: rewritten shorter, read again whole
    assert tail.read() and [r["step"] for r in tail.rows] == [1]


def test_liveness_lives_in_its_own_module_and_the_run_directory_reads_it():
    import spider.liveness as liveness
    from spider import rundir

    assert rundir.process_record is liveness.process_record
    record = liveness.process_record()
    assert liveness.on_this_host(record) and liveness.record_alive(record)
    assert not liveness.record_alive({**record, "pid_start_time": record["pid_start_time"] + 1})
    assert liveness.heartbeat_stale({}) is None
    now = 1000.0
    fresh = {"heartbeat": now - 5, "heartbeat_interval_s": 10.0}
    assert liveness.heartbeat_stale(fresh, now) is False
    assert liveness.heartbeat_stale({**fresh, "heartbeat": now - 61}, now) is True
    beats = []
    with liveness.Heartbeat(lambda: beats.append(1), interval=0.01):
        time.sleep(0.2)
    assert beats


def test_removing_checkpoints_for_a_resume_drops_the_attribution_rows_that_scored_them(tmp_path):
    from spider.rundir import AttributionRow

    run = RunDir(tmp_path / "run")
    run.write_run({"config": {"steps": 20}})
    for step in (10, 20):
        run.write_checkpoint(step, {"weights": {"w": torch.ones(2)}}, {})
        run.append_attribution([AttributionRow(step, "layer", g, {"upstream": 0.5}, 1, 8)
                                for g in ("(none)", "llm.0", "(all)")])
    run.remove_checkpoints_after(20)  # nothing after the last: every row stays
    assert [(r.step, r.group) for r in run.read_attribution()].count((20, "llm.0")) == 1
    run.remove_checkpoints_after(10)  # --resume at step 10: step 20 is trained again
    assert run.checkpoint_steps() == [10]
    assert {r.step for r in run.read_attribution()} == {10}
    assert [r.group for r in run.read_attribution()] == ["(none)", "llm.0", "(all)"]

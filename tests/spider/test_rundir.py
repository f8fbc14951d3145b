"""The run directory's whole-file writes, event log and checkpoint folders."""

import json

import pytest
import torch

from spider.errors import UserError
from spider.rundir import (
    RunDir,
    atomic_write_json,
    checkpoint_meta,
    checkpoint_run,
    is_checkpoint,
    read_group,
)


def test_run_file_round_trips_with_schema_version(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_run({"status": "running", "method": "spider"})
    info = run.read_run()
    assert info == {"schema_version": 1, "status": "running", "method": "spider"}
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

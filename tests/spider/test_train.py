"""``python -m spider.train``: the run directory it writes, statuses, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spider.rundir import RunDir
from spider.train import main

ROOT = Path(__file__).resolve().parents[2]
# Small and quick: 6 steps of 4 examples, 8 test examples per split.
QUICK = ["--steps", "6", "--batch-size", "4", "--eval-every", "3", "--eval-limit", "8",
         "--log-every", "2", "--save-every", "3", "--device", "cpu", "--train-size", "64"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(out: Path, *extra: str) -> dict:
    return main(["--output-dir", str(out), *QUICK, *extra])


def test_a_run_writes_the_run_directory_contract(tmp_path, capsys):
    info = _train(tmp_path / "run", "--method", "spider")
    run = RunDir(tmp_path / "run")
    stored = run.read_run()
    assert stored["status"] == "done" and info["status"] == "done"
    assert stored["schema_version"] == 2 and stored["method"] == "spider"
    # the process that trained, so that a reader can tell a run killed outright
    assert stored["pid"] == os.getpid() and stored["hostname"] and stored["pid_start_time"]
    assert stored["heartbeat"] >= stored["created"]
    assert stored["config"]["steps"] == 6 and stored["seed"] == 0
    assert set(stored["summary"]) == {"U", "D", "H", "E", "F", "O"}
    assert stored["progress"]["step"] == 6

    events = run.read_events()
    train = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "grad_norm", "seconds"} <= set(e) for e in train)
    scores = [e for e in events if e["event"] == "eval" and e["metric"] == "score"]
    assert sorted({e["step"] for e in scores}) == [0, 3, 6]
    assert {e["split"] for e in scores} == {"upstream", "downstream", "idimg-oodq",
                                            "oodimg-idq", "oodimg-oodq"}
    assert all(0.0 <= e["value"] <= 1.0 for e in scores)

    layers = run.read_layers()
    assert sorted({r["step"] for r in layers}) == [2, 4, 6]
    params = {r["param"] for r in layers}
    assert any("language_model" in p for p in params) and any("projector" in p for p in params)
    assert not any("vision_tower" in p for p in params)  # frozen by default
    row = next(r for r in layers if r["step"] == 6)
    for column in ("numel", "mask_mean", "mask_density", "importance_pre_mean",
                   "importance_ft_mean", "frac_ft_gt_pre", "update_norm", "update_rel_norm"):
        assert column in row
    assert 0.0 <= row["mask_mean"] <= 1.0 and row["update_norm"] > 0

    assert run.checkpoint_steps() == [3, 6]
    # what each checkpoint is is recorded when it is written (post-hoc finalize or not)
    assert [run.checkpoint_meta(s).finalized for s in (3, 6)] == [False, True]
    assert not run.resume_dir.exists()  # a finished run keeps no resume state
    weights = load_file(run.checkpoint_dir(6) / "weights.safetensors")
    method = load_file(run.checkpoint_dir(6) / "method.safetensors")
    assert set(weights) == params
    assert all(k.startswith("grad_sum/") for k in method)  # theta0 lives in the base model
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["status"] == "done" and last["output_dir"] == str(run.path)


def test_a_checkpoint_loads_as_a_model_with_the_trained_weights(tmp_path):
    from spider.models import load_model

    _train(tmp_path / "run", "--method", "full")
    run = RunDir(tmp_path / "run")
    model, _ = load_model(run.checkpoint_dir(6))
    saved = load_file(run.checkpoint_dir(6) / "weights.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in saved.items())


def test_save_dtype_and_save_tensors_shrink_checkpoints_not_statistics(tmp_path):
    _train(tmp_path / "run", "--method", "spider", "--save-dtype", "bfloat16",
           "--save-tensors", r"layers\.3\.")
    run = RunDir(tmp_path / "run")
    weights = load_file(run.checkpoint_dir(6) / "weights.safetensors")
    assert weights and all("layers.3." in n for n in weights)
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert any("layers.0." in r["param"] for r in run.read_layers())


def test_hybrid_lora_and_train_parts(tmp_path):
    info = _train(tmp_path / "hybrid", "--method", "full", "--hybrid-ratio", "0.5",
                  "--train", "llm", "--train-last-layers", "1")
    assert info["status"] == "done"
    params = {r["param"] for r in RunDir(tmp_path / "hybrid").read_layers()}
    assert params and all("layers.3." in p for p in params)
    info = _train(tmp_path / "lora", "--method", "lora", "--option", "r=2")
    assert info["status"] == "done" and info["options"]["r"] == 2
    weights = load_file(RunDir(tmp_path / "lora").checkpoint_dir(6) / "weights.safetensors")
    assert weights and all(n.endswith(".weight") and "lora" not in n for n in weights)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "spider.train", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


# Runs ``spider.train`` and kills itself with SIGKILL right after the resume state of step
# ``KILL_AT_STEP`` is written: the event itself, not a moment guessed from outside.
_KILL_AFTER_RESUME_STATE = """
import os, signal, sys
from spider import rundir, train
at = int(os.environ["KILL_AT_STEP"])
write = rundir.RunDir.write_resume_state
def write_then_die(self, state):
    write(self, state)
    if state.step >= at:
        os.kill(os.getpid(), signal.SIGKILL)
rundir.RunDir.write_resume_state = write_then_die
train.main(sys.argv[1:])
"""


def test_resume_after_sigkill_ends_where_an_uninterrupted_run_ends(tmp_path):
    from spider.rundir import STOPPED_UNEXPECTEDLY, effective_status, read_progress

    args = ["--method", "spider", "--steps", "12", "--batch-size", "4", "--eval-every", "6",
            "--eval-limit", "4", "--log-every", "2", "--save-every", "4", "--device", "cpu",
            "--train-size", "64"]
    straight = _cli("--output-dir", str(tmp_path / "straight"), *args)
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "KILL_AT_STEP": "4"}
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_RESUME_STATE, "--output-dir",
                             str(out), *args], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    info = RunDir(out).read_run()
    assert info["status"] == "running"  # killed: nobody could say otherwise ...
    assert effective_status(out) == STOPPED_UNEXPECTEDLY  # ... but a reader can tell
    assert read_progress(out).status == STOPPED_UNEXPECTEDLY

    resumed = _cli("--output-dir", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(RunDir(tmp_path / "straight").checkpoint_dir(12) / "weights.safetensors")
    b = load_file(RunDir(out).checkpoint_dir(12) / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = {e["step"]: e["loss"] for e in RunDir(out).read_events() if e["event"] == "train"}
    assert sorted(losses) == list(range(1, 13))  # no step twice, none missing
    assert RunDir(out).read_run()["status"] == "done"
    # the statistics too, mask_churn included (its reference is part of the resume state)
    rows = [json.dumps(RunDir(d).read_layers()) for d in (tmp_path / "straight", out)]
    assert rows[0] == rows[1] and '"mask_churn": 0.' in rows[0]


def test_sigterm_saves_and_ends_cancelled(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "spider.train", "--output-dir", str(out),
                             "--steps", "400", "--batch-size", "4", "--eval-limit", "4",
                             "--eval-every", "400", "--device", "cpu", "--train-size", "64"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    # wait for the event itself (the first train event on disk), however busy the machine
    while proc.poll() is None and not [e for e in RunDir(out).read_events()
                                       if e["event"] == "train"]:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130  # as Ctrl-C: `train && report` does not carry on
    assert f"--output-dir {out} --resume" in stderr.splitlines()[-1]
    info = RunDir(out).read_run()
    assert info["status"] == "cancelled" and json.loads(stdout.splitlines()[-1])["status"] == \
        "cancelled"
    step = info["progress"]["step"]
    assert 0 < step < 400 and RunDir(out).checkpoint_steps()[-1] == step


def test_non_finite_loss_fails_the_run_with_a_clear_message(tmp_path):
    result = _cli("--output-dir", str(tmp_path / "run"), *QUICK, "--lr", "1e30",
                  "--method", "full")
    assert result.returncode == 1  # the run failed; the input was not wrong
    assert result.stderr.splitlines()[-1].startswith("failed: loss is not finite at step")
    assert "try a lower --lr" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr
    info = RunDir(tmp_path / "run").read_run()
    assert info["status"] == "failed" and "not finite" in info["error"]
    # progress names the last step reached, not 0
    failed_at = int(info["error"].split("at step ")[1].split(";")[0])
    assert info["progress"]["step"] == failed_at - 1 > 0


@pytest.mark.parametrize("extra, message", [
    (["--model", "/no/such/model"], "does not exist"),
    (["--method", "nope"], "nope"),
    (["--option", "mask=wrong"], "mask"),
    (["--data", "builtin:nope"], "unknown built-in dataset"),
    (["--steps", "0"], "--steps"),
    (["--hybrid-ratio", "1.5"], "--hybrid-ratio"),
    (["--save-dtype", "int8"], "--save-dtype"),
    (["--save-tensors", "("], "--save-tensors"),
    (["--train", "eyes"], "eyes"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", str(tmp_path / "run"), *QUICK, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "run").exists()  # found before anything was written


def test_an_output_dir_that_is_a_file_is_one_error_line(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    for extra in ([], ["--resume"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--output-dir", str(target), *QUICK, *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: --output-dir {target} is a file, not a "
                       + ("run folder" if extra else "folder; choose a folder for the run "
                          "directory")]
    assert target.read_text() == "keep me"


def test_a_damaged_image_is_found_before_anything_is_written_then_the_run_starts(
        tmp_path, capsys):
    from spider.data import load_dataset, write_llava_json

    data = tmp_path / "data"
    write_llava_json(load_dataset("builtin:counting", "train", size=12), data)
    image = sorted((data / "images").iterdir())[7]
    good = image.read_bytes()
    image.write_bytes(good[:40])  # a truncated PNG
    out = tmp_path / "run"
    args = ["--output-dir", str(out), *QUICK, "--method", "full", "--data", str(data),
            "--eval-data", "builtin:counting"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and image.name in err
    assert not out.exists()
    image.write_bytes(good)  # mended: the same command now runs
    assert main(args)["status"] == "done"


def _fail_at_step(monkeypatch, step: int, error: BaseException) -> None:
    """Make the method's update raise ``error`` at optimizer step ``step`` (1-based)."""
    from spider.methods.base import MethodBase

    original = MethodBase.before_optimizer_step

    def failing(self):
        if self.steps_done + 1 == step:
            raise error
        return original(self)

    monkeypatch.setattr(MethodBase, "before_optimizer_step", failing)


def test_out_of_memory_fails_the_run_saying_what_to_lower(tmp_path, capsys, monkeypatch):
    # simulated: the exception CUDA raises, raised on CPU at step 5
    _fail_at_step(monkeypatch, 5, torch.OutOfMemoryError("CUDA out of memory. Tried to "
                                                         "allocate 2.00 GiB"))
    with pytest.raises(SystemExit) as exit_info:
        _train(tmp_path / "run", "--method", "full")
    assert exit_info.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("failed: out of memory on cpu after step 4")
    for advice in ("--batch-size", "--dtype bfloat16", "--train-last-layers"):
        assert advice in last
    info = RunDir(tmp_path / "run").read_run()
    assert info["status"] == "failed" and "out of memory" in info["error"]
    assert info["progress"]["step"] == 4 and info["progress"]["saved_step"] == 3
    assert RunDir(tmp_path / "run").checkpoint_steps() == [3]


def test_a_run_that_failed_before_its_first_step_starts_again_in_place(
        tmp_path, capsys, monkeypatch):
    _fail_at_step(monkeypatch, 1, torch.OutOfMemoryError("CUDA out of memory."))
    with pytest.raises(SystemExit):
        _train(tmp_path / "run", "--method", "full")
    assert RunDir(tmp_path / "run").read_run()["status"] == "failed"
    monkeypatch.undo()
    info = _train(tmp_path / "run", "--method", "full")  # no --resume, same folder
    assert info["status"] == "done" and "error" not in info
    train = [e for e in RunDir(tmp_path / "run").read_events() if e["event"] == "train"]
    assert [e["step"] for e in train] == [1, 2, 3, 4, 5, 6]
    evals_at_0 = [e for e in RunDir(tmp_path / "run").read_events()
                  if e["event"] == "eval" and e["step"] == 0 and e["split"] == "upstream"
                  and e["metric"] == "score"]
    assert len(evals_at_0) == 1  # the failed attempt's events are gone


def test_run_json_says_while_an_evaluation_is_under_way(tmp_path, monkeypatch):
    import spider.evaluate
    from spider.rundir import RUNNING, read_progress

    seen = []
    original = spider.evaluate.evaluate

    def watching(*args, **kwargs):
        seen.append(read_progress(tmp_path / "run"))
        return original(*args, **kwargs)

    monkeypatch.setattr(spider.evaluate, "evaluate", watching)
    _train(tmp_path / "run", "--method", "full")
    assert seen and all(p.evaluating and p.status == RUNNING for p in seen)
    assert sorted({p.eval_step for p in seen}) == [0, 3, 6]
    done = read_progress(tmp_path / "run")
    assert not done.evaluating and done.step == done.steps == 6 and done.status == "done"
    assert done.eval_seconds > 0 and done.it_per_s > 0


def test_an_existing_run_is_never_overwritten_and_resume_checks_the_config(tmp_path, capsys):
    _train(tmp_path / "run", "--method", "full")
    before = (tmp_path / "run" / "run.json").read_bytes()
    with pytest.raises(SystemExit):
        _train(tmp_path / "run", "--method", "full")
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path / "run"), "--resume", "--lr", "0.5"])
    assert "lr=0.0003" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path / "run"), "--resume"])
    assert "already done" in capsys.readouterr().err
    assert (tmp_path / "run" / "run.json").read_bytes() == before


def test_config_file_and_its_errors(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"method": "l2", "steps": 2, "eval_every": 2}))
    info = main(["--output-dir", str(tmp_path / "run"), "--config", str(config),
                 "--batch-size", "4", "--eval-limit", "4", "--train-size", "16"])
    assert info["method"] == "l2" and info["config"]["steps"] == 2
    config.write_text(json.dumps({"stepz": 2}))
    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path / "r2"), "--config", str(config)])
    assert "unknown setting 'stepz'" in capsys.readouterr().err


def test_readme_documents_every_flag():
    from spider.train import _parser

    readme = (ROOT / "README.md").read_text()
    flags = {s for a in _parser()._actions for s in a.option_strings if s != "-h"} - {"--help"}
    missing = sorted(f for f in flags if f"`{f}" not in readme)
    assert not missing, missing


SAMPLE_RUNS = ROOT / "sample_checkpoints" / "runs"


def test_sample_runs_are_finished_small_and_load_from_this_checkout():
    from spider.models import resolve_model_path

    runs = sorted(p for p in SAMPLE_RUNS.iterdir() if p.is_dir())
    assert {p.name for p in runs} >= {"spider", "full", "magnitude_mask", "l2", "dare", "lora",
                                      "hybrid"}
    size = sum(f.stat().st_size for f in SAMPLE_RUNS.rglob("*") if f.is_file())
    # of the 40 MiB repository: `spider` keeps every tensor with S (~11 MB), `full` every
    # tensor (~5.3 MB); fifteen runs ~28.0 MiB, their statistics compacted to Parquet
    assert size <= 29 * 2**20
    seeds = set()
    for path in runs:
        run = RunDir(path)
        info = run.read_run()
        seeds.add((info["seed"], info["config"]["data"], info["config"]["steps"]))
        assert info["status"] == "done" and set(info["summary"]) >= {"U", "D", "H"}
        assert len(run.checkpoint_steps()) >= 2
        # The base model is found relative to the run, wherever this checkout lives.
        checkpoint = run.checkpoint_dir(run.checkpoint_steps()[-1])
        assert Path(resolve_model_path(checkpoint)) == (
            ROOT / "sample_checkpoints" / "tiny-llava-base").resolve()
    assert len(seeds) == 1  # same seed, data and length: the comparison is like for like

"""Security properties of the code itself, checked on its syntax tree (so comments and
strings do not count, and a new file is covered the day it is added):

* no pickle anywhere: no pickle-family imports, no ``torch.save`` / ``pandas`` pickles, any
  ``torch.load`` passes ``weights_only=True``, ``numpy.load`` never ``allow_pickle=True``;
* ``trust_remote_code`` is only ever passed as ``False``, and a model directory that asks
  for remote code does not get it run;
* subprocesses take argument lists, never a shell (``shell=True``, ``os.system``,
  ``os.popen``, a command string).

Each checker is first shown to catch a planted violation, so a pass means something.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
from harness import changed, record, snapshot

ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("spider", "analysis", "app", "scripts", "bench")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal",
                  "joblib"}
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output", "getoutput",
                    "getstatusoutput"}


def _code_files() -> list[Path]:
    return sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py")
                  if "__pycache__" not in p.parts)


def _name(node: ast.AST) -> str:
    """Dotted name of a call target (``torch.load``, ``subprocess.run``), '' otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _name(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    return ""


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def pickle_violations(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in \
                PICKLE_MODULES:
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _name(node.func)
            if name.endswith("torch.load"):
                if not _is_true(_keyword(node, "weights_only")):
                    found.append(f"line {node.lineno}: {name} without weights_only=True")
            elif name.endswith(("torch.save", "read_pickle", "to_pickle")):
                found.append(f"line {node.lineno}: {name} (pickle)")
            elif name.endswith(("np.load", "numpy.load")) and _is_true(
                    _keyword(node, "allow_pickle")):
                found.append(f"line {node.lineno}: {name} with allow_pickle=True")
    return found


def remote_code_violations(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            value = _keyword(node, "trust_remote_code")
            if value is not None and not (isinstance(value, ast.Constant)
                                          and value.value is False):
                found.append(f"line {node.lineno}: trust_remote_code={ast.unparse(value)}")
    return found


def shell_violations(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        if name in ("os.system", "os.popen", "system", "popen") or name.endswith(
                "create_subprocess_shell"):
            found.append(f"line {node.lineno}: {name}")
        elif name.split(".")[-1] in SUBPROCESS_CALLS and (
                name.startswith("subprocess.") or name in SUBPROCESS_CALLS - {"run", "call"}):
            shell = _keyword(node, "shell")
            if shell is not None and not (isinstance(shell, ast.Constant)
                                          and shell.value is False):
                found.append(f"line {node.lineno}: {name}(shell={ast.unparse(shell)})")
            command = node.args[0] if node.args else _keyword(node, "args")
            if isinstance(command, (ast.Constant, ast.JoinedStr, ast.BinOp)):
                found.append(f"line {node.lineno}: {name} with a command string")
    return found


PLANTED = '''
import pickle
from joblib import dump
import torch, subprocess, os, numpy as np
torch.load(f)
torch.load(f, weights_only=False)
torch.load(f, weights_only=True)
torch.save(x, f)
np.load(f, allow_pickle=True)
frame.to_pickle("x")
AutoModel.from_pretrained(p, trust_remote_code=True)
AutoModel.from_pretrained(p, trust_remote_code=flag)
AutoModel.from_pretrained(p, trust_remote_code=False)
subprocess.run("ls -l", shell=True)
subprocess.Popen(f"train {x}")
subprocess.run(["ls", "-l"])
os.system("ls")
'''


def test_the_checkers_catch_planted_violations():
    tree = ast.parse(PLANTED)
    assert len(pickle_violations(tree)) == 7  # 2 imports, 2 torch.load, save, np, pandas
    assert len(remote_code_violations(tree)) == 2
    assert len(shell_violations(tree)) == 4  # shell=True + its string, f-string, os.system


@pytest.mark.parametrize("check, what", [
    (pickle_violations, "pickle: imports, torch.save/load without weights_only, pickles"),
    (remote_code_violations, "trust_remote_code other than False"),
    (shell_violations, "a subprocess through a shell, or as a command string"),
])
def test_no_code_path_uses_it(check, what):
    files = _code_files()
    assert len(files) > 20  # the scan sees the code
    before = snapshot(*files)
    found = [f"{p.relative_to(ROOT)} {v}" for p in files
             for v in check(ast.parse(p.read_text(), str(p)))]
    lost = changed(before, snapshot(*files))  # the scan reads only
    record(f"code scan: {what}", "security", len(files),
           f"none in the {len(files)} Python files of {', '.join(CODE_DIRS)}", found + lost,
           data_lost=len(lost))
    assert not found, found


def test_a_model_that_asks_for_remote_code_does_not_get_it_run(tmp_path):
    """A model directory whose config maps the Auto classes to its own Python file: the
    file is never imported (it would leave a marker), loading either refuses with a clear
    error or loads the library's own class."""
    from spider.errors import UserError
    from spider.models import load_model

    model = tmp_path / "model"
    shutil.copytree(ROOT / "sample_checkpoints" / "tiny-llava-base", model)
    marker = tmp_path / "remote-code-ran"
    (model / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlavaForConditionalGeneration as EvilModel\n")
    (model / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlavaConfig as EvilConfig\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForImageTextToText": "modeling_evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    before = snapshot(model)
    problems, outcome = [], ""
    try:
        loaded, _ = load_model(model)
        outcome = f"loaded as {type(loaded).__name__}"
        if type(loaded).__module__.startswith("transformers_modules"):
            problems.append(f"the model's own class was used: {type(loaded).__module__}")
    except UserError as err:
        outcome = f"refused: {err}"
    except Exception as err:  # noqa: BLE001 - anything else is not a clear error
        problems.append(f"{type(err).__name__}: {err}")
    if marker.exists():
        problems.append("the model directory's Python file was run")
    lost = changed(before, snapshot(model))  # loading a model writes nothing into it
    problems += [f"loading changed {f}" for f in lost]
    record("a model directory that maps the Auto classes to its own Python code", "security",
           1, f"its code never runs ({outcome[:120]})", problems, data_lost=len(lost))
    assert not problems, problems


def test_no_runs_folder_opens_the_machine_to_the_train_page(tmp_path, monkeypatch):
    """The folders a path typed on the Train page may be in are exactly the repository, the
    configured runs folders and SPIDERSCOPE_ROOTS: not the home or working folder, and not
    ``/`` or a system folder even when chosen as the runs folder in the sidebar."""
    import streamlit as st

    from app import common

    runs, data, elsewhere = tmp_path / "runs", tmp_path / "data", tmp_path / "cwd"
    for folder in (runs, data, elsewhere):
        folder.mkdir()
    monkeypatch.setenv(common.RUNS_ENV, str(runs))
    monkeypatch.setenv(common.EXTRA_ROOTS_ENV, str(data))
    monkeypatch.chdir(elsewhere)
    before = snapshot(tmp_path)
    problems = []
    for typed in ("/", "/etc", "/usr/lib", "/proc/self", str(Path.home())):
        reason = common.check_runs_folder(typed)
        if not reason.startswith(f"{typed} is "):
            problems.append(f"the sidebar took {typed} as the runs folder ({reason!r})")
    common.set_user_runs_root("/")  # as if the sidebar had taken it
    try:
        allowed = common.allowed_roots()
        if allowed != [common.REPO_ROOT.resolve(), runs.resolve(), data.resolve()]:
            problems.append(f"allowed roots {allowed}")
        for secret in ("/etc/passwd", "/etc/shadow", str(Path.home() / ".bashrc"),
                       str(elsewhere)):
            path, _ = common.safe_path(secret, allowed, must_exist=False)
            if path is not None:
                problems.append(f"{secret} was allowed")
    finally:
        common.set_user_runs_root(None)
        st.session_state.clear()
    lost = changed(before, snapshot(tmp_path))  # checking paths writes nothing
    problems += [f"changed {f}" for f in lost]
    record("a path typed on the Train page, with / chosen as the runs folder", "security", 9,
           "refused: only the repository, the runs folders and SPIDERSCOPE_ROOTS", problems,
           data_lost=len(lost))
    assert not problems, problems


def test_a_job_name_never_reaches_outside_the_queue(tmp_path):
    """``python -m app.jobs cancel --root R ../../victim`` deleted and rewrote a file
    outside the queue: every function of app.jobs that takes a run name refuses a path."""
    from app import jobs
    from spider.errors import UserError

    root = tmp_path / "q" / "runs"
    (root / jobs.QUEUE / "pending").mkdir(parents=True)
    victim = tmp_path / "q" / "victim.json"  # what pending/../../victim.json would reach
    victim.write_text('{"name": "victim"}')
    bad = "../../victim"
    calls = {"cancel": lambda: jobs.cancel(root, bad), "enqueue": lambda: jobs.enqueue(
        root, bad, []), "resume": lambda: jobs.resume(root, bad, start_supervisor=False),
        "log_file": lambda: jobs.log_file(root, bad),
        "ended_record": lambda: jobs.ended_record(root, bad),
        "reserve_name": lambda: jobs.reserve_name(root, bad)}
    problems = []
    for what, call in calls.items():
        try:
            call()
            problems.append(f"{what} took {bad!r}")
        except UserError as err:
            if "run name '../../victim'" not in str(err):
                problems.append(f"{what}: {err}")
    # a record planted in the queue with such a name is ignored, not followed
    (root / jobs.QUEUE / "pending" / "planted.json").write_text(
        json.dumps({"name": bad, "args": []}))
    if jobs.pending_jobs(root) or jobs.claim_next(root) is not None:
        problems.append("a planted record with a path as its name was queued")
    lost = [] if victim.exists() and victim.read_text() == '{"name": "victim"}' else [victim]
    if lost:
        problems.append("the file outside the queue was changed")
    record("a run name that is a path (../../victim)", "security", len(calls) + 1,
           "refused with one sentence; nothing outside the queue touched", problems,
           data_lost=len(lost))
    assert not problems, problems

"""The fault-injection suite: every test here is marked ``faults``.

    .venv/bin/python -m pytest tests/faults -n 2            # as in ``make test``
    .venv/bin/python -m pytest -m faults -n 2               # the same, by marker, slow ones too
    .venv/bin/python scripts/make_reliability_report.py     # run it and rewrite RELIABILITY.md

With ``SPIDER_FAULTS_RESULTS=FILE`` set, tests append one JSON line per fault tried (see
``harness.record``) and this file adds one line per test with its outcome, so the report
says which tries belong to a test that failed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

FAULTS_DIR = Path(__file__).parent


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The tiny run of ``harness.TINY``, never interrupted, read back whole, and how many
    seconds it took as a child process (one per test process)."""
    from harness import TINY, Trainer, read_back

    path = tmp_path_factory.mktemp("reference") / "run"
    child = Trainer(["--output-dir", str(path), *TINY], path.with_suffix(".log"))
    code = child.wait()
    assert code == 0, child.output()[-2000:]
    contents = read_back(path)
    assert contents.status == "done" and not contents.duplicates
    assert sorted(contents.checkpoints) == [2, 4, 6]
    assert sorted(contents.train) == list(range(1, 7))
    return contents, time.monotonic() - child.started


def pytest_configure(config):
    config.addinivalue_line("markers", "faults: the fault-injection suite (tests/faults)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if FAULTS_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.faults)


def _append(path: str, row: dict) -> None:
    import fcntl

    with open(path, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # xdist workers append to the same file
        handle.write(json.dumps(row) + "\n")
        fcntl.flock(handle, fcntl.LOCK_UN)


def pytest_sessionfinish(session):
    """Record the CPU seconds this test process and its training children used (the
    report adds them up: what the suite costs, whatever else loads the machine)."""
    import resource
    import sys

    path = os.environ.get("SPIDER_FAULTS_RESULTS")
    harness = sys.modules.get("harness")
    if not path or harness is None or not session.items:
        return
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = 0.0
    if harness._SERVER is not None and harness._SERVER.process.poll() is None:
        server = harness.fork_server().ask(op="cpu")
        children = server["children_cpu_s"] + server["own_cpu_s"]
    _append(path, {"kind": "cpu", "process_s": round(own.ru_utime + own.ru_stime, 1),
                   "children_s": round(children, 1)})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    path = os.environ.get("SPIDER_FAULTS_RESULTS")
    if not path or FAULTS_DIR not in Path(str(item.fspath)).parents:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        _append(path, {"kind": "test", "test": item.nodeid, "outcome": report.outcome,
                       "seconds": round(report.duration, 2), "reason": reason,
                       "slow": item.get_closest_marker("slow") is not None})

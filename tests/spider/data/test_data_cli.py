"""``python -m spider.data``: export round trip, and one-line errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spider.data import load_dataset

REPO = Path(__file__).resolve().parents[3]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spider.data", *args],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_export_then_load_gives_the_same_examples(tmp_path):
    out = tmp_path / "counting"
    run = _cli("export", "builtin:counting", str(out), "--split", "test", "--limit", "8")
    assert run.returncode == 0, run.stderr
    assert len(list((out / "images").glob("*.png"))) == 8
    back = load_dataset(str(out / "data.json"))
    source = load_dataset("builtin:counting", "test", size=8)
    assert [(e.question, e.answer) for e in back] == [(e.question, e.answer) for e in source]

    again = _cli("export", "builtin:counting", str(out), "--limit", "2")
    assert again.returncode != 0
    assert again.stderr.strip().splitlines() == [
        f"error: {out / 'data.json'} already exists; pass --force (force=True) to overwrite it."
    ]
    assert _cli("export", "builtin:counting", str(out), "--limit", "2", "--force").returncode == 0
    assert len(load_dataset(str(out))) == 2

    shown = _cli("show", str(out / "data.json"), "--n", "2")
    assert shown.returncode == 0 and "How many" in shown.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["show", "builtin:nope"], 'unknown built-in dataset "nope"'),
        (["show", "no/such/file.json"], "no/such/file.json does not exist"),
        (["show", "BAD_JSON"], "is not valid JSON"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, args, needle):
    bad = tmp_path / "bad.json"
    bad.write_text("[{]")
    args = [str(bad) if a == "BAD_JSON" else a for a in args]
    run = _cli(*args)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""

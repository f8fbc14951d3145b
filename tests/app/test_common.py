"""app/common.py: paths typed by a user, run listing and its cache, the runs folder chosen in
the sidebar."""

import json
import os
from pathlib import Path

import streamlit as st

from app import common
from tests.app.test_compare_page import SAMPLES, copy_run


def test_safe_path_refuses_escapes_and_names_the_path(tmp_path):
    root = tmp_path / "runs"
    (root / "a").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (root / "link").symlink_to(outside)

    path, reason = common.safe_path(str(root / "a"), [root])
    assert path == (root / "a").resolve() and reason == ""
    for text, words in ((str(root / "a" / ".." / ".." / "secret"), "'..'"),
                        (str(root / "link"), "outside"),
                        (str(outside), "outside"),
                        (str(root / "missing"), "does not exist"),
                        ("  ", "No path")):
        path, reason = common.safe_path(text, [root])
        assert path is None and words in reason, (text, reason)
        if text.strip():
            assert text in reason  # the message names what the user typed
    path, reason = common.safe_path(str(root / "new"), [root], must_exist=False)
    assert path == (root / "new").resolve()


def test_spiderscope_roots_adds_folders_a_typed_path_may_be_in(tmp_path, monkeypatch):
    shared, other = tmp_path / "data" / "models", tmp_path / "scans"
    shared.mkdir(parents=True)
    other.mkdir()
    monkeypatch.delenv(common.EXTRA_ROOTS_ENV, raising=False)
    assert common.extra_roots() == []
    monkeypatch.setenv(common.EXTRA_ROOTS_ENV, f"{shared}{os.pathsep} {other} {os.pathsep}")
    assert common.extra_roots() == [shared, other]
    path, reason = common.safe_path(str(shared), common.extra_roots())
    assert path == shared.resolve() and reason == ""
    path, reason = common.safe_path(str(tmp_path / "data"), common.extra_roots())
    assert path is None and "outside" in reason  # the parent of a named folder is not in it


def test_runs_folder_check_says_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.setenv(common.RUNS_ENV, str(tmp_path))
    monkeypatch.delenv(common.EXTRA_ROOTS_ENV, raising=False)
    file = tmp_path / "f.txt"
    file.write_text("x")
    (tmp_path / "week1").mkdir()
    other = tmp_path.parent / f"{tmp_path.name}-other"
    other.mkdir()
    assert "does not exist" in common.check_runs_folder(str(tmp_path / "nope"))
    assert "is a file" in common.check_runs_folder(str(file))
    assert common.check_runs_folder(str(tmp_path)) == ""
    assert common.check_runs_folder(str(tmp_path / "week1")) == ""  # inside: fine
    # one sentence saying why, for / and the system's folders...
    for typed, kind in (("/", "the whole file system"), ("/etc", "a system folder"),
                        ("/usr/lib", "a system folder"), ("/proc", "a system folder"),
                        ("/var", "a system folder"), (str(Path.home()), "the home folder")):
        reason = common.check_runs_folder(typed)
        assert reason == (f"{typed} is {kind}, not a folder of runs: choose the folder that "
                          "holds your runs."), reason
    # ...and for a folder outside the configured ones, until SPIDERSCOPE_ROOTS names it
    reason = common.check_runs_folder(str(other))
    assert "outside the folders" in reason and common.EXTRA_ROOTS_ENV in reason
    monkeypatch.setenv(common.EXTRA_ROOTS_ENV, str(other))
    assert common.check_runs_folder(str(other)) == ""


def test_allowed_roots_are_the_repository_runs_folders_and_spiderscope_roots(tmp_path,
                                                                           monkeypatch):
    runs, data, cwd = tmp_path / "runs", tmp_path / "data", tmp_path / "cwd"
    for folder in (runs, data, cwd):
        folder.mkdir()
    monkeypatch.setenv(common.RUNS_ENV, str(runs))
    monkeypatch.setenv(common.EXTRA_ROOTS_ENV, f"{data}{os.pathsep}{data / 'inside'}")
    monkeypatch.chdir(cwd)
    repo = common.REPO_ROOT.resolve()
    # each once (the bundled runs are inside the repository; a root inside another counts
    # once), and nothing implicit: neither the home nor the working folder
    assert common.allowed_roots() == [repo, runs.resolve(), data.resolve()]
    # the repository's own ./runs as the runs folder: the repository is still listed once
    monkeypatch.chdir(repo)
    monkeypatch.delenv(common.RUNS_ENV)
    assert common.allowed_roots() == [repo, data.resolve()]
    # a runs folder that is / (from the environment or a session) is never a root
    monkeypatch.setenv(common.RUNS_ENV, "/")
    assert common.allowed_roots() == [repo, data.resolve()]
    assert common.runs_roots() == [common.bundled_runs_root().resolve()]
    path, reason = common.safe_path("/etc/passwd", common.allowed_roots())
    assert path is None and "outside the folders" in reason
    assert reason.count(str(repo) + ",") + reason.count(str(repo) + ")") == 1


def test_a_missing_path_is_reported_missing_not_outside(tmp_path):
    path, reason = common.safe_path("/nonexistent/model", [tmp_path])
    assert path is None and reason == "The path /nonexistent/model does not exist."


def test_the_session_runs_folder_must_be_inside_the_configured_ones(tmp_path, monkeypatch):
    monkeypatch.setenv(common.RUNS_ENV, str(tmp_path))
    (tmp_path / "week1").mkdir()
    try:
        common.set_user_runs_root(tmp_path / "week1")
        assert common.user_runs_root() == (tmp_path / "week1").resolve()
        common.set_user_runs_root("/")  # never through the sidebar; ignored all the same
        assert common.user_runs_root() == tmp_path
    finally:
        common.set_user_runs_root(None)


def test_listing_rereads_a_growing_run_and_not_a_finished_one(runs_dir, monkeypatch):
    from analysis import overview

    st.cache_data.clear()
    copy_run("spider", runs_dir / "growing", status="done")
    copy_run("full", runs_dir / "finished", status="done")
    calls = []
    real = overview.run_overview
    monkeypatch.setattr(overview, "run_overview", lambda p: calls.append(Path(p).name) or real(p))

    first = common.list_all_runs().set_index("id")
    assert {"growing", "finished", "samples/spider"} <= set(first.index)
    assert first.loc["growing", "root"] == "yours"
    calls.clear()
    common.list_all_runs()
    assert calls == []  # nothing changed: every row from the cache

    # the run writes a later evaluation: only it is read again, and its scores follow
    metrics = runs_dir / "growing" / "metrics.jsonl"
    last = max(json.loads(line)["step"] for line in metrics.open())
    with metrics.open("a") as out:
        for split, value in (("upstream", 0.125), ("downstream", 0.875)):
            out.write(json.dumps({"event": "eval", "step": last + 10, "split": split,
                                  "metric": "score", "value": value}) + "\n")
    again = common.list_all_runs().set_index("id")
    assert calls == ["growing"]
    assert again.loc["growing", "U"] == 0.125 and again.loc["growing", "D"] == 0.875

    # a new run appears without a restart
    copy_run("lora", runs_dir / "new", status="done")
    assert "new" in set(common.list_all_runs()["id"])


def test_run_ids_name_samples_and_nested_user_runs(runs_dir):
    st.cache_data.clear()
    copy_run("spider", runs_dir / "week1" / "a")
    runs = common.list_all_runs()
    assert "week1/a" in set(runs["id"])
    paths = dict(zip(runs["id"], runs["path"]))
    assert paths["samples/spider"] == str(SAMPLES / "spider")


def test_sidebar_shows_the_runs_folder_from_the_environment(app_page, runs_dir):
    from streamlit.testing.v1 import AppTest

    from tests.app.conftest import APP

    # AppTest keeps the sidebar's elements of the first run only (with st.navigation), so
    # typing another folder there is tested in the browser (test_e2e_explore.py)
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert at.sidebar.text_input[0].value == str(runs_dir)

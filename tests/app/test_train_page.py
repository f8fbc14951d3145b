"""The Train page in Streamlit's AppTest: its form, defaults, validation and the run panel."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app import jobs
from spider.train import RunConfig

DEFAULTS = {f.name: f.default for f in RunConfig.__dataclass_fields__.values()}


def _errors(at) -> list[str]:
    return [e.value for e in at.error]


def _launch(at):
    return next(b for b in at.button if b.label == "Launch")


def test_the_form_starts_from_the_runners_defaults(app_page):
    at = app_page("train")
    assert not at.exception
    assert at.number_input(key="train_steps").label == "Steps"
    assert at.number_input(key="train_steps").value == DEFAULTS["steps"]
    assert at.number_input(key="train_lr").value == pytest.approx(DEFAULTS["lr"])
    assert at.number_input(key="train_batch").value == DEFAULTS["batch_size"]
    assert at.number_input(key="train_eval_every").value == DEFAULTS["eval_every"]
    assert at.number_input(key="train_save_every").value == DEFAULTS["save_every"]
    assert at.number_input(key="train_hybrid").value == DEFAULTS["hybrid_ratio"]
    assert at.multiselect(key="train_methods").value == ["spider"]
    assert at.selectbox(key="train_task").value == DEFAULTS["data"].removeprefix("builtin:")
    cuda = "CUDA is available" if torch.cuda.is_available() else "CUDA is not available"
    assert any(cuda in c.value for c in at.caption)
    assert not _errors(at) and not _launch(at).disabled
    # the spider method's options are offered with the method's own defaults and help
    assert at.text_input(key="train_opt_spider_mask").value == "weighted"
    assert "G/(I+G)" in at.text_input(key="train_opt_spider_mask").help


def test_bad_input_is_refused_with_the_reason_before_anything_starts(app_page, runs_dir,
                                                                    tmp_path):
    at = app_page("train")
    not_a_model = runs_dir / "not-a-model"
    not_a_model.mkdir()
    at.radio(key="train_model_choice").set_value("A model folder on this machine").run()
    at.text_input(key="train_model_path").set_value(str(not_a_model)).run()
    assert any("has no config.json" in e and "not-a-model" in e for e in _errors(at))
    assert _launch(at).disabled

    at.radio(key="train_model_choice").set_value("The bundled tiny LLaVA").run()
    bad = runs_dir / "bad.json"
    bad.write_text('[{"id": 1, "image": "missing.png", "conversations": []}]')
    at.radio(key="train_data_choice").set_value("A LLaVA-format JSON file").run()
    at.text_input(key="train_data_path").set_value(str(bad)).run()
    assert any("missing.png" in e and "does not exist" in e for e in _errors(at))

    at.radio(key="train_data_choice").set_value("A built-in task").run()
    at.multiselect(key="train_methods").set_value(["magnitude_mask"]).run()
    at.number_input(key="train_opt_magnitude_mask_ratio").set_value(2.0).run()
    assert any("'ratio'" in e and "[0, 1]" in e for e in _errors(at))
    assert _launch(at).disabled

    at.number_input(key="train_opt_magnitude_mask_ratio").set_value(0.3).run()
    at.text_input(key="train_name").set_value("../escape").run()
    assert any("../escape" in e for e in _errors(at))
    at.text_input(key="train_name").set_value("").run()
    assert not _errors(at) and not _launch(at).disabled
    assert not at.exception
    assert not (runs_dir / ".queue" / "pending").exists() or not any(
        (runs_dir / ".queue" / "pending").iterdir())  # nothing was queued


def test_a_path_outside_the_allowed_folders_is_refused(app_page):
    at = app_page("train")
    at.radio(key="train_data_choice").set_value("A LLaVA-format JSON file").run()
    at.text_input(key="train_data_path").set_value("/etc/passwd").run()
    assert any("outside the folders" in e for e in _errors(at))
    assert _launch(at).disabled


def test_launch_queues_one_run_per_method_with_the_forms_settings(app_page, runs_dir,
                                                                  monkeypatch):
    # nothing should actually train in this test: no supervisor is started
    monkeypatch.setattr(jobs, "ensure_supervisor", lambda root: False)
    at = app_page("train")
    at.number_input(key="train_steps").set_value(10).run()
    at.multiselect(key="train_methods").set_value(["spider", "full"]).run()
    at.text_input(key="train_opt_spider_mask").set_value("binary").run()
    at.text_input(key="train_name").set_value("mine").run()
    _launch(at).click().run()
    assert not at.exception and not _errors(at)
    queued = jobs.pending_jobs(runs_dir)
    assert [j.name for j in queued] == ["mine-spider", "mine-full"]
    args = queued[0].args
    assert args[args.index("--steps") + 1] == "10"
    assert args[args.index("--method") + 1] == "spider"
    assert "mask=binary" in args
    assert queued[1].args[queued[1].args.index("--method") + 1] == "full"
    # the panel shows the queue
    assert at.selectbox(key="train_watch_run").value == "mine-spider"
    assert any("Queued" in i.value for i in at.info)
    assert any(b.label == "Cancel" for b in at.button)
    next(b for b in at.button if b.label == "Cancel").click().run()
    assert [j.name for j in jobs.pending_jobs(runs_dir)] == ["mine-full"]


def _run(runs_dir: Path, name: str, **info) -> Path:
    run = runs_dir / name
    run.mkdir()
    base = {"schema_version": 2, "config": {"steps": 10, "data": "builtin:counting"},
            "method": "spider", "progress": {"step": 4, "steps": 10}}
    (run / "run.json").write_text(json.dumps({**base, **info}))
    return run


def test_the_panel_shows_how_each_run_ended(app_page, runs_dir):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _run(runs_dir, "failed-run", status="failed",
         error="loss is not finite at step 3; try a lower --lr")
    time.sleep(0.01)
    _run(runs_dir, "killed-run", status="running", pid=gone.pid)
    at = app_page("train")
    assert not at.exception
    assert at.selectbox(key="train_watch_run").options[:2] == ["killed-run", "failed-run"]
    assert any("**killed-run**" in m.value and "stopped unexpectedly" in m.value
               for m in at.markdown)
    assert any("Stopped unexpectedly" in w.value for w in at.warning)
    assert any(b.label == "Resume" for b in at.button)

    at.selectbox(key="train_watch_run").set_value("failed-run").run()
    (error,) = _errors(at)
    assert error.endswith("Failed: loss is not finite at step 3; try a lower --lr")
    assert not any(b.label in ("Resume", "Cancel") for b in at.button)
    assert "Traceback" not in error


def test_with_no_earlier_run_of_the_model_a_short_timing_gives_the_estimate(app_page, runs_dir):
    import shutil

    from spider.train import DEFAULT_MODEL

    model = runs_dir / "my-model"  # a copy: no run was ever made from this folder
    shutil.copytree(DEFAULT_MODEL, model, ignore=shutil.ignore_patterns("README.md"))
    at = app_page("train")
    at.radio(key="train_model_choice").set_value("A model folder on this machine").run()
    at.text_input(key="train_model_path").set_value(str(model)).run()
    assert not _errors(at)
    assert any("No earlier run of this model" in i.value for i in at.info)
    at.number_input(key="train_eval_limit").set_value(5).run()  # the timing evaluates as many
    next(b for b in at.button if b.key == "train_measure").click().run(timeout=600)
    assert not at.exception and not _errors(at)
    (estimate,) = [i.value for i in at.info if i.value.startswith("Estimated time")]
    assert "from 1 earlier run of this model" in estimate
    timing_runs = list((runs_dir / ".queue" / "timings").iterdir())
    assert len(timing_runs) == 1 and (timing_runs[0] / "run.json").exists()
    assert json.loads((timing_runs[0] / "run.json").read_text())["config"]["eval_limit"] == 5


def test_every_invalid_number_is_named_and_launch_stays_off_until_fixed(app_page, runs_dir):
    """Steps 0, Evaluate-every 0 and hybrid ratio 1.0 are each named; Launch is off (its
    help says why) until all are fixed. The boxes have no min/max, so the browser never
    holds such a value back while the page launches with the previous one (see
    test_e2e_train.py)."""
    at = app_page("train")
    at.number_input(key="train_steps").set_value(0).run()
    at.number_input(key="train_eval_every").set_value(0).run()
    at.number_input(key="train_hybrid").set_value(1.0).run()
    errors = _errors(at)
    assert "“Steps” must be at least 1, not 0" in errors
    assert "“Evaluate every (steps)” must be at least 1, not 0" in errors
    assert "“Hybrid ratio” must be in [0, 1), not 1.0" in errors
    assert _launch(at).disabled and "3 problem(s)" in _launch(at).help
    for key, good in (("train_steps", 10), ("train_eval_every", 5), ("train_hybrid", 0.5)):
        assert _launch(at).disabled
        at.number_input(key=key).set_value(good).run()
    assert not _errors(at) and not _launch(at).disabled
    for widget in at.number_input:
        if widget.key.startswith("train_") and not widget.key.startswith("train_opt_"):
            assert not widget.proto.has_min and not widget.proto.has_max, widget.key


def test_a_missing_model_is_missing_and_the_allowed_folders_are_listed_once(app_page):
    from app import common

    at = app_page("train")
    at.radio(key="train_model_choice").set_value("A model folder on this machine").run()
    at.text_input(key="train_model_path").set_value("/nonexistent/model").run()
    assert "The path /nonexistent/model does not exist." in _errors(at)
    at.radio(key="train_data_choice").set_value("A LLaVA-format JSON file").run()
    at.text_input(key="train_data_path").set_value("/etc/passwd").run()
    (outside,) = [e for e in _errors(at) if "outside the folders" in e]
    listed = outside.split("(", 1)[1].rstrip(").").split(", ")
    assert len(listed) == len(set(listed)), listed  # the repository was listed twice
    assert str(common.REPO_ROOT.resolve()) in listed
    assert str(Path.home().resolve()) not in listed  # the home folder is not implied


def test_a_cancelled_run_says_the_step_it_reached(app_page, runs_dir):
    _run(runs_dir, "stopped", status="cancelled",
         progress={"step": 40, "steps": 5000, "saved_step": 40})
    at = app_page("train")
    assert not at.exception
    (warning,) = [w.value for w in at.warning if "Cancelled" in w.value]
    assert warning.startswith("Cancelled at step 40 of 5000.")
    assert "continues from the last one, at step 40" in warning


# ----------------------------------------------------------------------------- presets, launches
def _page_links(at) -> list:
    return [e.proto for e in at.get("page_link")]


def test_the_spider_vs_full_preset_fills_the_form_from_the_address_and_never_launches(
        app_page, runs_dir, monkeypatch):
    monkeypatch.setattr(jobs, "ensure_supervisor", lambda root: False)
    at = app_page("train", query={"preset": "spider_vs_full"})
    assert not at.exception and not _errors(at)
    assert at.multiselect(key="train_methods").value == ["spider", "full"]
    assert at.number_input(key="train_steps").value == DEFAULTS["steps"]
    assert any("SPIDER vs full" in i.value and "Launch" in i.value for i in at.info)
    assert not jobs.pending_jobs(runs_dir)  # filled in, not launched
    assert "preset" not in at.query_params  # applied once: a rerun keeps the user's edits
    at.number_input(key="train_steps").set_value(7).run()
    assert at.multiselect(key="train_methods").value == ["spider", "full"]
    assert at.number_input(key="train_steps").value == 7
    _launch(at).click().run()
    assert not at.exception and not _errors(at)
    queued = jobs.pending_jobs(runs_dir)
    assert [q.args[q.args.index("--method") + 1] for q in queued] == ["spider", "full"]
    assert all(q.args[q.args.index("--steps") + 1] == "7" for q in queued)
    # the two runs are one launch: watched together, one Cancel each
    names = [q.name for q in queued]
    assert jobs.launch_groups(runs_dir)[names[1]] == names
    assert at.selectbox(key="train_watch_run").value == names[0]
    assert sum(b.label == "Cancel" for b in at.button) == 2
    assert sum("Queued" in i.value for i in at.info) == 2


def test_the_preset_button_puts_back_the_defaults_and_sets_the_methods(app_page):
    at = app_page("train")
    at.multiselect(key="train_methods").set_value(["lora"]).run()
    at.number_input(key="train_steps").set_value(3).run()
    next(b for b in at.button if b.key == "train_preset_spider_vs_full").click().run()
    assert not at.exception
    assert at.multiselect(key="train_methods").value == ["spider", "full"]
    assert at.number_input(key="train_steps").value == DEFAULTS["steps"]
    assert at.text_input(key="train_opt_spider_mask").value == "weighted"
    assert not _errors(at) and not _launch(at).disabled


def test_an_unknown_preset_in_the_address_is_named_in_one_sentence(app_page):
    at = app_page("train", query={"preset": "nope"})
    assert not at.exception
    (warning,) = [w.value for w in at.warning if "preset" in w.value]
    assert "“nope”" in warning and "spider_vs_full" in warning
    assert at.multiselect(key="train_methods").value == ["spider"]


def _done_run(runs_dir: Path, name: str, method: str, step_scores: list[tuple[int, float]]):
    run = _run(runs_dir, name, status="done", method=method,
               progress={"step": 6, "steps": 6}, summary={"U": 0.5, "D": 0.4, "H": 0.44})
    lines = [{"event": "train", "step": s, "loss": 1.0 / (s + 1), "lr": 1e-3, "seconds": 0.1}
             for s in range(1, 7)]
    for step, score in step_scores:
        lines += [{"event": "eval", "step": step, "split": split, "metric": "score",
                   "value": score, "n": 5} for split in ("upstream", "downstream")]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


def test_the_runs_of_one_launch_share_the_live_chart_and_open_together_in_compare(
        app_page, runs_dir):
    from analysis.figures.style import run_colors

    _done_run(runs_dir, "pair-spider", "spider", [(0, 0.5), (3, 0.6), (6, 0.7)])
    _done_run(runs_dir, "pair-full", "full", [(0, 0.5), (3, 0.3), (6, 0.2)])
    time.sleep(0.01)
    _done_run(runs_dir, "alone", "spider", [(0, 0.5)])  # newest, launched on its own
    jobs._record_launch(runs_dir, ["pair-spider", "pair-full"])
    at = app_page("train")
    assert not at.exception
    box = at.selectbox(key="train_watch_run")
    assert box.options == ["alone", "pair-spider + pair-full (2 runs)"]
    box.set_value("pair-spider").run()
    assert not at.exception
    # both runs' status, each with its chart colour beside the name
    for name in ("pair-spider", "pair-full"):
        assert any(f"**{name}**" in m.value and "done" in m.value for m in at.markdown)
    assert sum(s.value.startswith("Done.") for s in at.success) == 2
    # one scores chart with both runs, coloured as Compare colours them (samples first)
    charts = {c.proto.id: json.loads(c.proto.spec) for c in at.get("plotly_chart")}
    scores = next(spec for spec in charts.values()
                  if "Scores over training" in spec["layout"]["title"]["text"])
    named = {t["name"]: t["line"]["color"] for t in scores["data"] if t.get("showlegend")}
    from app import common

    ids = list(common.list_all_runs()["id"])
    samples = sorted(i for i in ids if i.startswith("samples/"))
    expected = run_colors([*samples, *sorted(i for i in ids if not i.startswith("samples/"))])
    assert named == {"pair-spider (spider)": expected["pair-spider"],
                     "pair-full (full)": expected["pair-full"]}
    assert expected["pair-spider"] != expected["pair-full"]
    (link,) = [p for p in _page_links(at) if p.label == "Open in Compare"]
    assert link.query_string == "runs=pair-spider&runs=pair-full"

"""analysis.attribute: revert groups of a run's update, score again, read the rows back."""

from __future__ import annotations

import pytest

from analysis import load_run
from analysis.attribute import ALL, ATTRIBUTION_COLUMNS, NONE, group_of, groups_of, main
from spider.rundir import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_path(tmp_path_factory, one_thread):
    from spider.train import main as train

    out = tmp_path_factory.mktemp("attr") / "run"
    train(["--output-dir", str(out), "--method", "full", "--steps", "2", "--batch-size", "4",
           "--eval-every", "2", "--eval-limit", "4", "--log-every", "1", "--save-every", "2",
           "--device", "cpu", "--train-size", "16", "--lr", "3e-3"])
    return out


def test_groups_follow_spider_naming():
    params = ["model.multi_modal_projector.linear_1.weight",
              "model.language_model.layers.1.self_attn.q_proj.weight",
              "model.language_model.layers.0.mlp.down_proj.weight",
              "model.language_model.layers.0.self_attn.q_proj.weight"]
    assert list(groups_of(params, "component")) == ["projector", "llm"]
    assert list(groups_of(params, "layer")) == ["projector", "llm.0", "llm.1"]
    assert groups_of(params, "module")["q_proj"] == [params[1], params[3]]
    assert group_of(params[0], "module") == "projector"


def test_reference_rows_equal_the_runs_own_evaluations_and_rows_resume(run_path, capsys):
    main([str(run_path), "--by", "component"])
    frame = load_run(run_path).attribution
    assert tuple(frame.columns) == ATTRIBUTION_COLUMNS
    events = RunDir(run_path).read_events()

    def logged(step):
        return {e["split"]: e["value"] for e in events
                if e["event"] == "eval" and e["metric"] == "score" and e["step"] == step}

    rows = {r.group: r.scores for r in RunDir(run_path).read_attribution()}
    assert rows[NONE] == {s: logged(2)[s] for s in ("upstream", "downstream")}
    assert rows[ALL] == {s: logged(0)[s] for s in ("upstream", "downstream")}
    assert {"llm", "projector"} <= set(rows)
    none = frame[frame["group"] == NONE].iloc[0]
    assert none["dU"] == 0 and none["dD"] == 0
    assert "(none)" in capsys.readouterr().out

    # a second call finds every group written and adds nothing
    size = RunDir(run_path).attribution_file.stat().st_size
    main([str(run_path), "--by", "component"])
    assert RunDir(run_path).attribution_file.stat().st_size == size


@pytest.mark.parametrize("args, message", [
    (["--step", "1"], "no checkpoint of step 1"),
    (["--by", "head"], "--by"),
    (["--eval-limit", "0"], "--eval-limit"),
])
def test_bad_input_is_one_error_line_and_exit_2(run_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main([str(run_path), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_a_missing_run_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "nowhere")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error:")


def test_the_run_logged_output_drift_at_every_evaluation(run_path):
    frame = load_run(run_path).metrics
    drift = frame[(frame["split"] == "upstream") & frame["metric"].isin(
        ["kl_to_base", "format_errors", "content_errors", "answer_type_drift"])]
    assert sorted(drift["step"].unique()) == [0, 2]
    values = drift.set_index(["step", "metric"])["value"]
    assert values[(0, "kl_to_base")] == 0.0 and values[(2, "kl_to_base")] > 0
    assert drift[drift["metric"] != "kl_to_base"]["value"].between(0, 1).all()

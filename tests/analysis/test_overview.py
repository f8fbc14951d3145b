"""analysis.overview: "D measured on" says how many examples were scored (issue 23, item 10)."""

import json
import shutil
from pathlib import Path

import pytest

from analysis import overview

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints" / "runs"


@pytest.mark.parametrize("source, scored, expected", [
    # --eval-limit 100 on a 300-example test split: the 100 scored, and what they came from
    ({"kind": "test_split", "examples": 300}, 100, "test split (100 of 300)"),
    ({"kind": "test_split", "examples": 300}, 300, "test split (300 examples)"),
    ({"kind": "test_split", "examples": 300}, None, "test split (300 examples)"),
    ({"kind": "eval_data", "data": "b.json", "examples": 40}, 20, "b.json (20 of 40)"),
    ({"kind": "held_out", "data": "a.json", "examples": 30, "of": 300}, 20,
     "30 of 300 records, held out of training; 20 of them scored"),
    (None, 100, "test split (100 examples)"),  # a run from before run.json said
])
def test_eval_text_counts_the_examples_scored(source, scored, expected):
    info = {"config": {"data": "builtin:counting"},
            **({"downstream_eval": source} if source else {})}
    assert overview.eval_text(info, scored) == expected


def test_scored_examples_is_the_last_downstream_score_n():
    events = [{"event": "eval", "split": "downstream", "metric": "score", "value": 0.1, "n": 300},
              {"event": "eval", "split": "upstream", "metric": "score", "value": 0.9, "n": 50},
              {"event": "eval", "split": "downstream", "metric": "task:x", "value": 0.1, "n": 7},
              {"event": "eval", "split": "downstream", "metric": "score", "value": 0.2, "n": 20},
              {"event": "train", "step": 3, "loss": 1.0}]
    assert overview.scored_examples(events) == 20
    assert overview.scored_examples(events[1:3]) is None


def test_run_overview_reads_the_count_from_the_log(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "hybrid", run, ignore=shutil.ignore_patterns("checkpoints"))
    info = json.loads((run / "run.json").read_text())
    info["downstream_eval"] = {"kind": "test_split", "data": "builtin:counting", "examples": 300}
    (run / "run.json").write_text(json.dumps(info))
    row = overview.run_overview(run).iloc[0]
    last_n = [json.loads(line).get("n") for line in (run / "metrics.jsonl").open()
              if '"downstream", "metric": "score"' in line][-1]
    assert row["eval_examples"] == last_n == 100
    assert row["evaluated_on"] == "test split (100 of 300)"

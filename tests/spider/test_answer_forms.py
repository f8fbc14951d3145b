"""spider.answer_forms: answer forms, expected forms, format vs content errors, drift."""

from __future__ import annotations

import pytest

from spider.answer_forms import (
    BUILTIN_TASK_FORMS,
    FORMS,
    answer_form,
    dominant_form,
    example_correct,
    expected_form,
    form_metrics,
)
from spider.data.records import Example, Turn


def _ex(answer: str, task: str = "vqa", metric: str = "exact", refs=None) -> Example:
    return Example(id=task, image=None, turns=[Turn("q", answer)], task=task, metric=metric,
                   references=refs or [])


@pytest.mark.parametrize("text, form", [
    ("", "empty"), ("  ", "empty"), ("three", "number"), ("3", "number"), ("Three.", "number"),
    ("3.5", "number"), ("none", "number"), ("Yes", "yes-no"), ("no.", "yes-no"),
    ("A", "choice"), ("(b)", "choice"), ("C.", "choice"), ("red", "color"),
    ("The red.", "color"), ("square", "shape"), ("circles", "shape"), ("dog", "word"),
    ("a red circle in the middle", "text"), ("3 squares", "text"),
])
def test_answer_form(text, form):
    assert answer_form(text) == form and form in FORMS


def test_the_builtin_tasks_references_have_their_tasks_forms():
    from spider.data import load_dataset

    for name in ("upstream", "counting", "digit-sum"):
        data = load_dataset(f"builtin:{name}", "test", seed=0)
        for i in range(12):
            example = data[i]
            assert expected_form(example) == BUILTIN_TASK_FORMS[example.task], example


def test_format_and_content_errors_and_answer_type_drift():
    examples = [_ex("red"), _ex("blue"), _ex("square"), _ex("three")]
    # right, right form but wrong, wrong form (a number), right
    predictions = ["red", "green", "two", "3"]
    metrics = form_metrics(examples, predictions, downstream_form="number")
    assert metrics["format_errors"] == 0.25 and metrics["content_errors"] == 0.25
    # among the three non-number questions, one was answered with a number
    assert metrics["answer_type_drift"] == pytest.approx(1 / 3)
    assert "answer_type_drift" not in form_metrics(examples[3:], ["3"], "number")
    assert dominant_form(examples) == "color" and dominant_form([]) is None


def test_a_caption_is_right_when_it_earns_half_the_references_cider():
    refs = [["a red circle on the left", "there is a red circle on the left"],
            ["a blue square in the middle", "there is a blue square in the middle"],
            ["a green triangle at the top", "there is a green triangle at the top"]]
    examples = [_ex(r[0], "caption", "cider", r) for r in refs]
    assert example_correct(examples, [r[0] for r in refs]) == [True] * 3
    assert example_correct(examples, ["two", "a blue square in the middle", ""]) == [
        False, True, False]
    metrics = form_metrics(examples, ["two", "a blue square in the middle", "a blue square"])
    assert metrics["format_errors"] == pytest.approx(1 / 3)
    assert metrics["content_errors"] == pytest.approx(1 / 3)

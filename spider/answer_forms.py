"""The form of an answer (a number, yes/no, a colour, free text...) and the forgetting it shows.

"Superficial" forgetting changes the form of the answers (a colour question answered with a
number after fine-tuning on counting); "essential" forgetting keeps the form but loses the
content (the right kind of answer, wrong). :func:`form_metrics` measures both on an
evaluation split, plus how many answers took the downstream task's form (the counting bias).

Forms (:data:`FORMS`), decided on the normalised answer (``spider.metrics.normalize_answer``:
number words are digits, articles dropped):

* ``empty``: nothing;
* ``number``: one number ("three", "3", "3.5");
* ``yes-no``: "yes" or "no";
* ``choice``: a multiple-choice letter ("A", "(b)", "C.");
* ``color`` / ``shape``: one of the built-in scenes' colour or shape words (plurals too);
* ``word``: any other single word;
* ``text``: more than one word (a caption, a sentence).

An example's expected form is its reference answer's (the most common form of its
references). The built-in tasks' expected forms are :data:`BUILTIN_TASK_FORMS`
(``tests/spider/test_answer_forms.py`` checks the references agree).
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence

from spider.data.records import Example
from spider.data.scenes import COLORS, PLURALS, SHAPES

FORMS = ("empty", "number", "yes-no", "choice", "color", "shape", "word", "text")

BUILTIN_TASK_FORMS = {
    "caption": "text",
    "digit": "number",
    "color": "color",
    "shape": "shape",
    "counting": "number",
    "digit-sum": "number",
}
"""The expected form of each built-in task's answers (``spider.data.builtin``)."""

_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
_CHOICE = re.compile(r"^\(?([A-Za-z])[).:]?$")
_SHAPE_WORDS = frozenset(SHAPES) | frozenset(PLURALS.values())
_COLOR_WORDS = frozenset(COLORS)


def answer_form(text: str) -> str:
    """The form of one answer: one of :data:`FORMS`.

    >>> [answer_form(a) for a in ("Three.", "yes", "(B)", "red", "circles", "dog", "a red circle")]
    ['number', 'yes-no', 'choice', 'color', 'shape', 'word', 'text']
    """
    from spider.metrics import normalize_answer

    stripped = text.strip()
    words = normalize_answer(stripped).split()
    if not words:
        return "empty"
    if len(words) > 1:
        return "text"
    word = words[0]
    if _NUMBER.match(word):
        return "number"
    if word in ("yes", "no"):
        return "yes-no"
    if _CHOICE.match(stripped) and len(word) == 1 and word.isalpha():
        return "choice"
    if word in _COLOR_WORDS:
        return "color"
    if word in _SHAPE_WORDS:
        return "shape"
    return "word"


def expected_form(example: Example) -> str:
    """The form an answer to ``example`` should take: its references' most common form
    (ties: the first reference's)."""
    refs = list(example.references) or [example.answer]
    counts = Counter(answer_form(r) for r in refs)
    first = answer_form(refs[0])
    best = max(counts.values())
    return first if counts[first] == best else counts.most_common(1)[0][0]


def dominant_form(examples: Sequence[Example]) -> str | None:
    """The most common expected form of ``examples`` (None when there are none): the form
    of a downstream task's answers."""
    counts = Counter(expected_form(e) for e in examples)
    return counts.most_common(1)[0][0] if counts else None


@functools.lru_cache(maxsize=16)
def _ceilings(refs: tuple[tuple[str, ...], ...]) -> list[float]:
    """Each example's first reference's CIDEr-D (the same references at every evaluation:
    computed once)."""
    from spider.metrics import cider_d

    return cider_d([r[0] for r in refs], [list(r) for r in refs])[1]


def example_correct(examples: Sequence[Example], predictions: Sequence[str]) -> list[bool]:
    """Whether each prediction is right: an exact match of a reference for ``exact`` tasks;
    for ``cider`` tasks, a CIDEr-D (within the task's examples, as scored) of at least half
    the one its first reference earns."""
    from spider.metrics import cider_d, exact_match

    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    correct = [False] * len(examples)
    captions: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        if example.metric == "cider":
            captions.setdefault(example.task, []).append(i)
        else:
            correct[i] = bool(exact_match(predictions[i], list(example.references)))
    for indices in captions.values():
        refs = [list(examples[i].references) for i in indices]
        _, scores = cider_d([predictions[i] for i in indices], refs)
        ceilings = _ceilings(tuple(tuple(r) for r in refs))
        for i, score, ceiling in zip(indices, scores, ceilings, strict=True):
            correct[i] = score > 0 and score >= 0.5 * ceiling
    return correct


def form_metrics(examples: Sequence[Example], predictions: Sequence[str],
                 downstream_form: str | None = None) -> dict[str, float]:
    """Shares of ``examples`` answered in the wrong form (``format_errors``) and in the right
    form but wrong (``content_errors``); with ``downstream_form``, ``answer_type_drift``: the
    share, among the examples whose expected form is another one, answered in that form
    (absent when every example expects it). Every share is in [0, 1]."""
    if not examples:
        raise ValueError("form_metrics got no examples")
    expected = [expected_form(e) for e in examples]
    given = [answer_form(p) for p in predictions]
    correct = example_correct(examples, predictions)
    n = len(examples)
    wrong_form = [e != g for e, g in zip(expected, given, strict=True)]
    result = {
        "format_errors": sum(wrong_form) / n,
        "content_errors": sum(not w and not c for w, c in zip(wrong_form, correct, strict=True))
        / n,
    }
    if downstream_form is not None:
        others = [g for e, g in zip(expected, given, strict=True) if e != downstream_form]
        if others:
            result["answer_type_drift"] = sum(g == downstream_form for g in others) / len(others)
    return result

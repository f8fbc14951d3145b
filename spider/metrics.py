"""Scoring model answers: normalised exact match, CIDEr-D, per-task scores, forgetting summaries.

Everything here is pure Python + numpy so that evaluation results can be recomputed from a
run directory's saved predictions without a GPU or torch.

Three layers:

* per answer: :func:`normalize_answer`, :func:`exact_match` (VQA-style short answers);
* per corpus: :func:`cider_d` (captions, Vedantam et al. 2015, CIDEr-D as implemented in the
  coco-caption reference code);
* per evaluation split: :func:`score_predictions` turns a list of
  :class:`~spider.data.records.Example` and predictions into one main score in [0, 1]
  (what ``metrics.jsonl`` records as ``"score"``), task-balanced;
* per run: :func:`harmonic_mean` and :func:`summary` condense upstream / downstream scores
  before and after fine-tuning into the numbers the papers report (H, E, F, O).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only for type hints; keeps this module importable without PIL
    from spider.data.records import Example

# --------------------------------------------------------------------------------------------
# Short answers: normalisation and exact match
# --------------------------------------------------------------------------------------------

#: Number words mapped to digits, so "Three." == "3" == "three". "none" -> "0" follows the
#: VQA evaluation script's ``manualMap`` (a counting answer "none" means zero). "no" is NOT
#: mapped: it is the answer to every yes/no question, and "no" == "0" would be wrong there.
NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
    "thirteen": "13",
    "fourteen": "14",
    "fifteen": "15",
    "sixteen": "16",
    "seventeen": "17",
    "eighteen": "18",
    "nineteen": "19",
    "twenty": "20",
}

ARTICLES = frozenset({"a", "an", "the"})

_APOSTROPHES = re.compile(r"['\u2019`]")
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")  # "1,000" -> "1000"
# Punctuation and symbols (unicode letters and digits are word characters), except a point
# between two digits: "3.5" keeps its decimal point, "dog." loses its full stop.
_PUNCTUATION = re.compile(r"[^\w\s.]|_|(?<!\d)\.|\.(?!\d)")


def _strip_punctuation(text: str) -> str:
    """Lowercase; drop apostrophes and thousands commas; other punctuation -> space."""
    text = _APOSTROPHES.sub("", text.lower())
    text = _DIGIT_COMMA.sub("", text)
    return _PUNCTUATION.sub(" ", text)


def normalize_answer(text: str) -> str:
    """Normalise a short answer for exact-match scoring (VQA-style, simplified).

    Steps, in order: lowercase; drop apostrophes ("don't" -> "dont", "dog's" -> "dogs");
    drop thousands commas between digits ("1,000" -> "1000"); keep decimal points between
    digits ("3.5"); turn every other punctuation character into a space; map number words
    (:data:`NUMBER_WORDS`, "zero".."twenty" and "none") to digits; drop the articles
    a/an/the; collapse whitespace.

    Articles are dropped only when another word remains: an answer that is *only* an
    article is kept as is. Otherwise the multiple-choice answer "A" would normalise to ""
    and an empty prediction would match it.

    >>> normalize_answer("Three.") == normalize_answer("3") == normalize_answer("three")
    True
    >>> normalize_answer("The Dog!")
    'dog'
    >>> normalize_answer("A")
    'a'
    """
    words = [NUMBER_WORDS.get(word, word) for word in _strip_punctuation(text).split()]
    without_articles = [word for word in words if word not in ARTICLES]
    if without_articles:
        words = without_articles
    return " ".join(words)


def exact_match(pred: str, references: Sequence[str] | str) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0.

    ``references`` may be a single string. An empty reference list is a caller bug (every
    :class:`Example` has at least one) and raises ``ValueError``.
    """
    if isinstance(references, str):
        references = [references]
    if len(references) == 0:
        raise ValueError("exact_match needs at least one reference answer")
    normalised_pred = normalize_answer(pred)
    return float(any(normalised_pred == normalize_answer(ref) for ref in references))


# --------------------------------------------------------------------------------------------
# Captions: CIDEr-D
# --------------------------------------------------------------------------------------------

CIDER_MAX = 10.0
"""The largest CIDEr-D an example can get (see :func:`cider_d`); divisor for the [0, 1] score."""


def tokenize_caption(text: str) -> list[str]:
    """Lowercase, remove punctuation, split on whitespace.

    A stand-in for the PTB tokenizer that coco-caption runs (Java, not available here): it
    lowercases and drops punctuation tokens. We drop apostrophes ("dog's" -> "dogs") and
    thousands commas, keep decimal points ("3.5") and turn other punctuation into spaces,
    which agrees with it on ordinary captions. Articles are
    kept: in CIDEr-D they carry ~0 weight anyway, because they occur in nearly every
    reference (IDF ~ 0).
    """
    return _strip_punctuation(text).split()


def _ngram_counts(tokens: Sequence[str], max_n: int) -> Counter[tuple[str, ...]]:
    """Counts of every 1..max_n-gram (as a tuple of words) in ``tokens``."""
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_n + 1):
        for start in range(len(tokens) - n + 1):
            counts[tuple(tokens[start : start + n])] += 1
    return counts


def _tfidf(
    counts: Counter[tuple[str, ...]],
    document_frequency: Counter[tuple[str, ...]],
    log_num_docs: float,
    max_n: int,
) -> tuple[list[dict[tuple[str, ...], float]], np.ndarray]:
    """TF-IDF vector per n-gram order and its L2 norm.

    g_k(s) = h_k(s) * (log N - log max(1, df_k)), with h_k the raw count (coco-caption does
    not divide by the sentence's n-gram total: that factor cancels in the cosine).
    N-grams never seen in any reference get df = 0 -> idf = log N.
    """
    vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(max_n)]
    norms = np.zeros(max_n)
    for ngram, count in counts.items():
        order = len(ngram) - 1
        weight = count * (log_num_docs - math.log(max(1.0, document_frequency[ngram])))
        vectors[order][ngram] = weight
        norms[order] += weight * weight
    return vectors, np.sqrt(norms)


def cider_d(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    max_n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, list[float]]:
    """CIDEr-D of a corpus of candidate captions, and of each candidate.

    Implements CIDEr-D (Vedantam, Zitnick, Parikh, "CIDEr: Consensus-based Image Description
    Evaluation", CVPR 2015) exactly as the coco-caption reference code does
    (``pycocoevalcap/cider/cider_scorer.py``)::

        idf(w)        = log N - log max(1, df(w))         df: number of examples whose
                                                           references contain n-gram w
        g_n(s)        = [count_s(w) * idf(w)]_w            one vector per order n = 1..4
        sim_n(c, r)   = sum_w min(g_n(c)_w, g_n(r)_w) * g_n(r)_w / (|g_n(c)| |g_n(r)|)
                        * exp(-(len_c - len_r)^2 / (2 sigma^2)),  sigma = 6
        CIDEr-D(c, R) = 10 * mean_n( (1/|R|) * sum_{r in R} sim_n(c, r) )
        corpus score  = mean over examples

    ``N`` is the number of examples (images), so document frequencies, and therefore every
    score, depend on the whole evaluated corpus: score a split in one call, not example by
    example. With ``N == 1`` every idf is 0 and every score is 0, as in the reference code.

    "-D" (the variant everyone reports): the ``min`` clips a candidate's n-gram weight at
    the reference's, so repeating a matching word does not raise the score; the Gaussian
    penalty punishes length differences; no stemming.

    Range: every ``sim_n`` is in [0, 1] (non-negative weights, Cauchy-Schwarz, and clipping
    only lowers the numerator), so an example's score is in [0, 10] (:data:`CIDER_MAX`).
    It reaches 10 exactly when the candidate equals its single reference and, for every
    n = 1..4, contains an n-gram that not all N examples' references contain (needs >= 4
    words). An identical caption shorter than 4 words gets 10 * (#words) / 4 at most, since
    it has no n-grams of the missing orders.

    Lengths are word counts. The reference code counts bigrams (``len - 1``); the difference
    of the two is the same whenever both sentences have a word, and when either is empty the
    score is 0 either way.

    Raises ``ValueError`` if the lists differ in length or an example has no reference.
    """
    if len(candidates) != len(references):
        raise ValueError(
            f"cider_d got {len(candidates)} candidates but {len(references)} reference lists"
        )
    if len(candidates) == 0:
        return 0.0, []
    for index, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(
                f"cider_d: references[{index}] must be a non-empty list of strings, got {refs!r}"
            )

    cand_tokens = [tokenize_caption(c) for c in candidates]
    ref_tokens = [[tokenize_caption(r) for r in refs] for refs in references]
    cand_counts = [_ngram_counts(tokens, max_n) for tokens in cand_tokens]
    ref_counts = [[_ngram_counts(tokens, max_n) for tokens in refs] for refs in ref_tokens]

    # Document frequency: in how many examples' reference sets each n-gram occurs.
    document_frequency: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts:
        document_frequency.update(set().union(*refs))
    log_num_docs = math.log(float(len(candidates)))

    two_sigma_sq = 2.0 * sigma * sigma
    scores: list[float] = []
    for c_tokens, c_counts, r_tokens_list, r_counts_list in zip(
        cand_tokens, cand_counts, ref_tokens, ref_counts, strict=True
    ):
        c_vec, c_norm = _tfidf(c_counts, document_frequency, log_num_docs, max_n)
        per_order = np.zeros(max_n)
        for r_tokens, r_counts in zip(r_tokens_list, r_counts_list, strict=True):
            r_vec, r_norm = _tfidf(r_counts, document_frequency, log_num_docs, max_n)
            penalty = math.exp(-((len(c_tokens) - len(r_tokens)) ** 2) / two_sigma_sq)
            for order in range(max_n):
                if c_norm[order] == 0.0 or r_norm[order] == 0.0:
                    continue  # numerator is 0 too: no shared informative n-gram
                clipped_dot = sum(
                    min(weight, r_vec[order].get(ngram, 0.0)) * r_vec[order].get(ngram, 0.0)
                    for ngram, weight in c_vec[order].items()
                )
                per_order[order] += clipped_dot / (c_norm[order] * r_norm[order]) * penalty
        scores.append(float(CIDER_MAX * per_order.mean() / len(r_counts_list)))
    return float(np.mean(scores)), scores


# --------------------------------------------------------------------------------------------
# Per-task scores of an evaluation split
# --------------------------------------------------------------------------------------------

METRIC_NAMES = {"exact": "accuracy", "cider": "cider_d"}


def score_predictions(examples: Sequence[Example], predictions: Sequence[str]) -> dict:
    """Score predictions per task, and one task-balanced main score in [0, 1].

    Each example is scored by its own ``metric`` (all examples of a task must agree):

    * ``"exact"``: accuracy of :func:`exact_match` against ``references``; value and score
      are the same number in [0, 1];
    * ``"cider"``: :func:`cider_d` over that task's examples only (so idf comes from that
      task's references); value is the raw CIDEr-D in [0, 10]; ``ceiling`` is the CIDEr-D
      the data's own captions earn (each example's first reference scored against all its
      references, same idf), and score is ``min(value / ceiling, 1)``: 1 means "as good as
      the reference caption". With one reference per example of >= 4 words the ceiling is
      10 (see :func:`cider_d`), the usual ``value / 10``; with paraphrased references it is
      lower (8.45 on ``builtin:upstream``'s test split), and a perfect answer still maps
      to 1 instead of being capped by the references' disagreement with each other.

    The overall ``score`` is the mean of the task scores, so a task with few examples
    counts as much as a big one (a 10-example caption task is not drowned by 1,000 digit
    questions).

    Returns ``{"score": float, "n": int, "tasks": {task: {"metric": "accuracy" | "cider_d",
    "value": float, "score": float, "n": int[, "ceiling": float]}}}``, tasks in order of first appearance.
    Raises ``ValueError`` if the lengths differ, there is nothing to score, a metric is
    unknown, or a task mixes metrics.
    """
    if len(examples) != len(predictions):
        raise ValueError(
            f"score_predictions got {len(examples)} examples but {len(predictions)} predictions"
        )
    if len(examples) == 0:
        raise ValueError("score_predictions got no examples to score")

    by_task: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        if example.metric not in METRIC_NAMES:
            raise ValueError(
                f"example {example.id!r} has unknown metric {example.metric!r}; "
                f"expected one of {sorted(METRIC_NAMES)}"
            )
        by_task.setdefault(example.task, []).append(index)

    tasks: dict[str, dict] = {}
    for task, indices in by_task.items():
        metrics = {examples[i].metric for i in indices}
        if len(metrics) != 1:
            raise ValueError(f"task {task!r} mixes metrics {sorted(metrics)}; use one per task")
        (metric,) = metrics
        preds = [predictions[i] for i in indices]
        refs = [list(examples[i].references) for i in indices]
        if metric == "exact":
            value = float(np.mean([exact_match(p, r) for p, r in zip(preds, refs, strict=True)]))
            score = value
        else:
            value, _ = cider_d(preds, refs)
            ceiling, _ = cider_d([r[0] for r in refs], refs)
            score = min(value / ceiling, 1.0) if ceiling > 0 else 0.0
        tasks[task] = {
            "metric": METRIC_NAMES[metric],
            "value": value,
            "score": score,
            "n": len(indices),
        }
        if metric == "cider":
            tasks[task]["ceiling"] = ceiling

    overall = float(np.mean([entry["score"] for entry in tasks.values()]))
    return {"score": overall, "n": len(examples), "tasks": tasks}


# --------------------------------------------------------------------------------------------
# Run summaries: upstream (pre-training ability) vs downstream (fine-tuning task)
# --------------------------------------------------------------------------------------------


def harmonic_mean(u, d):
    """H = 2·U·D / (U + D), the "H-Average" of upstream U and downstream D (SPIDER paper).

    Rewards balance: a method that forgets everything (U = 0) gets H = 0 however good D is.
    U and D must be on the same scale (e.g. both main scores in [0, 1]). Returns 0 when
    U + D == 0. Takes numbers (returns a float) or arrays / Series of equal length (returns
    an array, 0 where U + D is not positive); the project's one definition of H.
    """
    if np.ndim(u) == 0 and np.ndim(d) == 0:
        total = u + d
        if total == 0:
            return 0.0
        return 2.0 * u * d / total
    u, d = np.asarray(u, dtype=float), np.asarray(d, dtype=float)
    total = u + d
    positive = total > 0
    return np.where(positive, 2.0 * u * d / np.where(positive, total, 1.0), 0.0)


def summary(u_base: float, d_base: float, u_ft: float, d_ft: float) -> dict[str, float]:
    """Upstream/downstream trade-off of one fine-tuning run, as the papers report it.

    Inputs are the upstream (U) and downstream (D) scores of the base model and of the
    fine-tuned one, all on one scale. Returns

    * ``U = u_ft``, ``D = d_ft`` and ``H = 2UD / (U + D)`` (SPIDER, Huang et al. ICML 2025);
    * from the tuning survey (Huang et al. 2025, "Keeping Yourself is Important in
      Downstream Tuning Multimodal Large Language Model"):
      ``E = D_ft - D_base`` (task-expert specialisation: downstream gain),
      ``F = U_ft - U_base`` (open-world stabilisation: upstream change, negative means
      forgetting) and ``O = E + F`` (overall).
    """
    gain = d_ft - d_base
    upstream_change = u_ft - u_base
    return {
        "U": u_ft,
        "D": d_ft,
        "H": harmonic_mean(u_ft, d_ft),
        "E": gain,
        "F": upstream_change,
        "O": gain + upstream_change,
    }

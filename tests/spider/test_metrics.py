"""Tests for spider.metrics: answer normalisation, CIDEr-D (hand-computed), per-task scores,
and the run summaries (H, E, F, O)."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from spider.data.records import Example, Turn
from spider.metrics import (
    cider_d,
    exact_match,
    harmonic_mean,
    normalize_answer,
    score_predictions,
    summary,
    tokenize_caption,
)

# --------------------------------------------------------------------------------------------
# normalize_answer / exact_match
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Three.", "3"),
        ("three", "3"),
        ("3", "3"),
        ("Eighteen!", "18"),
        ("twenty", "20"),
        ("zero", "0"),
        ("none", "0"),  # VQA manualMap: a counting "none" is zero
        ("no", "no"),  # ...but "no" stays: it answers yes/no questions
        ("The Dog!", "dog"),
        ("an apple", "apple"),
        ("  Two   red\tcats ", "2 red cats"),
        ("don't", "dont"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("Yes.", "yes"),
        ("A", "a"),  # only an article: kept, so "" never matches the choice "A"
        ("the", "the"),
        ("someone", "someone"),  # number words are whole words only
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_exact_match_uses_normalisation_and_any_reference() -> None:
    assert exact_match("Three.", ["3"]) == 1.0
    assert exact_match("3", ["four", "THREE"]) == 1.0
    assert exact_match("four", ["3", "three"]) == 0.0
    assert exact_match("The cat", "cat") == 1.0
    assert exact_match("", ["A"]) == 0.0
    assert exact_match("B", ["A"]) == 0.0
    assert exact_match("no", ["0"]) == 0.0
    with pytest.raises(ValueError):
        exact_match("3", [])


# --------------------------------------------------------------------------------------------
# CIDEr-D: hand-computed corpora
# --------------------------------------------------------------------------------------------


def test_tokenize_caption_lowercases_and_drops_punctuation_but_keeps_articles() -> None:
    assert tokenize_caption("A man's dog, running -- fast!") == [
        "a",
        "mans",
        "dog",
        "running",
        "fast",
    ]


def test_cider_d_corpus_a_common_word_has_zero_idf() -> None:
    # N = 2 examples, log N = log 2.
    #   ex 1: cand "A cat."  refs ["a cat"]     ex 2: cand "a dog"  refs ["a bird"]
    # df over references: a -> 2, cat/bird/"a cat"/"a bird" -> 1; dog, "a dog" -> 0.
    # idf = log 2 - log max(1, df):  a -> 0;  everything else -> log 2 =: L.
    # ex 1 (candidate == reference after tokenising):
    #   n=1: g_c = g_r = {a: 0, cat: L} -> sum min(g_c,g_r)*g_r / (|g_c||g_r|) = L^2/L^2 = 1
    #   n=2: {"a cat": L} both -> 1;   n=3, n=4: no n-grams -> 0;   length 2 vs 2 -> penalty 1
    #   CIDEr-D = 10 * mean(1, 1, 0, 0) = 5.0
    # ex 2: n=1: shares only "a", whose weight is 0 -> 0;  n=2: "a dog" vs "a bird" -> 0
    #   CIDEr-D = 0.0
    # corpus = (5 + 0) / 2 = 2.5
    corpus, per_example = cider_d(["A cat.", "a dog"], [["a cat"], ["a bird"]])
    assert per_example == pytest.approx([5.0, 0.0], abs=1e-12)
    assert corpus == pytest.approx(2.5, abs=1e-12)


def test_cider_d_corpus_b_clipping_length_penalty_and_multiple_references() -> None:
    # N = 3 examples; a := log 3 = 1.0986123, b := log 3 - log 2 = log 1.5 = 0.4054651.
    #   ex 1: cand "red ball red ball"  refs ["red ball"]
    #   ex 2: cand "ball"               refs ["blue ball"]
    #   ex 3: cand "green box"          refs ["green box", "a green box"]
    # df: ball -> 2 (ex 1, ex 2); every other reference n-gram -> 1; candidate-only -> 0.
    # idf: ball -> b; every other n-gram -> a.
    #
    # ex 1, length 4 vs 2: penalty exp(-(4-2)^2 / 72) = exp(-1/18) = 0.9459595
    #   n=1: g_c = {red: 2a, ball: 2b}, g_r = {red: a, ball: b}
    #        clipped dot = min(2a,a)*a + min(2b,b)*b = a^2 + b^2;  |g_c||g_r| = 2(a^2 + b^2)
    #        -> 1/2  (plain cosine would be 1: clipping halves it)
    #   n=2: g_c = {"red ball": 2a, "ball red": a (df 0)}, g_r = {"red ball": a}
    #        -> min(2a,a)*a / (sqrt(5)a * a) = 1/sqrt(5) = 0.4472136
    #   n=3, n=4: the reference has none -> 0
    #   CIDEr-D = 10 * exp(-1/18) * (1/2 + 1/sqrt(5)) / 4 = 2.2400642
    # ex 2, length 1 vs 2: penalty exp(-1/72) = 0.9862071
    #   n=1: g_c = {ball: b}, g_r = {blue: a, ball: b} -> b^2 / (b sqrt(a^2+b^2)) = 0.3462416
    #   n=2..4: the candidate has none -> 0
    #   CIDEr-D = 10 * exp(-1/72) * 0.3462416 / 4 = 0.8536647
    # ex 3, two references, averaged:
    #   vs "green box" (identical, length 2 vs 2): (1, 1, 0, 0)
    #   vs "a green box" (length 2 vs 3, penalty exp(-1/72)); "a" has df 1 here, so idf a:
    #     n=1: g_c = {green: a, box: a}, g_r = {a: a, green: a, box: a} -> 2a^2/(sqrt2 a sqrt3 a)
    #          = 2/sqrt(6) = 0.8164966
    #     n=2: {"green box": a} vs {"a green": a, "green box": a} -> 1/sqrt(2) = 0.7071068
    #     n=3: the candidate has none -> 0
    #   CIDEr-D = 10 * (2 + exp(-1/72) * (2/sqrt6 + 1/sqrt2)) / 4 / 2 = 4.3782356
    # corpus = (2.2400642 + 0.8536647 + 4.3782356) / 3 = 2.4906548
    candidates = ["red ball red ball", "ball", "green box"]
    references = [["red ball"], ["blue ball"], ["green box", "a green box"]]
    a, b = math.log(3), math.log(1.5)
    expected = [
        10 * math.exp(-1 / 18) * (1 / 2 + 1 / math.sqrt(5)) / 4,
        10 * math.exp(-1 / 72) * (b / math.sqrt(a * a + b * b)) / 4,
        10 * (2 + math.exp(-1 / 72) * (2 / math.sqrt(6) + 1 / math.sqrt(2))) / 4 / 2,
    ]
    assert expected == pytest.approx([2.2400642, 0.8536647, 4.3782356], abs=1e-7)

    corpus, per_example = cider_d(candidates, references)
    assert per_example == pytest.approx(expected, abs=1e-12)
    assert corpus == pytest.approx(2.4906548, abs=1e-7)


def test_cider_d_corpus_c_perfect_captions_score_ten() -> None:
    # Each candidate equals its single reference, has >= 4 words, and every order n = 1..4
    # has an n-gram that the other examples' references lack (idf > 0) -> sim_n = 1 for all n
    # -> CIDEr-D = 10 * mean(1, 1, 1, 1) = 10 exactly: the maximum, hence the divisor 10 in
    # score_predictions.
    captions = [
        "a brown dog runs on the grass",
        "two birds sit on a wire",
        "a red car parked near the house",
    ]
    corpus, per_example = cider_d(captions, [[c] for c in captions])
    assert per_example == pytest.approx([10.0, 10.0, 10.0], abs=1e-12)
    assert corpus == pytest.approx(10.0, abs=1e-12)


@pytest.mark.parametrize(("num_words", "expected"), [(1, 2.5), (2, 5.0), (3, 7.5), (6, 10.0)])
def test_cider_d_identical_short_captions_score_10_times_orders_present_over_4(
    num_words: int, expected: float
) -> None:
    # An identical caption with k < 4 words has n-grams of orders 1..k only: 10 * k / 4.
    # Two examples sharing no word, so every n-gram has idf log 2 > 0.
    vocab = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
    captions = [" ".join(f"{word}{i}" for word in vocab[:num_words]) for i in (0, 1)]
    _, per_example = cider_d(captions, [[c] for c in captions])
    assert per_example == pytest.approx([expected, expected], abs=1e-12)


def test_cider_d_zero_cases() -> None:
    # Sharing nothing with the reference -> 0.
    _, per_example = cider_d(
        ["purple elephant dancing wildly", "a cat on a mat"],
        [["a cat on a mat"], ["a dog in the park"]],
    )
    assert per_example[0] == 0.0
    # Candidate identical to a reference, but every example has that same reference:
    # df = N for all its n-grams, idf = 0, nothing informative matches -> 0.
    corpus, _ = cider_d(["a dog runs fast"] * 3, [["a dog runs fast"]] * 3)
    assert corpus == 0.0
    # One-example corpus: log N = 0, all weights 0 (as in the reference code).
    assert cider_d(["a dog runs fast"], [["a dog runs fast"]]) == (0.0, [0.0])
    # Empty candidate.
    assert cider_d(["", "x y z w"], [["a b c d"], ["x y z w"]])[1][0] == 0.0
    assert cider_d([], []) == (0.0, [])


def test_cider_d_length_penalty_is_gaussian_in_length_difference() -> None:
    # Same corpus scored with sigma = 6 and with the penalty switched off (sigma huge): the
    # ratio for a single-reference example is exactly exp(-(len_c - len_r)^2 / 72).
    candidates = ["a small dog runs on grass today in the sun", "two cats"]
    references = [["a small dog runs"], ["two cats sleep on a warm red sofa"]]
    _, with_penalty = cider_d(candidates, references)
    _, without_penalty = cider_d(candidates, references, sigma=1e12)
    assert with_penalty[0] / without_penalty[0] == pytest.approx(math.exp(-((10 - 4) ** 2) / 72))
    assert with_penalty[1] / without_penalty[1] == pytest.approx(math.exp(-((2 - 8) ** 2) / 72))
    assert 0 < with_penalty[0] < without_penalty[0]


def test_cider_d_extra_words_lower_the_score_longer_or_shorter() -> None:
    others = [["two birds sit on a wire"], ["a red car parked near the house"]]
    reference = "a brown dog runs on the grass"
    scores = {}
    for name, cand in {
        "exact": reference,
        "longer": reference + " near some big old trees",
        "shorter": "a brown dog runs",
    }.items():
        _, per_example = cider_d([cand, "x", "y"], [[reference], *others])
        scores[name] = per_example[0]
    assert scores["exact"] == pytest.approx(10.0)
    assert 0 < scores["longer"] < scores["exact"]
    assert 0 < scores["shorter"] < scores["exact"]


def test_cider_d_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2 candidates but 1"):
        cider_d(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="non-empty"):
        cider_d(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="non-empty"):
        cider_d(["a"], ["a"])  # a bare string, not a list of references


def _coco_caption_cider_d(candidates, references, n=4, sigma=6.0):
    """Independent port of the coco-caption CiderScorer's arithmetic (pre-tokenised input),
    including its quirk of measuring length in bigrams; used as an oracle below."""

    def precook(words):
        counts = defaultdict(int)
        for k in range(1, n + 1):
            for i in range(len(words) - k + 1):
                counts[tuple(words[i : i + k])] += 1
        return counts

    ctest = [precook(c.split()) for c in candidates]
    crefs = [[precook(r.split()) for r in refs] for refs in references]
    df = defaultdict(float)
    for refs in crefs:
        for ngram in {g for ref in refs for g in ref}:
            df[ngram] += 1
    ref_len = np.log(float(len(crefs)))

    def counts2vec(cnts):
        vec = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for ngram, tf in cnts.items():
            k = len(ngram) - 1
            vec[k][ngram] = float(tf) * (ref_len - np.log(max(1.0, df[ngram])))
            norm[k] += vec[k][ngram] ** 2
            if k == 1:
                length += tf
        return vec, [np.sqrt(x) for x in norm], length

    scores = []
    for test, refs in zip(ctest, crefs, strict=True):
        vec, norm, length = counts2vec(test)
        total = np.zeros(n)
        for ref in refs:
            vec_r, norm_r, length_r = counts2vec(ref)
            for k in range(n):
                val = sum(min(vec[k][g], vec_r[k][g]) * vec_r[k][g] for g in list(vec[k]))
                if norm[k] != 0 and norm_r[k] != 0:
                    val /= norm[k] * norm_r[k]
                total[k] += val * np.e ** (-((length - length_r) ** 2) / (2 * sigma**2))
        scores.append(np.mean(total) / len(refs) * 10.0)
    return float(np.mean(scores)), scores


def test_cider_d_matches_coco_caption_arithmetic_on_random_corpora() -> None:
    rng = np.random.default_rng(0)
    vocab = ["a", "dog", "cat", "red", "on", "the", "mat", "runs", "big", "two"]

    def sentence() -> str:
        return " ".join(rng.choice(vocab, size=int(rng.integers(0, 9))))

    for _ in range(30):
        num_examples = int(rng.integers(1, 7))
        candidates = [sentence() for _ in range(num_examples)]
        references = [[sentence() for _ in range(int(rng.integers(1, 4)))] for _ in candidates]
        corpus, per_example = cider_d(candidates, references)
        oracle_corpus, oracle_per_example = _coco_caption_cider_d(candidates, references)
        assert per_example == pytest.approx(oracle_per_example, abs=1e-9)
        assert corpus == pytest.approx(oracle_corpus, abs=1e-9)
        assert all(0.0 <= s <= 10.0 + 1e-9 for s in per_example)


# --------------------------------------------------------------------------------------------
# score_predictions
# --------------------------------------------------------------------------------------------

_IMAGE = Image.new("RGB", (4, 4))


def _example(i: int, task: str, metric: str, references: list[str]) -> Example:
    return Example(
        id=f"{task}-{i}",
        image=_IMAGE,
        turns=[Turn(human="<image>\nWhat?", gpt=references[0])],
        task=task,
        metric=metric,
        references=references,
    )


def test_score_predictions_is_task_balanced() -> None:
    digits = [_example(i, "digit", "exact", [str(i)]) for i in range(3)]
    captions = [
        _example(0, "caption", "cider", ["red ball"]),
        _example(1, "caption", "cider", ["blue ball"]),
        _example(2, "caption", "cider", ["green box", "a green box"]),
    ]
    # Interleave tasks: grouping must follow Example.task, not position.
    examples = [digits[0], captions[0], digits[1], captions[1], digits[2], captions[2]]
    predictions = ["zero", "red ball red ball", "One.", "ball", "7", "green box"]

    result = score_predictions(examples, predictions)

    assert result["n"] == 6
    assert list(result["tasks"]) == ["digit", "caption"]
    digit = result["tasks"]["digit"]
    assert digit == {
        "metric": "accuracy",
        "value": pytest.approx(2 / 3),
        "score": pytest.approx(2 / 3),
        "n": 3,
    }
    caption = result["tasks"]["caption"]
    assert caption["metric"] == "cider_d"
    assert caption["n"] == 3
    assert caption["value"] == pytest.approx(2.4906548, abs=1e-7)  # corpus B above
    # The ceiling: what the references' own first captions earn (two-word captions cannot
    # reach 10: they have no 3- and 4-grams).
    ceiling, _ = cider_d(["red ball", "blue ball", "green box"],
                         [["red ball"], ["blue ball"], ["green box", "a green box"]])
    assert 0 < ceiling < 10
    assert caption["ceiling"] == pytest.approx(ceiling)
    assert caption["score"] == pytest.approx(2.4906548 / ceiling, abs=1e-7)
    # Task-balanced: (2/3 + caption score) / 2, not a mean over the 6 examples.
    assert result["score"] == pytest.approx((2 / 3 + 2.4906548 / ceiling) / 2, abs=1e-7)


def test_score_predictions_perfect_captions_score_one() -> None:
    captions = ["a brown dog runs on the grass", "two birds sit on a wire"]
    examples = [_example(i, "caption", "cider", [c]) for i, c in enumerate(captions)]
    result = score_predictions(examples, captions)
    assert result["tasks"]["caption"]["value"] == pytest.approx(10.0)
    assert result["tasks"]["caption"]["score"] == pytest.approx(1.0)
    assert result["score"] == pytest.approx(1.0)


def test_score_predictions_caption_score_is_relative_to_the_references() -> None:
    # Paraphrased references disagree with each other, so even the taught caption earns
    # less than 10; it must still score 1, and a wrong caption much less.
    refs = [
        ["a red circle on the left and a blue square on the right",
         "a blue square on the right and a red circle on the left"],
        ["a green triangle at the top", "there is a green triangle at the top"],
        ["a yellow square in the center", "a yellow square is in the center"],
    ]
    examples = [_example(i, "caption", "cider", r) for i, r in enumerate(refs)]
    taught = score_predictions(examples, [r[0] for r in refs])["tasks"]["caption"]
    assert taught["value"] < 9.5
    assert taught["ceiling"] == pytest.approx(taught["value"])
    assert taught["score"] == pytest.approx(1.0)
    wrong = score_predictions(examples, ["a red circle"] * 3)["tasks"]["caption"]
    assert wrong["score"] == pytest.approx(wrong["value"] / taught["value"])
    assert wrong["score"] < 0.5


def test_score_predictions_rejects_bad_input() -> None:
    ex = [_example(0, "digit", "exact", ["1"]), _example(1, "digit", "exact", ["2"])]
    with pytest.raises(ValueError, match="2 examples but 1 predictions"):
        score_predictions(ex, ["1"])
    with pytest.raises(ValueError, match="no examples"):
        score_predictions([], [])
    mixed = [ex[0], _example(1, "digit", "cider", ["two"])]
    with pytest.raises(ValueError, match="mixes metrics"):
        score_predictions(mixed, ["1", "2"])
    with pytest.raises(ValueError, match="unknown metric"):
        score_predictions([_example(0, "digit", "bleu", ["1"])], ["1"])


# --------------------------------------------------------------------------------------------
# harmonic_mean / summary
# --------------------------------------------------------------------------------------------


def test_harmonic_mean() -> None:
    assert harmonic_mean(0.5, 0.25) == pytest.approx(1 / 3)  # 2 * 0.125 / 0.75
    assert harmonic_mean(0.8, 0.8) == pytest.approx(0.8)
    assert harmonic_mean(0.9, 0.0) == 0.0
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_summary_e_f_o_and_h() -> None:
    # Base: U 0.6, D 0.2. Fine-tuned: U 0.5 (forgot 0.1), D 0.7 (gained 0.5).
    result = summary(u_base=0.6, d_base=0.2, u_ft=0.5, d_ft=0.7)
    assert result["U"] == 0.5
    assert result["D"] == 0.7
    assert result["H"] == pytest.approx(2 * 0.5 * 0.7 / 1.2)  # 0.5833333
    assert result["E"] == pytest.approx(0.5)
    assert result["F"] == pytest.approx(-0.1)
    assert result["O"] == pytest.approx(0.4)
    assert set(result) == {"U", "D", "H", "E", "F", "O"}

"""Built-in datasets: reproducible, split-disjoint, correct answers, closed vocabulary."""

from __future__ import annotations

import pickle
import re
from collections import Counter

import numpy as np
import pytest
from sklearn.datasets import load_digits

from spider.data import (
    IMAGE_MARKER,
    IMAGE_SIZE,
    builtin_names,
    cells,
    digits,
    load_dataset,
    split_words,
    vocabulary,
)
from spider.data import builtin as B
from spider.data.scenes import COLORS, PLURALS, POSITIONS, describe
from spider.data.text import NUMBER_WORDS, number_word
from spider.errors import UserError

ALL_SPECS = [f"builtin:{n}" for n in builtin_names()] + [
    f"builtin:{n}:{c}" for n in builtin_names() for c in cells(n)
]
ENTRIES = {"upstream": B.DATASETS["upstream"], "counting": B.DATASETS["counting"],
           "digit-sum": B.DATASETS["digit-sum"]} | {
    f"{n}:{c}": e for n, cs in B.CELL_DATASETS.items() for c, e in cs.items()
}  # fmt: skip
TARGETS = load_digits().target  # independent of spider.data.digits


def _texts(ex) -> list[str]:
    return [t for turn in ex.turns for t in (turn.human, turn.gpt)] + list(ex.references)


def _items(key: str, split: str, n: int, seed: int = 0) -> list[B.Item]:
    return [B.generate(ENTRIES[key], seed, split, i) for i in range(n)]


def test_names_and_cells():
    assert builtin_names() == ["upstream", "counting", "digit-sum"]
    assert cells("upstream") == []
    expected = ["idimg-idq", "idimg-oodq", "oodimg-idq", "oodimg-oodq"]
    assert cells("counting") == expected
    assert cells("builtin:digit-sum") == expected
    with pytest.raises(UserError, match="available: builtin:upstream"):
        cells("nope")


def test_default_sizes_and_tasks():
    assert len(load_dataset("builtin:upstream")) == 20_000
    assert len(load_dataset("builtin:upstream", "test")) == 500
    assert len(load_dataset("builtin:counting")) == 5_000
    assert len(load_dataset("builtin:digit-sum", "test")) == 300
    assert len(load_dataset("builtin:counting:oodimg-idq", "test")) == 300
    assert len(load_dataset("builtin:counting", size=7)) == 7
    assert load_dataset("builtin:upstream").tasks == ["caption", "digit", "color", "shape"]
    assert load_dataset("builtin:counting:idimg-oodq").tasks == ["caption", "color", "shape"]


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_same_seed_same_bytes_other_seed_differs(spec):
    a = load_dataset(spec, "test", seed=3, size=6)
    b = load_dataset(spec, "test", seed=3, size=6)
    c = load_dataset(spec, "test", seed=4, size=6)
    # Example i is a pure function of (seed, split, i): generate b backwards.
    b_examples = [b[i] for i in reversed(range(6))][::-1]
    differs = 0
    for i, (x, y) in enumerate(zip(a, b_examples, strict=True)):
        assert x.id == y.id
        assert x.image.tobytes() == y.image.tobytes()
        assert _texts(x) == _texts(y)
        assert x.image.mode == "RGB" and x.image.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert x.turns[0].human.count(IMAGE_MARKER) == 1
        z = c[i]
        differs += x.image.tobytes() != z.image.tobytes()
    assert differs >= 5


def test_cell_idimg_idq_is_the_downstream_test_split():
    for name in ("counting", "digit-sum"):
        base = load_dataset(f"builtin:{name}", "test", size=5)
        cell = load_dataset(f"builtin:{name}:idimg-idq", "test", size=5)
        for x, y in zip(base, cell, strict=True):
            assert x.image.tobytes() == y.image.tobytes() and _texts(x) == _texts(y)


def test_digit_pools_are_disjoint_and_cover_all_scans():
    train, test = set(digits.pool("train").tolist()), set(digits.pool("test").tolist())
    assert not train & test
    assert train | test == set(range(1797))
    assert 300 <= len(test) <= 400


@pytest.mark.parametrize(
    "key",
    [
        "upstream",
        "digit-sum",
        "digit-sum:idimg-oodq",
        "digit-sum:oodimg-idq",
        "counting:oodimg-oodq",
    ],  # fmt: skip
)
def test_digit_scans_come_from_their_split_pool(key):
    for split in ("train", "test"):
        pool = set(digits.pool(split).tolist())
        used = [s for item in _items(key, split, 60) for s in item.spec.get("scans", [])]
        assert used and set(used) <= pool


@pytest.mark.parametrize(
    "key", ["upstream", "counting", "counting:idimg-oodq", "counting:oodimg-idq"]
)
def test_train_and_test_scenes_are_disjoint(key):
    seen = {}
    for split in ("train", "test"):
        scenes = [it.spec["scene"] for it in _items(key, split, 160) if "scene" in it.spec]
        assert all(s.split() == split for s in scenes)
        seen[split] = {s.key() for s in scenes}
    assert seen["train"] and seen["test"] and not seen["train"] & seen["test"]


def test_counting_answers_match_the_scene():
    counts = Counter()
    for key, style in (("counting", "plain"), ("counting:oodimg-idq", "outlined")):
        for split in ("train", "test"):
            for item in _items(key, split, 150):
                ex, scene, kind = item.example, item.spec["scene"], item.spec["kind"]
                assert scene.style == style
                plural = re.fullmatch(r"How many (\w+) are there\?", ex.question.split("\n")[1])
                assert plural and plural.group(1) == PLURALS[kind]
                n = sum(s.kind == kind for s in scene.shapes)
                assert ex.answer == NUMBER_WORDS[n] and 0 <= n <= 5
                assert len(scene.shapes) - n >= 1  # always some distractors
                counts[n] += 1
    assert set(counts) == set(range(6)) and min(counts.values()) > 60


def test_digit_sum_answers_are_the_sum_of_sklearn_targets():
    for key in ("digit-sum", "digit-sum:oodimg-idq"):
        for item in _items(key, "test", 100):
            a, b = item.spec["scans"]
            assert item.example.answer == NUMBER_WORDS[TARGETS[a] + TARGETS[b]]


def test_digit_naming_answers_match_sklearn_targets():
    n_single = 0
    for key in ("upstream", "digit-sum:idimg-oodq", "counting:oodimg-oodq"):
        for item in _items(key, "train", 120):
            ex = item.example
            if ex.task != "digit":
                continue
            scans = item.spec["scans"]
            if len(scans) == 1:
                assert ex.question.endswith("What digit is this?")
                n_single += 1
                target = TARGETS[scans[0]]
            else:
                side = "left" if ex.question.endswith("on the left?") else "right"
                assert ex.question.endswith(f"on the {side}?")
                target = TARGETS[scans[0 if side == "left" else 1]]
            assert ex.answer == NUMBER_WORDS[target]
    assert n_single >= 100


def test_digit_naming_cell_uses_distinct_scans():
    scans = [it.spec["scans"][0] for it in _items("counting:oodimg-oodq", "test", 300)]
    assert len(set(scans)) == 300


def test_scene_question_answers_match_the_scene():
    seen = Counter()
    for key in ("upstream", "counting:idimg-oodq", "digit-sum:oodimg-oodq"):
        for item in _items(key, "test", 120):
            ex = item.example
            seen[ex.task] += 1
            if ex.task == "color":
                kind = re.search(r"What color is the (\w+)\?", ex.question).group(1)
                matches = [s for s in item.spec["scene"].shapes if s.kind == kind]
                assert len(matches) == 1 and ex.answer == matches[0].color
            elif ex.task == "shape":
                color = re.search(r"What shape is (\w+)\?", ex.question).group(1)
                matches = [s for s in item.spec["scene"].shapes if s.color == color]
                assert len(matches) == 1 and ex.answer == matches[0].kind
            elif ex.task == "caption":
                scene = item.spec["scene"]
                assert ex.metric == "cider" and ex.answer == ex.references[0]
                shapes = scene.shapes
                phrases = [f"{describe(s)} {POSITIONS[s.cell]}" for s in shapes]
                with_is = [f"{describe(s)} is {POSITIONS[s.cell]}" for s in shapes]
                refs = ex.references
                # plain, "there is ...", "... is ...", and (several shapes) reversed order
                assert len(refs) == (3 if len(shapes) == 1 else 4)
                assert refs[1] == "there is " + ex.answer
                assert re.split(r", | and ", refs[0]) == phrases
                assert re.split(r", | and ", refs[2]) == with_is
                if len(shapes) > 1:
                    assert re.split(r", | and ", refs[3]) == phrases[::-1]
                assert ex.answer.count(" and ") == (len(scene.shapes) > 1)
    assert min(seen[t] for t in ("caption", "color", "shape")) >= 60


def test_upstream_mixture_is_balanced():
    ds = load_dataset("builtin:upstream", "test", size=400)
    assert Counter(ds[i].task for i in range(400)) == dict.fromkeys(ds.tasks, 100)


def test_rendered_scene_shows_each_shape_in_its_colour():
    for item in _items("counting", "train", 40):
        img = np.asarray(item.example.image, dtype=int)
        for s in item.spec["scene"].shapes:
            x, y = (int(round(v)) for v in s.center)
            assert np.abs(img[y, x] - COLORS[s.color]).max() < 40, (item.example.id, s)


def test_out_of_distribution_images_look_different():
    def brightness(spec):
        return np.mean([np.asarray(ex.image).mean() for ex in load_dataset(spec, "test", size=20)])

    assert brightness("builtin:counting") > 200 and brightness("builtin:digit-sum") > 200
    assert brightness("builtin:counting:oodimg-idq") < 80
    assert brightness("builtin:digit-sum:oodimg-idq") < 80


def test_every_word_is_in_the_vocabulary():
    vocab = set(vocabulary())
    assert IMAGE_MARKER not in vocab
    assert {number_word(n) for n in range(19)} | {str(n) for n in range(19)} <= vocab
    rng = np.random.default_rng(0)
    n = 0
    for spec in ALL_SPECS:
        for split in ("train", "test"):
            ds = load_dataset(spec, split)
            for i in rng.choice(len(ds), size=100, replace=False):
                ex = ds[int(i)]
                for text in _texts(ex):
                    words = [w for w in split_words(text) if w != IMAGE_MARKER]
                    assert set(words) <= vocab, (ex.id, text)
                n += 1
    assert n >= 2000


def test_split_words_rule():
    assert split_words("<image>\nHow many circles are there?") == [
        "<image>", "how", "many", "circles", "are", "there", "?",
    ]  # fmt: skip
    assert split_words("a red circle, 12 Squares.") == [
        "a",
        "red",
        "circle",
        ",",
        "12",
        "squares",
        ".",
    ]
    assert len(vocabulary()) == len(set(vocabulary()))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"spec": "builtin:nope"}, "available: builtin:upstream, builtin:counting"),
        ({"spec": "builtin:counting:bad"}, "its cells: idimg-idq"),
        ({"spec": "builtin:upstream:idimg-idq"}, "its cells: none"),
        ({"spec": "builtin:counting", "split": "val"}, 'not "val"'),
        ({"spec": "builtin:counting", "size": 0}, "positive"),
        ({"spec": "/no/such/data.json"}, "/no/such/data.json does not exist"),
    ],
)
def test_load_dataset_user_errors(kwargs, pattern):
    with pytest.raises(UserError, match=re.escape(pattern)):
        load_dataset(**kwargs)


def test_indexing():
    ds = load_dataset("builtin:digit-sum", "test", size=3)
    assert ds[-1].id == ds[2].id == "digit-sum-test-00002"
    assert ds[np.int64(1)].id == "digit-sum-test-00001"
    with pytest.raises(IndexError):
        ds[3]
    assert [ex.id for ex in ds] == [ds[i].id for i in range(3)]


def test_datasets_pickle_for_spawned_dataloader_workers():
    ds = load_dataset("builtin:counting:oodimg-idq", "test", seed=2, size=4)
    back = pickle.loads(pickle.dumps(ds))
    assert back[3].image.tobytes() == ds[3].image.tobytes() and back.tasks == ds.tasks

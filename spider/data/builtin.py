"""Built-in datasets, generated from a seed: ``builtin:upstream``, ``builtin:counting``,
``builtin:digit-sum`` and the 2x2 evaluation cells ``builtin:NAME:CELL``.

Example ``i`` of a split is a pure function of ``(seed, dataset, split, i)``: a NumPy
generator is seeded from a hash of those four, so datasets are reproducible, can be
generated lazily in any order, and any size can be asked for. Train and test never share a
picture: scenes are assigned to a split by a hash of their content (see ``scenes``) and
digit scans come from disjoint pools (see ``digits``).

The 2x2 evaluation follows "Fine-tuning MLLMs without forgetting is easier than you think"
(Li et al.): for a downstream task, images in / out of its distribution crossed with
questions in / out of it. ``idimg-idq`` is the downstream test split; ``oodimg-oodq`` is
upstream material that shares nothing with the downstream task.

* counting: idimg-oodq asks the upstream caption / colour / shape questions about counting
  scenes; oodimg-idq counts shapes in the ``outlined`` style (hollow shapes on a dark 4x4
  canvas); oodimg-oodq names single handwritten digits.
* digit-sum: idimg-oodq asks "What digit is on the left/right?" about the side-by-side
  pairs (a question the upstream mixture teaches); oodimg-idq sums two digits drawn in
  coloured ink on a dark canvas, placed diagonally; oodimg-oodq is the upstream
  caption / colour / shape questions on plain scenes.

Every built-in answer writes numbers as words ("three", "twelve").
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spider.data import digits
from spider.data.records import IMAGE_MARKER, Example, Turn
from spider.data.scenes import (
    COLORS,
    IMAGE_SIZE,
    PLURALS,
    POSITIONS,
    SHAPES,
    STYLES,
    Scene,
    captions,
    place,
    render,
    sample_in_split,
)
from spider.data.text import NUMBER_WORDS, number_word, split_words

SPLITS = ("train", "test")
CELLS = ("idimg-idq", "idimg-oodq", "oodimg-idq", "oodimg-oodq")

# Every question a built-in dataset asks (templates filled with SHAPES / PLURALS / COLORS).
Q_CAPTION = "Describe the image."
Q_COLOR = "What color is the {kind}?"
Q_SHAPE = "What shape is {color}?"
Q_DIGIT = "What digit is this?"
Q_DIGIT_SIDE = "What digit is on the {side}?"
Q_COUNT = "How many {plural} are there?"
Q_SUM = "What is the sum of the two digits?"

PAPER = STYLES["plain"].background  # digits share the plain scenes' near-white canvas
INK = (20, 20, 20)
DARK = STYLES["outlined"].background
MAX_COUNT = 5  # counting asks about 0..MAX_COUNT shapes of one kind


@dataclass
class Item:
    """One generated example plus the spec it was drawn from (tests check answers on it)."""

    example: Example
    spec: dict[str, Any] = field(default_factory=dict)


Generate = Callable[[np.random.Generator, str, int, int], Item]  # (rng, split, seed, i)


@dataclass(frozen=True)
class Builtin:
    key: str  # seeds the generator and prefixes example ids
    tasks: tuple[str, ...]
    generate: Generate
    sizes: dict[str, int]  # default size per split


def _example(human: str, gpt: str, task: str, **kw: Any) -> Example:
    # id is filled in by generate(); every built-in example is a single turn.
    return Example(id="", image=kw.pop("image"), turns=[Turn(f"{IMAGE_MARKER}\n{human}", gpt)],
                   task=task, **kw)  # fmt: skip


# ---------------------------------------------------------------------------------------
# Scenes: how they are drawn, and the questions asked about them


def _random_objects(rng: np.random.Generator, n: int, kinds=SHAPES) -> list[tuple[str, str]]:
    colors = list(COLORS)
    return [(str(rng.choice(kinds)), str(rng.choice(colors))) for _ in range(n)]


def _upstream_scene(rng: np.random.Generator) -> Scene:
    """The pre-training look: 1-3 filled shapes on the plain 3x3 grid."""
    return place(rng, "plain", _random_objects(rng, int(rng.integers(1, 4))))


def _counting_scene(rng: np.random.Generator, style: str, kind: str, count: int) -> Scene:
    """``count`` shapes of ``kind`` among 1-4 distractors of the other kinds (8 at most)."""
    others = [s for s in SHAPES if s != kind]
    n_distract = int(rng.integers(1, min(4, 8 - count) + 1))
    objects = _random_objects(rng, count, [kind]) + _random_objects(rng, n_distract, others)
    return place(rng, style, objects)


def _any_counting_scene(rng: np.random.Generator) -> Scene:
    kind = str(rng.choice(SHAPES))
    return _counting_scene(rng, "plain", kind, int(rng.integers(0, MAX_COUNT + 1)))


def _caption(rng, split, draw_scene) -> Item:
    scene = sample_in_split(rng, split, draw_scene)
    refs = captions(scene)
    ex = _example(Q_CAPTION, refs[0], "caption", image=render(scene), metric="cider",
                  references=refs)  # fmt: skip
    return Item(ex, {"scene": scene})


def _color_question(rng, split, draw_scene) -> Item:
    """Ask "What color is the square?" about a scene holding exactly one square."""

    def draw(r):
        scene = draw_scene(r)
        return scene if any(scene.count(s.kind) == 1 for s in scene.shapes) else None

    scene = sample_in_split(rng, split, draw)
    unique = [s for s in scene.shapes if scene.count(s.kind) == 1]
    target = unique[int(rng.integers(len(unique)))]
    ex = _example(Q_COLOR.format(kind=target.kind), target.color, "color", image=render(scene))
    return Item(ex, {"scene": scene, "target": target})


def _shape_question(rng, split, draw_scene) -> Item:
    """Ask "What shape is blue?" about a scene holding exactly one blue shape."""

    def n_color(scene, color):
        return sum(s.color == color for s in scene.shapes)

    def draw(r):
        scene = draw_scene(r)
        return scene if any(n_color(scene, s.color) == 1 for s in scene.shapes) else None

    scene = sample_in_split(rng, split, draw)
    unique = [s for s in scene.shapes if n_color(scene, s.color) == 1]
    target = unique[int(rng.integers(len(unique)))]
    ex = _example(Q_SHAPE.format(color=target.color), target.kind, "shape", image=render(scene))
    return Item(ex, {"scene": scene, "target": target})


SCENE_QUESTIONS = {"caption": _caption, "color": _color_question, "shape": _shape_question}


def _counting(rng, split, style: str) -> Item:
    kind = str(rng.choice(SHAPES))
    count = int(rng.integers(0, MAX_COUNT + 1))
    scene = sample_in_split(rng, split, lambda r: _counting_scene(r, style, kind, count))
    ex = _example(Q_COUNT.format(plural=PLURALS[kind]), number_word(scene.count(kind)),
                  "counting", image=render(scene))  # fmt: skip
    return Item(ex, {"scene": scene, "kind": kind})


# ---------------------------------------------------------------------------------------
# Digits


@functools.lru_cache(maxsize=64)
def _pool_order(seed: int, key: str, split: str) -> np.ndarray:
    """The split's scans in a seeded order, so consecutive examples use distinct scans."""
    return _rng(seed, key + "/pool", split, 0).permutation(digits.pool(split))


def _single_digit_image(rng, scan: int):
    scale = 5  # 40 px on the 48 px canvas, nudged by up to 3 px
    off = (IMAGE_SIZE - 8 * scale) // 2
    left, top = (off + int(v) for v in rng.integers(-3, 4, size=2))
    return digits.canvas([(digits.glyph(scan, scale, INK, PAPER), left, top)], PAPER)


def _pair_image(rng, scans: list[int], style: str):
    """Two scans at 3x (24 px). ``side``: left and right halves, dark ink on paper.
    ``diagonal``: top-left and bottom-right (or top-right and bottom-left) quarters, in
    coloured ink on a dark canvas; either way the first scan is the upper one."""
    size = 8 * 3
    if style == "side":
        top = (IMAGE_SIZE - size) // 2 + int(rng.integers(-4, 5))
        glyphs = [(digits.glyph(s, 3, INK, PAPER), k * size, top) for k, s in enumerate(scans)]
        return digits.canvas(glyphs, PAPER)
    ink = COLORS[str(rng.choice(["yellow", "orange", "green"]))]
    lefts = (0, size) if rng.integers(2) else (size, 0)
    glyphs = [(digits.glyph(s, 3, ink, DARK), lefts[k], k * size) for k, s in enumerate(scans)]
    return digits.canvas(glyphs, DARK)


def _digit_naming(rng, split, seed, j: int, key: str) -> Item:
    """Ask "What digit is this?" about the j-th scan of the split's seeded pool order."""
    order = _pool_order(seed, key, split)
    scan = int(order[j % len(order)])
    ex = _example(Q_DIGIT, number_word(digits.label(scan)), "digit",
                  image=_single_digit_image(rng, scan))  # fmt: skip
    return Item(ex, {"scans": [scan]})


def _digit_side(rng, split) -> Item:
    """Ask "What digit is on the left?" about a side-by-side pair (the digit-sum picture)."""
    scans = [int(s) for s in rng.choice(digits.pool(split), size=2)]
    side = int(rng.integers(2))
    ex = _example(Q_DIGIT_SIDE.format(side=("left", "right")[side]),
                  number_word(digits.label(scans[side])), "digit",
                  image=_pair_image(rng, scans, "side"))  # fmt: skip
    return Item(ex, {"scans": scans, "side": side})


def _digit_sum(rng, split, style: str) -> Item:
    scans = [int(s) for s in rng.choice(digits.pool(split), size=2)]
    total = digits.label(scans[0]) + digits.label(scans[1])
    ex = _example(Q_SUM, number_word(total), "digit-sum", image=_pair_image(rng, scans, style))
    return Item(ex, {"scans": scans})


# ---------------------------------------------------------------------------------------
# The datasets


UPSTREAM_TASKS = ("caption", "digit", "color", "shape")  # example i has task i % 4


def _upstream(rng, split, seed, i) -> Item:
    task = UPSTREAM_TASKS[i % len(UPSTREAM_TASKS)]
    if task != "digit":
        return SCENE_QUESTIONS[task](rng, split, _upstream_scene)
    # Two in three digit examples name a lone scan; the third names one of a side-by-side
    # pair, so the base model can answer digit-sum's idimg-oodq cell before fine-tuning.
    j = i // len(UPSTREAM_TASKS)
    if j % 3 == 2:
        return _digit_side(rng, split)
    return _digit_naming(rng, split, seed, j - j // 3, "upstream")


def _scene_questions_on(draw_scene) -> Generate:
    def gen(rng, split, seed, i):
        task = ("caption", "color", "shape")[i % 3]
        return SCENE_QUESTIONS[task](rng, split, draw_scene)

    return gen


_TEST = {"test": 300}
DATASETS: dict[str, Builtin] = {
    "upstream": Builtin("upstream", UPSTREAM_TASKS, _upstream, {"train": 20_000, "test": 500}),
    "counting": Builtin("counting", ("counting",),
                        lambda rng, split, seed, i: _counting(rng, split, "plain"),
                        {"train": 5_000, **_TEST}),
    "digit-sum": Builtin("digit-sum", ("digit-sum",),
                         lambda rng, split, seed, i: _digit_sum(rng, split, "side"),
                         {"train": 5_000, **_TEST}),
}  # fmt: skip

_CELL_SIZES = {"train": 300, **_TEST}
CELL_DATASETS: dict[str, dict[str, Builtin]] = {
    "counting": {
        "idimg-idq": DATASETS["counting"],
        "idimg-oodq": Builtin("counting-idimg-oodq", ("caption", "color", "shape"),
                              _scene_questions_on(_any_counting_scene), _CELL_SIZES),
        "oodimg-idq": Builtin("counting-oodimg-idq", ("counting",),
                              lambda rng, split, seed, i: _counting(rng, split, "outlined"),
                              _CELL_SIZES),
        "oodimg-oodq": Builtin("counting-oodimg-oodq", ("digit",),
                               lambda rng, split, seed, i: _digit_naming(
                                   rng, split, seed, i, "counting-oodimg-oodq"),
                               _CELL_SIZES),
    },
    "digit-sum": {
        "idimg-idq": DATASETS["digit-sum"],
        "idimg-oodq": Builtin("digit-sum-idimg-oodq", ("digit",),
                              lambda rng, split, seed, i: _digit_side(rng, split), _CELL_SIZES),
        "oodimg-idq": Builtin("digit-sum-oodimg-idq", ("digit-sum",),
                              lambda rng, split, seed, i: _digit_sum(rng, split, "diagonal"),
                              _CELL_SIZES),
        "oodimg-oodq": Builtin("digit-sum-oodimg-oodq", ("caption", "color", "shape"),
                               _scene_questions_on(_upstream_scene), _CELL_SIZES),
    },
}  # fmt: skip


def _rng(seed: int, key: str, split: str, index: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"{seed}|{key}|{split}|{index}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def generate(entry: Builtin, seed: int, split: str, index: int) -> Item:
    """Example ``index`` of ``split``: a pure function of (seed, entry.key, split, index)."""
    item = entry.generate(_rng(seed, entry.key, split, index), split, seed, index)
    item.example.id = f"{entry.key}-{split}-{index:05d}"
    return item


# ---------------------------------------------------------------------------------------
# Vocabulary


def _all_texts() -> list[str]:
    """Every fixed text a built-in question or answer is assembled from."""
    texts = [Q_CAPTION, Q_DIGIT, Q_SUM, *NUMBER_WORDS, *(str(n) for n in range(19))]
    texts += [Q_DIGIT_SIDE.format(side=side) for side in ("left", "right")]
    texts += [Q_COLOR.format(kind=k) for k in SHAPES]
    texts += [Q_SHAPE.format(color=c) for c in COLORS]
    texts += [Q_COUNT.format(plural=p) for p in PLURALS.values()]
    texts += [*SHAPES, *COLORS, *POSITIONS.values()]
    texts += ["a", "an", "there is", "is", "and", ","]  # caption glue, see scenes.captions
    return texts


@functools.cache
def _vocabulary() -> tuple[str, ...]:
    words = {w for text in _all_texts() for w in split_words(text)}
    words.discard(IMAGE_MARKER)
    return tuple(sorted(words))


def vocabulary() -> list[str]:
    """Every word (per ``split_words``) of any built-in question, answer or reference.

    Includes number words and digits 0-18 (answers use words; digits let a tokenizer
    read normalised text). Excludes the ``<image>`` marker: tokenizers add it themselves.
    """
    return list(_vocabulary())

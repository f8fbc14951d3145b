"""Synthetic shape scenes: a spec you can reason about, and the picture drawn from it.

A :class:`Scene` lists its shapes (kind, colour, grid cell, pixel centre, size); answers are
computed from the spec, never from pixels, so tests can check them exactly. Two styles:

* ``plain`` — the in-distribution look: filled shapes on a near-white canvas, one shape per
  cell of a 3x3 grid (so every shape has a position word: "top left", "center"...).
* ``outlined`` — the out-of-distribution look used by the 2x2 evaluation: hollow shapes
  drawn with a stroke on a dark canvas, smaller, on a 4x4 grid.

Train and test never share a scene: a scene belongs to the split chosen by a hash of its
semantic content (style, and each shape's kind, colour and cell), and samplers redraw until
the scene falls in the requested split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 48  # every built-in image is IMAGE_SIZE x IMAGE_SIZE RGB (the tiny model's input)

SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLORS = {
    "red": (215, 35, 35),
    "green": (30, 160, 55),
    "blue": (35, 85, 225),
    "yellow": (235, 195, 0),
    "purple": (145, 55, 205),
    "orange": (245, 125, 15),
}

# Position phrase of each (column, row) of the plain 3x3 grid, as used in captions.
POSITIONS = {
    (0, 0): "in the top left", (1, 0): "at the top", (2, 0): "in the top right",
    (0, 1): "on the left", (1, 1): "in the center", (2, 1): "on the right",
    (0, 2): "in the bottom left", (1, 2): "at the bottom", (2, 2): "in the bottom right",
}  # fmt: skip

TEST_BUCKETS = 8  # one scene in TEST_BUCKETS (by content hash) is a test scene
_SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges keep small shapes legible


@dataclass(frozen=True)
class Style:
    """How a scene looks: grid, canvas colour, filled or hollow shapes, shape sizes."""

    name: str
    grid: int  # cells per side
    background: tuple[int, int, int]
    filled: bool
    size_range: tuple[float, float]  # bounding-box side in pixels, drawn uniformly
    jitter: float  # max offset of a shape's centre from its cell centre, pixels
    stroke: float  # outline width, pixels


STYLES = {
    "plain": Style("plain", 3, (248, 248, 245), True, (10.0, 13.0), 1.5, 1.0),
    "outlined": Style("outlined", 4, (34, 36, 46), False, (9.0, 10.5), 0.5, 1.5),
}


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    color: str  # one of COLORS
    cell: tuple[int, int]  # (column, row) in the style's grid
    center: tuple[float, float]  # pixels
    size: float  # bounding-box side, pixels


@dataclass(frozen=True)
class Scene:
    style: str
    shapes: tuple[Shape, ...]  # in reading order (row by row, left to right)

    def key(self) -> tuple:
        """The semantic content that decides the split (pixel jitter excluded)."""
        return (self.style, tuple(sorted((s.kind, s.color, s.cell) for s in self.shapes)))

    def count(self, kind: str) -> int:
        return sum(s.kind == kind for s in self.shapes)

    def split(self) -> str:
        digest = hashlib.blake2b(repr(self.key()).encode(), digest_size=8).digest()
        return "test" if int.from_bytes(digest, "little") % TEST_BUCKETS == 0 else "train"


def place(rng: np.random.Generator, style: str, objects: list[tuple[str, str]]) -> Scene:
    """Put ``(kind, colour)`` objects into distinct random cells of ``style``'s grid."""
    st = STYLES[style]
    cells = [(c, r) for r in range(st.grid) for c in range(st.grid)]
    if len(objects) > len(cells):
        raise ValueError(f"{len(objects)} shapes do not fit a {st.grid}x{st.grid} grid")
    chosen = rng.choice(len(cells), size=len(objects), replace=False)
    cell_px = IMAGE_SIZE / st.grid
    shapes = []
    for (kind, color), ci in zip(objects, chosen, strict=True):
        col, row = cells[int(ci)]
        size = float(rng.uniform(*st.size_range))
        dx, dy = rng.uniform(-st.jitter, st.jitter, size=2)
        center = ((col + 0.5) * cell_px + float(dx), (row + 0.5) * cell_px + float(dy))
        shapes.append(Shape(kind, color, (col, row), center, size))
    shapes.sort(key=lambda s: (s.cell[1], s.cell[0]))
    return Scene(style, tuple(shapes))


def sample_in_split(
    rng: np.random.Generator, split: str, draw: Callable[[np.random.Generator], Scene | None]
) -> Scene:
    """Call ``draw`` until it returns a scene of ``split`` (``None`` means: try again)."""
    for _ in range(10_000):
        scene = draw(rng)
        if scene is not None and scene.split() == split:
            return scene
    raise RuntimeError(f"could not draw a {split} scene; the sampler is too constrained")


def render(scene: Scene) -> Image.Image:
    """Draw the scene as an IMAGE_SIZE x IMAGE_SIZE RGB picture."""
    st = STYLES[scene.style]
    k = _SUPERSAMPLE
    big = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), st.background)
    draw = ImageDraw.Draw(big)
    stroke = round(st.stroke * k)
    for s in scene.shapes:
        cx, cy = s.center[0] * k, s.center[1] * k
        h = s.size * k / 2
        color = COLORS[s.color]
        fill = color if st.filled else None
        if s.kind == "circle":
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill, outline=color, width=stroke)
        elif s.kind == "square":
            h *= 0.9  # a square of the same side looks bigger than the circle; even them out
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill, outline=color, width=stroke)
        else:  # triangle pointing up, a little larger so its area is comparable
            h *= 1.15
            points = [(cx, cy - h), (cx + h, cy + h * 0.8), (cx - h, cy + h * 0.8)]
            draw.polygon(points, fill=fill, outline=color, width=stroke)
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def describe(shape: Shape) -> str:
    article = "an" if shape.color[0] in "aeiou" else "a"
    return f"{article} {shape.color} {shape.kind}"


def captions(scene: Scene) -> list[str]:
    """Equivalent captions of a plain scene; the first is the one the model is taught.

    ``"a red circle on the left and a blue square on the right"``, then the same with
    ``"there is"``, with ``"is"`` after each shape, and listed in reverse order.
    """
    parts = [(describe(s), POSITIONS[s.cell]) for s in scene.shapes]

    def join(items: list[str]) -> str:
        return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]

    plain = join([f"{what} {where}" for what, where in parts])
    variants = [
        plain,
        "there is " + plain,
        join([f"{what} is {where}" for what, where in parts]),
        join([f"{what} {where}" for what, where in reversed(parts)]),
    ]
    return list(dict.fromkeys(variants))  # drop duplicates (one shape: reverse == plain)

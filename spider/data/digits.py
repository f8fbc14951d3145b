"""Real handwritten digits (scikit-learn's 1,797 8x8 scans, shipped with it: no download).

The scans are split once, by index, into a train pool and a test pool that never change with
the seed, so no seed or dataset ever tests on a scan some other one trained on. Images are
upscaled with nearest-neighbour (the 8x8 grid stays visible, nothing is invented) onto the
same IMAGE_SIZE canvas as the shape scenes.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from spider.data.scenes import IMAGE_SIZE

TEST_EVERY = 5  # scan i is in the test pool when i % TEST_EVERY == 0 (360 of 1,797)


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 0-255 with ink high, shape (1797, 8, 8); targets int, shape (1797,))."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    bunch = load_digits()
    ink = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    ink.setflags(write=False)
    target = bunch.target.astype(np.int64)
    target.setflags(write=False)
    return ink, target


@functools.cache
def pool(split: str) -> np.ndarray:
    """Indices of the scans that ``split`` may use; train and test pools are disjoint."""
    n = len(_digits()[1])
    idx = np.arange(n)
    out = idx[idx % TEST_EVERY == 0] if split == "test" else idx[idx % TEST_EVERY != 0]
    out.setflags(write=False)
    return out


def label(index: int) -> int:
    """The digit (0-9) scan ``index`` shows."""
    return int(_digits()[1][index])


def glyph(index: int, scale: int, ink: tuple[int, int, int], paper: tuple[int, int, int]):
    """Scan ``index`` as a (8*scale, 8*scale, 3) uint8 array, blending paper to ink."""
    alpha = _digits()[0][index].astype(np.float32) / 255.0
    alpha = np.kron(alpha, np.ones((scale, scale), np.float32))[..., None]
    rgb = (1 - alpha) * np.array(paper, np.float32) + alpha * np.array(ink, np.float32)
    return np.rint(rgb).astype(np.uint8)


def canvas(glyphs: list[tuple[np.ndarray, int, int]], paper: tuple[int, int, int]) -> Image.Image:
    """Paste ``(glyph, left, top)`` arrays onto an IMAGE_SIZE canvas of colour ``paper``."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    img[:] = paper
    for g, left, top in glyphs:
        h, w = g.shape[:2]
        img[top : top + h, left : left + w] = g
    return Image.fromarray(img, "RGB")

"""Pool big 2-D tensors into at most ``max_cells`` x ``max_cells`` cells for display.

A browser cannot draw (or receive) a 4096 x 11008 heatmap, and a person cannot read one.
:func:`downsample` splits the tensor into equal blocks of ``fr x fc`` entries (the last row
and column of blocks may be smaller) and summarises each block by one number:

* ``mean`` for masks and importances: a cell of a keep-weight mask then shows the mask's
  mean over the block (for a binary mask, the density of free weights);
* ``maxabs`` for updates and weights: the entry of largest ``|x|``, *with its sign*, so that
  a single large update in a block stays visible instead of being averaged away.

``reduce="auto"`` picks ``mean`` when every value is in [0, 1] (masks, ranks) and ``maxabs``
otherwise. The work is two or three vectorised torch reductions over reshaped views (no
Python loops over blocks, no padded copy), so a 4096 x 11008 float32 tensor takes tens of
milliseconds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np
import torch

REDUCTIONS = ("auto", "mean", "maxabs")


@dataclasses.dataclass(frozen=True)
class Downsampled:
    """A pooled tensor and which original rows/columns each cell covers.

    Cell ``(i, j)`` summarises rows ``row_edges[i] : row_edges[i + 1]`` and columns
    ``col_edges[j] : col_edges[j + 1]`` of the (2-D view of the) original tensor. Unpacks as
    ``values, row_edges, col_edges = downsample(t)``.
    """

    values: np.ndarray  # (n_rows, n_cols) float32
    row_edges: np.ndarray  # (n_rows + 1,) int64, from 0 to shape[0]
    col_edges: np.ndarray  # (n_cols + 1,) int64, from 0 to shape[1]
    reduce: str  # "mean" or "maxabs": the reduction actually used
    shape: tuple[int, int]  # the original tensor's 2-D shape

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.values, self.row_edges, self.col_edges))

    @property
    def block(self) -> tuple[int, int]:
        """``(rows, cols)`` of original entries per full cell."""
        return int(self.row_edges[1] - self.row_edges[0]), int(self.col_edges[1] - self.col_edges[0])

    def row_labels(self) -> list[str]:
        """``"a–b"`` (inclusive original indices) per row of cells, for hover text."""
        return _range_labels(self.row_edges)

    def col_labels(self) -> list[str]:
        return _range_labels(self.col_edges)

    def axes(self) -> tuple[list, list, str]:
        """``(x, y, axis type)`` for a heatmap of the cells: the column and row numbers on
        linear axes when every cell is one entry, else the ``"a–b"`` labels on category
        axes. Why: plotly draws a heatmap on category axes several times slower (a tensor
        of 72K entries took ~0.3 s more in Chromium), and integer positions give the same
        hover."""
        if self.block == (1, 1):
            return (self.col_edges[:-1].tolist(), self.row_edges[:-1].tolist(), "linear")
        return self.col_labels(), self.row_labels(), "category"


def _range_labels(edges: np.ndarray) -> list[str]:
    return [
        str(a) if b - a == 1 else f"{a}–{b - 1}"
        for a, b in zip(edges[:-1].tolist(), edges[1:].tolist())
    ]


def as_2d(tensor) -> torch.Tensor:
    """A torch view of ``tensor`` as 2-D: 0-D/1-D become one row; >2-D keep the first dim.

    Accepts torch tensors and anything ``numpy.asarray`` takes (numpy arrays are shared, not
    copied, when they can be).
    """
    if not torch.is_tensor(tensor):
        array = np.asarray(tensor)
        if array.dtype == np.bool_:
            array = array.astype(np.float32)
        if not array.flags.c_contiguous or not array.flags.writeable:
            array = np.ascontiguousarray(array) if array.flags.writeable else array.copy()
        tensor = torch.from_numpy(array)
    if tensor.dim() == 0:
        return tensor.reshape(1, 1)
    if tensor.dim() == 1:
        return tensor.reshape(1, -1)
    if tensor.dim() > 2:
        return tensor.reshape(tensor.shape[0], -1)
    return tensor


def _block_reduce(x: torch.Tensor, dim: int, factor: int, op: str) -> torch.Tensor:
    """Reduce consecutive blocks of ``factor`` entries along ``dim`` (the last may be short).

    ``op`` is ``sum``, ``amax`` or ``amin``. The full blocks are a reshaped *view*; the short
    tail block, when there is one, is reduced separately and appended.
    """
    if factor == 1:
        return x
    n = x.shape[dim]
    full = n // factor
    pieces = []
    if full:
        main = x.narrow(dim, 0, full * factor).unflatten(dim, (full, factor))
        pieces.append(getattr(main, op)(dim=dim + 1))
    if n - full * factor:
        tail = x.narrow(dim, full * factor, n - full * factor)
        pieces.append(getattr(tail, op)(dim=dim, keepdim=True))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def _edges(n: int, factor: int) -> np.ndarray:
    cells = math.ceil(n / factor)
    return np.minimum(np.arange(cells + 1, dtype=np.int64) * factor, n)


def downsample(tensor, max_cells: int | tuple[int, int] = 512,
               reduce: str = "auto") -> Downsampled:
    """Pool ``tensor`` to at most ``max_cells`` x ``max_cells`` cells.

    Args:
        tensor: torch tensor or numpy array (bool, integer or floating). 1-D is one row;
            >2-D is viewed as ``(shape[0], prod(rest))``.
        max_cells: the most cells per axis, or ``(rows, cols)`` for each axis its own. Each
            axis of length ``n`` is split into blocks of ``ceil(n / max_cells)`` entries (no
            pooling where ``n`` fits).
        reduce: ``mean`` (block mean: density of a mask), ``maxabs`` (the block's entry of
            largest ``|x|``, sign kept; on a tie between ``+a`` and ``-a`` the positive wins)
            or ``auto`` (``mean`` when all values lie in [0, 1], else ``maxabs``).

    NaN in a block makes that cell NaN. Returns a :class:`Downsampled`.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    max_rows, max_cols = (max_cells, max_cells) if isinstance(max_cells, int) else max_cells
    if min(max_rows, max_cols) < 1:
        raise ValueError(f"max_cells must be >= 1, got {max_cells}")
    x = as_2d(tensor)
    if x.is_complex():
        raise ValueError("downsample does not take complex tensors")
    if x.device.type != "cpu":
        x = x.cpu()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # bool/int/bf16/fp16: one float32 copy (sums in bf16 would lose bits)
    rows, cols = x.shape
    if x.numel() == 0:
        raise ValueError(f"cannot downsample an empty tensor of shape {tuple(x.shape)}")

    if reduce == "auto":
        low, high = torch.aminmax(x)
        reduce = "mean" if bool(low >= 0) and bool(high <= 1) else "maxabs"

    fr = math.ceil(rows / max_rows)
    fc = math.ceil(cols / max_cols)
    row_edges, col_edges = _edges(rows, fr), _edges(cols, fc)

    # Rows first: reducing the middle dim of (blocks, fr, cols) runs along contiguous memory;
    # the column pass then sees a tensor fr times smaller.
    if reduce == "mean":
        summed = _block_reduce(_block_reduce(x, 0, fr, "sum"), 1, fc, "sum")
        counts = np.outer(np.diff(row_edges), np.diff(col_edges))
        values = summed.double().numpy() / counts
    else:
        high = _block_reduce(_block_reduce(x, 0, fr, "amax"), 1, fc, "amax")
        low = _block_reduce(_block_reduce(x, 0, fr, "amin"), 1, fc, "amin")
        values = torch.where(high >= -low, high, low).numpy()
    return Downsampled(
        values=np.ascontiguousarray(values, dtype=np.float32),
        row_edges=row_edges,
        col_edges=col_edges,
        reduce=reduce,
        shape=(int(rows), int(cols)),
    )

"""downsample: exact block values, sign-keeping max-|x|, edges, input forms, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from analysis.heatmaps import Downsampled, downsample


def _reference(x: np.ndarray, row_edges, col_edges, reduce: str) -> np.ndarray:
    """Per-block loop, the obvious (slow) way."""
    out = np.empty((len(row_edges) - 1, len(col_edges) - 1))
    for i in range(len(row_edges) - 1):
        for j in range(len(col_edges) - 1):
            block = x[row_edges[i] : row_edges[i + 1], col_edges[j] : col_edges[j + 1]]
            if reduce == "mean":
                out[i, j] = block.mean()
            else:
                flat = block.ravel()
                out[i, j] = flat[np.argmax(np.abs(flat))]
    return out


def test_block_pattern_gives_exact_block_means():
    blocks = np.arange(16, dtype=np.float32).reshape(4, 4) / 16.0  # values in [0, 1)
    tensor = torch.from_numpy(np.kron(blocks, np.ones((8, 5), dtype=np.float32)))  # 32 x 20
    pooled = downsample(tensor, max_cells=4)
    assert pooled.reduce == "mean"  # auto: everything in [0, 1]
    np.testing.assert_array_equal(pooled.values, blocks)
    np.testing.assert_array_equal(pooled.row_edges, [0, 8, 16, 24, 32])
    np.testing.assert_array_equal(pooled.col_edges, [0, 5, 10, 15, 20])
    assert pooled.block == (8, 5)


def test_mean_of_a_binary_mask_is_its_density_with_partial_edge_blocks():
    generator = torch.Generator().manual_seed(1)
    mask = (torch.rand(37, 53, generator=generator) > 0.7).float()
    pooled = downsample(mask, max_cells=8)
    # 37 rows in blocks of 5 -> 8 cells, the last holds 2 rows; 53 cols in blocks of 7 -> 8
    np.testing.assert_array_equal(pooled.row_edges, [0, 5, 10, 15, 20, 25, 30, 35, 37])
    np.testing.assert_array_equal(pooled.col_edges, [0, 7, 14, 21, 28, 35, 42, 49, 53])
    expected = _reference(mask.numpy(), pooled.row_edges, pooled.col_edges, "mean")
    np.testing.assert_allclose(pooled.values, expected, rtol=0, atol=1e-6)
    assert pooled.values[-1, -1] == pytest.approx(mask[35:, 49:].mean().item())


def test_maxabs_keeps_the_sign_of_the_largest_magnitude():
    x = torch.zeros(4, 4)
    x[0, 0], x[1, 1] = -5.0, 3.0  # block (0, 0): largest |x| is negative
    x[0, 2], x[1, 3] = 5.0, -3.0  # block (0, 1): largest |x| is positive
    x[2, 0], x[3, 1] = -0.5, -0.25  # block (1, 0): all non-positive
    x[2, 2], x[3, 3] = 4.0, -4.0  # block (1, 1): a tie, the positive wins
    pooled = downsample(x, max_cells=2)
    assert pooled.reduce == "maxabs"  # auto: values outside [0, 1]
    np.testing.assert_array_equal(pooled.values, [[-5.0, 5.0], [-0.5, 4.0]])


def test_maxabs_matches_a_block_loop_on_random_data_with_ragged_edges():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(101, 67, generator=generator)
    pooled = downsample(x, max_cells=10, reduce="maxabs")
    expected = _reference(x.numpy(), pooled.row_edges, pooled.col_edges, "maxabs")
    np.testing.assert_array_equal(pooled.values, expected.astype(np.float32))


def test_explicit_reduce_overrides_auto():
    x = torch.tensor([[0.0, 1.0, 0.25, 0.75]])
    assert downsample(x, max_cells=2, reduce="maxabs").values.tolist() == [[1.0, 0.75]]
    assert downsample(x, max_cells=2).values.tolist() == [[0.5, 0.5]]


def test_cell_counts_and_edges_for_a_7b_mlp_shape():
    x = torch.zeros(4096, 11008)
    pooled = downsample(x)
    assert pooled.values.shape == (512, 501)  # 11008 / 22 per cell = 500 full + one of 8
    assert pooled.row_edges[-1] == 4096 and pooled.col_edges[-1] == 11008
    assert pooled.col_edges[-1] - pooled.col_edges[-2] == 8
    assert pooled.values.dtype == np.float32
    assert pooled.shape == (4096, 11008)


def test_small_tensor_is_returned_unpooled_and_labels_name_ranges():
    x = np.array([[0.1, 0.2], [0.3, 0.4]], dtype=np.float64)
    pooled = downsample(x)
    np.testing.assert_allclose(pooled.values, x)
    assert pooled.row_labels() == ["0", "1"]
    big = downsample(torch.zeros(10, 1000), max_cells=4)
    assert big.col_labels() == ["0–249", "250–499", "500–749", "750–999"]


def test_input_forms_one_d_numpy_bool_bf16_and_three_d():
    values, rows, cols = downsample(np.array([0.0, 1.0, 1.0, 1.0]), max_cells=2)  # unpacks
    assert values.tolist() == [[0.5, 1.0]] and rows.tolist() == [0, 1]
    assert cols.tolist() == [0, 2, 4]
    assert downsample(np.array([[True, False, True, True]]), max_cells=2).values.tolist() == [
        [0.5, 1.0]
    ]
    bf16 = downsample(torch.tensor([[-2.0, 1.0]], dtype=torch.bfloat16), max_cells=1)
    assert bf16.values.tolist() == [[-2.0]]
    conv = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)  # (out, in, kh, kw)
    pooled = downsample(conv, max_cells=1, reduce="mean")
    assert pooled.shape == (2, 12)
    assert pooled.values.tolist() == [[conv.mean().item()]]


def test_numpy_negative_strides_and_nan():
    x = np.arange(16, dtype=np.float32).reshape(4, 4)[::-1]
    pooled = downsample(x, max_cells=2, reduce="maxabs")
    assert pooled.values.tolist() == [[13.0, 15.0], [5.0, 7.0]]
    y = np.zeros((2, 2), dtype=np.float32)
    y[0, 0] = np.nan
    assert np.isnan(downsample(y, max_cells=1, reduce="mean").values[0, 0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="reduce"):
        downsample(torch.zeros(2, 2), reduce="median")
    with pytest.raises(ValueError, match="empty"):
        downsample(torch.zeros(0, 3))
    assert isinstance(downsample(torch.zeros(3, 3)), Downsampled)


def test_downsample_of_a_7b_mlp_matrix_is_fast():
    x = torch.randn(4096, 11008, generator=torch.Generator().manual_seed(0))
    downsample(x)  # warm-up
    best = min(_timed(lambda: downsample(x)) for _ in range(3))
    assert best < 1.0, f"downsample took {best:.2f} s (target well under 1 s)"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_each_axis_may_have_its_own_limit():
    x = torch.arange(160 * 448, dtype=torch.float32).reshape(160, 448)
    whole = downsample(x, max_cells=(160, 448))
    assert whole.block == (1, 1) and whole.values.shape == (160, 448)
    np.testing.assert_array_equal(whole.values, x.numpy())
    half = downsample(x, max_cells=(80, 448), reduce="mean")
    assert half.block == (2, 1) and half.values.shape == (80, 448)

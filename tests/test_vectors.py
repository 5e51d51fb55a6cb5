"""vectors.py: normalising, averaging windows, truncating dimensions."""

from __future__ import annotations

import numpy as np
import pytest

from embedpool.vectors import combine_windows, l2_normalize, truncate_dims


def test_l2_normalize_keeps_zero_rows_zero() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    out = l2_normalize(x)
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
    assert out.dtype == np.float32
    np.testing.assert_allclose(l2_normalize(np.array([3.0, 4.0])), [0.6, 0.8])


@pytest.mark.parametrize(
    ("owner", "n_items"),
    [([0, 1, 2], 3), ([0, 0, 1], 2), ([0, 1, 1, 1, 2], 3)],
    ids=["one-window-each", "first-has-two", "middle-has-three"],
)
def test_combine_windows_is_the_normalised_mean(owner: list[int], n_items: int) -> None:
    rows = l2_normalize(np.random.default_rng(1).standard_normal((len(owner), 6)))
    out = combine_windows(rows, owner, n_items)
    for item in range(n_items):
        mean = rows[[i for i, o in enumerate(owner) if o == item]].mean(axis=0)
        np.testing.assert_allclose(out[item], mean / np.linalg.norm(mean), atol=1e-6)


def test_truncate_dims_keeps_the_first_and_renormalises() -> None:
    rows = l2_normalize(np.array([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 5.0]]))
    out = truncate_dims(rows, 2)
    np.testing.assert_allclose(out, [[2**-0.5, 2**-0.5], [1.0, 0.0]], atol=1e-6)
    assert truncate_dims(rows, 4) is rows
    for bad in (0, 5):
        with pytest.raises(ValueError, match="between 1 and"):
            truncate_dims(rows, bad)

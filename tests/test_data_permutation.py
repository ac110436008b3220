"""Keyed Feistel permutations of [0, n): bijective for every n, keyed, scalar and vector paths agree."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_video.data.permutation import FeistelPermutation, derive_key


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_bijection_of_every_size(n: int) -> None:
    perm = FeistelPermutation(n, key=derive_key(7, n))
    out = perm(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    assert [perm.at(i) for i in range(min(n, 50))] == out[:50].tolist()


def test_keys_change_the_order_and_orders_look_shuffled() -> None:
    n = 5000
    a, b = FeistelPermutation(n, 1)(np.arange(n)), FeistelPermutation(n, 2)(np.arange(n))
    assert not np.array_equal(a, b)
    # a shuffled order has few fixed points and little correlation with the identity
    assert (a == np.arange(n)).sum() < 20
    assert abs(np.corrcoef(a, np.arange(n))[0, 1]) < 0.1
    assert derive_key(1, 2) == derive_key(1, 2) != derive_key(2, 1)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        FeistelPermutation(0, 1)
    perm = FeistelPermutation(10, 1)
    with pytest.raises(IndexError, match="outside"):
        perm(np.array([10]))
    with pytest.raises(IndexError, match="outside"):
        perm.at(-1)

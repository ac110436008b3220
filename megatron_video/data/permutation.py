"""Keyed pseudo-random permutations of [0, n) evaluated on demand (no per-element table).

A balanced Feistel network over 2h-bit integers is a bijection of [0, 4^h) for any round function; choosing
the smallest h with 4^h >= n and "cycle-walking" (re-applying the network while the value is >= n) restricts
it to a bijection of [0, n) (Black & Rogaway, "Ciphers with Arbitrary Finite Domains", 2002). Since 4^h < 4n,
a walk takes fewer than 4 steps on average. The round function is a 64-bit integer mixer (splitmix64-style
multiply-xorshift) of the right half, the key and the round number; it need not be invertible.
"""

from __future__ import annotations

import hashlib

import numpy as np

_ROUNDS = 6
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_M1, _M2 = np.uint64(_C1), np.uint64(_C2)
_U64 = (1 << 64) - 1


def derive_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, epoch, purpose, ...): the same on every process and platform."""
    data = b"".join((int(p) % (1 << 64)).to_bytes(8, "little") for p in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class FeistelPermutation:
    """perm(x) for x in [0, n): a keyed bijection of [0, n), vectorised over numpy arrays."""

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"permutation size must be >= 1, got {n}")
        self.n = int(n)
        self.half_bits = max(1, ((self.n - 1).bit_length() + 1) // 2)
        self._mask = np.uint64((1 << self.half_bits) - 1)
        self._round_keys = [np.uint64(derive_key(key, r)) for r in range(_ROUNDS)]

    def _network(self, x: np.ndarray) -> np.ndarray:
        hb = np.uint64(self.half_bits)
        left, right = x >> hb, x & self._mask
        for rk in self._round_keys:
            z = (right ^ rk) * _M1
            z = (z ^ (z >> np.uint64(31))) * _M2
            z ^= z >> np.uint64(29)
            left, right = right, left ^ (z & self._mask)
        return (left << hb) | right

    def _network_int(self, x: int) -> int:
        """`_network` for one Python int (much faster than numpy scalars; the same function)."""
        hb, mask = self.half_bits, int(self._mask)
        left, right = x >> hb, x & mask
        for rk in self._round_keys:
            z = ((right ^ int(rk)) * _C1) & _U64
            z = ((z ^ (z >> 31)) * _C2) & _U64
            z ^= z >> 29
            left, right = right, left ^ (z & mask)
        return (left << hb) | right

    def at(self, x: int) -> int:
        """perm(x) for one int in [0, n)."""
        if not 0 <= x < self.n:
            raise IndexError(f"permutation input {x} outside [0, {self.n})")
        y = self._network_int(int(x))
        while y >= self.n:
            y = self._network_int(y)
        return y

    def __call__(self, x: np.ndarray | int) -> np.ndarray:
        """perm(x) elementwise (int64 array); x must lie in [0, n)."""
        x = np.asarray(x, np.int64)
        if x.size and (int(x.min()) < 0 or int(x.max()) >= self.n):
            raise IndexError(f"permutation input outside [0, {self.n})")
        if x.size <= 256:  # numpy's per-call overhead dominates small batches
            return np.array([self.at(int(i)) for i in x.ravel()], np.int64).reshape(x.shape)
        y = self._network(x.astype(np.uint64).ravel())
        out = y >= self.n
        while out.any():  # cycle-walking: stays inside the cycle of x, which contains values < n
            y[out] = self._network(y[out])
            out = y >= self.n
        return y.astype(np.int64).reshape(x.shape)

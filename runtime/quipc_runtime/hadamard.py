"""Hadamard matrices of order 2^k * m, built from Sylvester and Paley constructions.

Paley I gives order q+1 for a prime q = 3 (mod 4) (12, 20, 44, 60, 108, ...); Paley II
gives order 2(q+1) for a prime q = 1 (mod 4) (12, 28, 36, 60, ...). Orders reachable
only through prime powers (e.g. 52 = 2*26 with q = 25) are not built: callers fall back
to a Kronecker transform for such sizes.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(j - i), chi the quadratic character modulo the prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=np.int64)
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> np.ndarray:
    n = q + 1
    core = np.zeros((n, n), dtype=np.int64)
    core[0, 1:] = 1
    core[1:, 0] = -1
    core[1:, 1:] = _jacobsthal(q)
    return np.eye(n, dtype=np.int64) + core


def _paley2(q: int) -> np.ndarray:
    n = q + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = 1
    s[1:, 1:] = _jacobsthal(q)
    return np.kron(s, np.array([[1, -1], [-1, -1]])) + np.kron(np.eye(n, dtype=np.int64),
                                                                np.array([[1, 1], [1, -1]]))


def _construction(m: int):
    """How to build an order-m Hadamard matrix (m > 2, not a power of two), or None."""
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1, m - 1
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2, m // 2 - 1
    return None


def has_hadamard(m: int) -> bool:
    return m in (1, 2) or (m & (m - 1)) == 0 or _construction(m) is not None


MAX_DENSE_ORDER = 256  # a larger non-power-of-two factor costs more than a Kronecker transform


def split_order(n: int):
    """n = m * 2^k with the largest 2^k such that an order-m matrix is known (m small enough
    to apply densely); None if there is none."""
    if n < 1:
        return None
    pow2 = n & -n
    while pow2 >= 1:
        m = n // pow2
        if m > MAX_DENSE_ORDER and (m & (m - 1)):
            return None
        if has_hadamard(m):
            return m, pow2
        pow2 //= 2
    return None


@lru_cache(maxsize=64)
def hadamard(m: int) -> np.ndarray:
    """An order-m Hadamard matrix (entries +-1, H H^T = m I) as int8."""
    if m == 1:
        return np.ones((1, 1), dtype=np.int8)
    if (m & (m - 1)) == 0:
        h = np.ones((1, 1), dtype=np.int64)
        while h.shape[0] < m:
            h = np.block([[h, h], [h, -h]])
        return h.astype(np.int8)
    how = _construction(m)
    if how is None:
        raise ValueError(f"no Hadamard construction known for order {m}")
    build, q = how
    return build(q).astype(np.int8)

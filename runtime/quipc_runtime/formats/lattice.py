"""Codebooks from the E8 lattice, built from constants (nothing is stored per model).

E8P ("E8 padded", after QuIP#): 2^16 points of the shifted lattice coset D8hat +/- 1/4,
where D8hat = {x in (Z + 1/2)^8 : sum(x) even}. A 16-bit index holds
  bits 0-7   the source: one of 256 vectors of absolute values (all 227 patterns of
             squared norm <= 10, then 29 of norm 12: those with five 3/2 first, in
             lexicographic order),
  bits 8-14  the signs of coordinates 0..6 (1 = negative); the sign of coordinate 7 is
             implied, since a point of D8hat has an even coordinate sum: coordinate 7 is
             negative iff popcount(bits 8-14) + sum(source) is odd,
  bit 15     the shift: 0 -> +1/4, 1 -> -1/4 on every coordinate.
E8 one-bit: 256 points for an 8-bit index: the 240 roots of E8 (squared norm 2; the
112 of shape (+-1, +-1, 0^6) in lexicographic order of positions and signs, then the
128 of (+-1/2)^8 with an even number of minus signs, in binary order) and +-2 e_i.
"""
from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np

SOURCES = 256
GROUP = 8


@lru_cache(maxsize=None)
def e8p_sources() -> np.ndarray:
    """(256, 8) float32 absolute-value patterns, in index order."""
    halves = np.array(list(itertools.product((0.5, 1.5, 2.5, 3.5), repeat=GROUP)))
    norm2 = (halves ** 2).sum(1)
    low = halves[norm2 <= 10]
    shell = halves[norm2 == 12]
    fives = (shell == 1.5).sum(1) == 5
    shell = np.concatenate([shell[fives], shell[~fives]])
    # product() yields lexicographic order; stable sorts keep it within equal norms
    low = low[np.argsort((low ** 2).sum(1), kind="stable")]
    table = np.concatenate([low, shell[: SOURCES - len(low)]]).astype(np.float32)
    assert table.shape == (SOURCES, GROUP)
    return table


@lru_cache(maxsize=None)
def e8p_source_parity() -> np.ndarray:
    """(256,) uint8: sum of each source's coordinates mod 2 (the sum is an integer)."""
    return (np.rint(e8p_sources().sum(1)).astype(np.int64) % 2).astype(np.uint8)


@lru_cache(maxsize=None)
def e8p_table() -> np.ndarray:
    """(65536, 8) float32: the point of every 16-bit E8P index (the reference decoder)."""
    idx = np.arange(1 << 16, dtype=np.uint32)
    src = e8p_sources()[idx & 0xFF]
    sign_bits = (idx[:, None] >> (8 + np.arange(7, dtype=np.uint32))) & 1       # (N, 7)
    last = (sign_bits.sum(1) + e8p_source_parity()[idx & 0xFF]) & 1
    neg = np.concatenate([sign_bits, last[:, None]], axis=1).astype(np.float32)
    shift = np.where((idx >> 15) & 1, -0.25, 0.25).astype(np.float32)
    return (src * (1.0 - 2.0 * neg) + shift[:, None]).astype(np.float32)


@lru_cache(maxsize=None)
def e8_one_bit_table() -> np.ndarray:
    """(256, 8) float32: E8's 240 roots, then +2 e_i and -2 e_i."""
    rows = []
    for i, j in itertools.combinations(range(GROUP), 2):
        for a, b in itertools.product((1.0, -1.0), repeat=2):
            v = np.zeros(GROUP)
            v[i], v[j] = a, b
            rows.append(v)
    for signs in itertools.product((0.5, -0.5), repeat=GROUP):
        if sum(s < 0 for s in signs) % 2 == 0:
            rows.append(np.array(signs))
    eye = 2.0 * np.eye(GROUP)
    table = np.concatenate([np.array(rows), eye, -eye]).astype(np.float32)
    assert table.shape == (SOURCES, GROUP)
    return table

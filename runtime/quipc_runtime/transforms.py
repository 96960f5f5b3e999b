"""Orthogonal transforms used for incoherence processing, described compactly.

A transform T on R^n is T x = K (s * x): s a +-1 sign vector (or all ones) and K a
Kronecker product F_1 x ... x F_k of small orthogonal factors, applied to x reshaped
row-major to (f_1, ..., f_k) by multiplying each axis with its factor.
- "hadamard": factors are normalized Hadamard matrices (one order m <= 256, one power
  of two), s is random: the randomized Hadamard transform. Stored as its sign bits.
- "kron": factors are random orthogonal matrices regenerated from a seed, s = 1.
- "identity": nothing (the `ldlq` and `rtn` methods).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .hadamard import hadamard, split_order

KINDS = ("identity", "hadamard", "kron")

# Power-of-two Hadamard factors above this order are applied as two Sylvester factors
# (Transform.applied_matrices); up to it, as one dense matrix.
SYLVESTER_SPLIT = 256


def derive_seed(seed: int, *labels: str) -> int:
    """A stable 63-bit seed for one (layer, side) from the global seed."""
    digest = hashlib.sha256(":".join([str(seed), *labels]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _gaussians(seed: int, count: int) -> np.ndarray:
    # Box-Muller on PCG64's raw stream, which numpy keeps stable across versions
    # (its distribution methods carry no such promise): the runtime must rebuild
    # exactly the factors that the compiler used.
    raw = np.random.PCG64(seed).random_raw(2 * count)
    u = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53
    u1, u2 = u[:count], u[count:]
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def random_orthogonal(order: int, seed: int) -> np.ndarray:
    """Haar-random orthogonal matrix: QR of a Gaussian matrix with R's diagonal made positive."""
    q, r = np.linalg.qr(_gaussians(seed, order * order).reshape(order, order))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]


def kron_orders(n: int) -> tuple[int, ...]:
    """Two factors as close to sqrt(n) as n's divisors allow (one factor if n is prime)."""
    p = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    return (n,) if p == 1 else (p, n // p)


@dataclass
class Transform:
    kind: str
    n: int
    orders: tuple[int, ...] = ()
    seed: int | None = None
    signs: np.ndarray | None = None  # int8 +-1 of length n (hadamard only)
    _mats: list | None = field(default=None, repr=False, compare=False)
    _applied: list | None = field(default=None, repr=False, compare=False)

    @staticmethod
    def make(kind: str, n: int, seed: int) -> "Transform":
        """Build a random transform; hadamard falls back to kron when n has no known order."""
        if kind not in KINDS:
            raise ValueError(f"unknown incoherence transform {kind!r}; expected one of {KINDS}")
        if kind == "identity":
            return Transform("identity", n)
        if kind == "hadamard":
            split = split_order(n)
            if split is not None:
                m, pow2 = split
                orders = tuple(o for o in (m, pow2) if o > 1) or (1,)
                rng = np.random.Generator(np.random.PCG64(seed))
                signs = (rng.integers(0, 2, n, dtype=np.int8) * 2 - 1).astype(np.int8)
                return Transform("hadamard", n, orders, None, signs)
        return Transform("kron", n, kron_orders(n), seed)

    def matrices(self) -> list[np.ndarray]:
        """The Kronecker factors as float32 matrices (cached)."""
        if self._mats is None:
            if self.kind == "identity":
                self._mats = []
            elif self.kind == "hadamard":
                self._mats = [(hadamard(o) / np.sqrt(o)).astype(np.float32) for o in self.orders]
            else:
                self._mats = [random_orthogonal(o, derive_seed(self.seed, str(i))).astype(np.float32)
                              for i, o in enumerate(self.orders)]
        return self._mats

    def applied_matrices(self) -> list[np.ndarray]:
        """The factors as the compile applies them (kron_right, passes/incoherence): matrices(),
        each power-of-two Hadamard factor of order above SYLVESTER_SPLIT split in two Sylvester
        factors (H_ab = H_a x H_b for powers of two a, b: the same product, so the same
        transform up to rounding; a 4096 factor costs two 64-wide products per row instead of
        one 4096-wide one, and no 4096 x 4096 matrix). Cached."""
        if self._applied is None:
            self._applied = []
            for order, mat in zip(map(int, self.orders), self.matrices()):
                if self.kind == "hadamard" and order > SYLVESTER_SPLIT and order & (order - 1) == 0:
                    a = 1 << ((order.bit_length() - 1) // 2)
                    self._applied += [(hadamard(o) / np.sqrt(o)).astype(np.float32) for o in (a, order // a)]
                else:
                    self._applied.append(mat)
        return self._applied

    def sign_vector(self) -> np.ndarray:
        return np.ones(self.n, np.float32) if self.signs is None else self.signs.astype(np.float32)

    def kron_product(self) -> np.ndarray:
        """The n x n float64 product of the factors, without the signs."""
        if self.kind == "identity":
            return np.eye(self.n)
        k = np.ones((1, 1), np.float64)
        for mat in self.matrices():
            k = np.kron(k, mat.astype(np.float64))
        return k

    def kron_right(self, x: np.ndarray, step: int = 256, out: np.ndarray | None = None) -> np.ndarray:
        """x @ K in float64 for the rows of x (K the Kronecker product, signs not included),
        one factor at a time and `step` rows at a time: no n x n matrix. out: a float64 array
        of x's shape to write it to (x itself allowed: each step reads its rows before writing)."""
        if out is None:
            out = np.empty(x.shape, np.float64)
        if self.kind == "identity":
            out[...] = x
            return out
        mats = [m.astype(np.float64) for m in self.applied_matrices()]
        orders = [m.shape[0] for m in mats]
        for r0 in range(0, x.shape[0], step):
            y = x[r0:r0 + step].astype(np.float64).reshape(-1, *orders)
            for axis, mat in enumerate(mats, start=1):   # (v K)[i] = sum_j v[j] K[j, i], factor by factor
                y = np.moveaxis(np.tensordot(y, mat, axes=([axis], [0])), -1, axis)
            out[r0:r0 + step] = y.reshape(-1, self.n)
        return out

    def dense(self) -> np.ndarray:
        """The n x n matrix (tests and small layers only)."""
        return self.kron_product() * self.sign_vector()[None, :]

    def meta(self) -> dict:
        out = {"kind": self.kind, "n": self.n, "orders": list(self.orders)}
        if self.seed is not None:
            out["seed"] = self.seed
        return out

    def sign_bits(self) -> np.ndarray | None:
        return None if self.signs is None else np.packbits(self.signs < 0)

    @staticmethod
    def from_meta(meta: dict, sign_bits: np.ndarray | None = None) -> "Transform":
        kind, n = meta["kind"], int(meta["n"])
        orders = tuple(int(o) for o in meta.get("orders", ()))
        if kind not in KINDS:
            raise ValueError(f"unknown transform kind {kind!r}")
        if kind != "identity" and int(np.prod(orders)) != n:
            raise ValueError(f"transform factors {orders} do not multiply to {n}")
        signs = None
        if kind == "hadamard" and sign_bits is not None:
            # (no sign bits: the signs were folded into a stored scale vector)
            if sign_bits.size * 8 < n:
                raise ValueError("hadamard transform sign bits are too short")
            signs = np.where(np.unpackbits(sign_bits)[:n] == 1, -1, 1).astype(np.int8)
        if kind == "kron" and meta.get("seed") is None:
            raise ValueError("kron transform is missing its seed")
        return Transform(kind, n, orders, meta.get("seed"), signs)

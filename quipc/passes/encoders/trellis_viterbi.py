"""Viterbi encoding on the tail-biting bitshift trellis of the "trellis" format.

Given sequences x (B, T) and the code table (2^L values), find for each sequence the
state path s_0 .. s_{T-1} (s_{t+1} = (s_t << k | b) mod 2^L) minimizing
sum_t (x_t - CODE[s_t])^2, among the paths that close into a circle: the top L - k bits of
s_0 equal the low L - k bits of s_{T-1} (they are the same bits of the circular stream).

Tail-biting (QTIP's two passes): pass 1 encodes the sequence rotated by T/2 freely, which
fixes the state at the original start from both sides; pass 2 encodes the sequence with
its start's top bits and its end's low bits held to that state's top bits.

`viterbi_reference` is the numpy definition (float32, first minimum on ties); the C++
kernel `quipc_runtime._kernels.trellis_encode` does the same arithmetic in the same order
and the tests hold it to the same states. `encode_sequences` picks the kernel when built.
"""
from __future__ import annotations

import numpy as np


def viterbi_reference(x: np.ndarray, table: np.ndarray, k: int, start: np.ndarray | None = None) -> np.ndarray:
    """One Viterbi pass; start (B,) holds the closing bits per sequence, None for a free path."""
    x = np.asarray(x, np.float32)
    table = np.asarray(table, np.float32)
    B, T = x.shape
    S = table.shape[0]
    L = S.bit_length() - 1
    if S != 1 << L or L <= k:
        raise ValueError(f"the code table needs 2^L > 2^{k} entries, got {S}")
    G = S >> k                                  # predecessors of s: top * G + (s >> k)
    cost = (x[:, :1] - table[None, :]) ** 2
    if start is not None:
        allowed = (np.arange(S)[None, :] >> k) == np.asarray(start)[:, None]
        cost = np.where(allowed, cost, np.float32(np.inf))
    back = np.empty((T, B, G), np.uint8)
    for t in range(1, T):
        prev = cost.reshape(B, 1 << k, G)
        arg = prev.argmin(axis=1)
        back[t] = arg
        best = np.take_along_axis(prev, arg[:, None, :], axis=1)[:, 0]
        cost = np.repeat(best, 1 << k, axis=1) + (x[:, t:t + 1] - table[None, :]) ** 2
    if start is not None:
        closes = (np.arange(S)[None, :] & (G - 1)) == np.asarray(start)[:, None]
        cost = np.where(closes, cost, np.float32(np.inf))
    s = cost.argmin(axis=1).astype(np.int64)
    states = np.empty((B, T), np.int32)
    rows = np.arange(B)
    for t in range(T - 1, -1, -1):
        states[:, t] = s
        if t:
            j = s >> k
            s = back[t][rows, j].astype(np.int64) * G + j
    return states


def tail_biting_reference(x: np.ndarray, table: np.ndarray, k: int) -> np.ndarray:
    """(B, T) -> (B, T) int32 states of closed paths (numpy)."""
    T = x.shape[1]
    rotated = np.roll(np.asarray(x, np.float32), T // 2, axis=1)     # rotated[:, T/2] = x[:, 0]
    start = viterbi_reference(rotated, table, k)[:, T // 2] >> k
    return viterbi_reference(x, table, k, start)


def encode_sequences(x: np.ndarray, table: np.ndarray, k: int, threads: int | None = None) -> np.ndarray:
    """Tail-biting encoding of (B, T) float32 sequences: the C++ kernel when built, else numpy."""
    from quipc_runtime import kernels

    x = np.ascontiguousarray(x, np.float32)
    if kernels.available():
        return kernels.trellis_encode(x, np.ascontiguousarray(table, np.float32), k, threads)
    return tail_biting_reference(x, table, k)

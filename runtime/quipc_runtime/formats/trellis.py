"""Format "trellis": trellis-coded weights on a tail-biting bitshift trellis (QTIP's idea), k = bits.

W' is cut into tiles of 16 rows x 16 columns. A tile's 256 weights, in row-major order
t = 16 r + c, are one sequence coded by a circular bitstream of 256 k bits: weight t reads
the L-bit window of the stream that starts at bit k t (wrapping past the end). That window,
read most significant bit first, is its trellis state s_t, and

    W'[16 R + r, 16 C + c] = scale[16 R + r, 0] * CODE[s_t]

Consecutive states share L - k bits (s_{t+1} = (s_t << k | next k bits) mod 2^L), so each
weight spends k bits and yet draws from 2^L values; the encoder picks the whole path at
once (Viterbi), which is what brings the mean squared error of a Gaussian source below any
8-dimensional lattice code at the same rate. L = STATE_BITS = 12 (16 KiB of fp32 codes, an
L1-resident table); L is a multiple of every k, so s_t is the k-bit symbols t .. t + L/k - 1.

CODE (2^L float32) is computed from constants, never stored. Two codes, two formats that
share everything else (layout, encoder, every backend's decode through the 2^L table):

- "trellis": the 2^L standard-normal quantiles (p + 1/2) / 2^L, quantile p placed at state
  s = perm^-1(p) for a fixed invertible hash `perm` of L bits (so neighbouring states hold
  unrelated values), scaled to unit mean square.
- "trellis256": 256 int8 values, CODE[s] = A8[(s & 255) ^ h(s >> 8)] / rms(A8) with h
  linear over GF(2) (row_hash: columns 0x53, 0xA6, 0x3D, 0x7A). A8 holds the 256
  standard-normal quantiles (p + 1/2) / 256 rounded to 127ths of the largest (Q8, odd:
  Q8[255 - p] = -Q8[p]) in interleaved rows: row r < 8 of 16 (index 16 r + c) is Q8[16 c + r],
  row r + 8 its negation. At 4 bits the 16 states a state
  can step to read one whole row, each row a 16-level quantizer of the whole range at its own
  offset (trellis-coded quantization's subset idea); the XOR spreads which row over all 12
  bits. Lower mean squared error than "trellis" on Gaussian sequences (benchmarks/trellis_code.py
  --mse), and int8 by construction: the kernels' 8-bit copy of its rows (int8_rows) is W'
  itself, where "trellis"'s is rounded.

Storage: stream bits most significant first in each byte; a tile's 32 k bytes are split by
rows, tile row r holding stream bytes [2 k r, 2 k (r + 1)) at codes[16 R + r, 2 k C .. 2 k C + 2 k],
so `codes` keeps every format's (m, n k / 8) shape. scale is (m, 1) fp16. m and n must be
multiples of 16.
"""
from __future__ import annotations

from functools import lru_cache
from statistics import NormalDist

import numpy as np

from ..packing import packed_row_bytes
from . import CodeFormat, register_format

STATE_BITS = 12
TILE = 16                      # a tile is TILE x TILE weights: one trellis sequence
SEQ = TILE * TILE              # 256 weights per sequence
BITS = (2, 3, 4)
_HASH = (0x9E3779B1, 0x85EBCA77)


def state_hash(s: np.ndarray, L: int = STATE_BITS) -> np.ndarray:
    """An invertible map of L-bit integers onto themselves (xor-shifts and odd multipliers)."""
    mask, shift = (1 << L) - 1, L // 2 + 1
    x = np.asarray(s, dtype=np.uint64)
    for mult in _HASH:
        x = x ^ (x >> np.uint64(shift))
        x = (x * np.uint64(mult)) & np.uint64(mask)
    return x ^ (x >> np.uint64(shift))


def _read_only(table: np.ndarray) -> np.ndarray:
    table.flags.writeable = False
    return table


def _hashed_quantiles() -> np.ndarray:
    size = 1 << STATE_BITS
    normal = NormalDist()
    quantiles = np.array([normal.inv_cdf((p + 0.5) / size) for p in range(size)])
    quantiles /= np.sqrt(np.mean(quantiles ** 2))
    return quantiles[state_hash(np.arange(size), STATE_BITS).astype(np.int64)].astype(np.float32)


# trellis256: h(x) = the XOR of HASH_COLUMNS[k] over x's set bits k (linear over GF(2), so that a
# CPU computes it with one affine byte instruction, GFNI)
HASH_COLUMNS = (0x53, 0xA6, 0x3D, 0x7A)


def row_hash(x: np.ndarray) -> np.ndarray:
    """trellis256's h of 4-bit values."""
    x = np.asarray(x, dtype=np.int64)
    out = np.zeros_like(x)
    for k, col in enumerate(HASH_COLUMNS):
        out ^= np.where((x >> k) & 1, col, 0)
    return out


@lru_cache(maxsize=1)
def row_code_int8() -> np.ndarray:
    """trellis256's A8: 256 int8 values, rows r < 8 Q8[16 c + r], rows r + 8 their negations."""
    normal = NormalDist()
    q = np.array([normal.inv_cdf((p + 0.5) / 256) for p in range(256)])
    q8 = np.round(q * 127 / q[-1]).astype(np.int64)
    rows = np.array([[q8[16 * c + r] for c in range(16)] for r in range(8)])
    return _read_only(np.concatenate([rows, -rows]).reshape(256).astype(np.int8))


def xor256_index(s: np.ndarray) -> np.ndarray:
    """trellis256: the A8 index of each 12-bit state."""
    s = np.asarray(s, dtype=np.int64)
    return (s & 255) ^ row_hash(s >> 8)


@lru_cache(maxsize=1)
def row_code_rms() -> float:
    return float(np.sqrt(np.mean(row_code_int8().astype(np.float64) ** 2)))


def _xor256() -> np.ndarray:
    a8 = row_code_int8().astype(np.float64)
    return (a8[xor256_index(np.arange(1 << STATE_BITS))] / row_code_rms()).astype(np.float32)


CODES = {"trellis": _hashed_quantiles, "trellis256": _xor256}
FORMAT_NAMES = tuple(CODES)   # the trellis formats: one layout, one code each


@lru_cache(maxsize=len(CODES))
def code_table(name: str = "trellis") -> np.ndarray:
    """CODE[s] of trellis format `name` for the 2^L states, float32, unit mean square (read-only)."""
    if name not in CODES:
        raise ValueError(f"no trellis code {name!r}; the trellis formats are {FORMAT_NAMES}")
    return _read_only(CODES[name]())


def _tiles(m: int, n: int) -> tuple[int, int]:
    return m // TILE, n // TILE


STATES_STEP = 1 << 20   # states per step of states_to_codes (its temporaries ~ 10 bytes a state)


def states_to_codes(states: np.ndarray, bits: int, L: int = STATE_BITS) -> np.ndarray:
    """(m/16, n/16, 256) states of valid tail-biting paths -> codes (m, n bits / 8) uint8.
    Symbol t of a tile's stream is the top k bits of s_t."""
    rt, ct, _ = states.shape
    out = np.empty((rt * TILE, ct * 2 * bits), np.uint8)
    step = max(1, STATES_STEP // max(ct * SEQ, 1))    # tile rows per step: the bit stream is 8 bytes a weight
    for r0 in range(0, rt, step):
        part = states[r0:r0 + step]
        symbols = np.right_shift(part, L - bits).astype(np.uint8)
        stream = np.unpackbits(symbols[..., None], axis=-1)[..., 8 - bits:]   # (rows, ct, 256, k)
        packed = np.packbits(stream.reshape(part.shape[0], ct, SEQ * bits), axis=-1)   # (rows, ct, 32 k)
        out[r0 * TILE:(r0 + part.shape[0]) * TILE] = \
            packed.reshape(part.shape[0], ct, TILE, 2 * bits).transpose(0, 2, 1, 3).reshape(-1, ct * 2 * bits)
    return out


def codes_to_states(codes: np.ndarray, bits: int, n: int, L: int = STATE_BITS) -> np.ndarray:
    """codes (m, n bits / 8) uint8 -> (m/16, n/16, 256) int32 states."""
    m = codes.shape[0]
    rt, ct = _tiles(m, n)
    stream = codes.reshape(rt, TILE, ct, 2 * bits).transpose(0, 2, 1, 3).reshape(rt, ct, 32 * bits)
    bitvec = np.unpackbits(stream, axis=-1).reshape(rt, ct, SEQ, bits)
    symbols = np.zeros((rt, ct, SEQ), np.int32)
    for b in range(bits):
        symbols = (symbols << 1) | bitvec[..., b]
    states = np.zeros_like(symbols)
    for i in range(L // bits):        # s_t = symbols t, t+1, ... (circular), first most significant
        states = (states << bits) | np.roll(symbols, -i, axis=-1)
    return states


def tiles_to_matrix(tiles: np.ndarray) -> np.ndarray:
    """(m/16, n/16, 256) per-tile values -> (m, n)."""
    rt, ct, _ = tiles.shape
    return tiles.reshape(rt, ct, TILE, TILE).transpose(0, 2, 1, 3).reshape(rt * TILE, ct * TILE)


def matrix_to_tiles(w: np.ndarray) -> np.ndarray:
    """(m, n) -> (m/16, n/16, 256), each tile's weights in row-major order."""
    m, n = w.shape
    rt, ct = _tiles(m, n)
    return w.reshape(rt, TILE, ct, TILE).transpose(0, 2, 1, 3).reshape(rt, ct, SEQ)


def _specs(m: int, n: int, bits: int) -> dict:
    return {"codes": ((m, packed_row_bytes(n, bits)), np.uint8), "scale": ((m, 1), np.float16)}


def _decoder(name: str):
    def decode(tensors: dict, bits: int, n: int) -> np.ndarray:
        codes, scale = tensors["codes"], tensors["scale"].astype(np.float32)
        values = code_table(name)[codes_to_states(codes, bits, n)]
        return tiles_to_matrix(values) * scale[:, :1]
    return decode


def _shape_check(name: str):
    def check_shape(n: int, m: int | None = None) -> None:
        for what, size in (("row width", n), ("row count", m)):
            if size is not None and size % TILE:
                raise ValueError(f"format {name!r} codes tiles of {TILE}x{TILE} weights; a {what} of "
                                 f"{size} is not a multiple of {TILE} (use --format e8p or grid for this model)")
    return check_shape


def _register(name: str, code: str) -> CodeFormat:
    return register_format(CodeFormat(
        name=name, bits=BITS, tensor_specs=_specs, decode=_decoder(name), check_shape=_shape_check(name),
        row_group=TILE, describe=f"trellis-coded (tail-biting bitshift trellis, {STATE_BITS}-bit states, "
                                 f"16x16 tiles), {code}, fp16 scale per row"))


TRELLIS = _register("trellis", "computed Gaussian code at hashed states")
TRELLIS256 = _register("trellis256", "256-value int8 Gaussian code in interleaved rows")

"""The "trellis" code format: its code table, bit layout and decoder (quipc_runtime.formats.trellis),
the Viterbi encoder (numpy reference and C++ kernel, quipc/passes/encoders/trellis_viterbi.py)
and the encoder with BlockLDLQ (quipc/passes/encoders/trellis.py)."""
import itertools
from statistics import NormalDist

import numpy as np
import pytest
import torch

from quipc.compile import CalibConfig, compile_model
from quipc.config import QuantConfig
from quipc.passes.block_ldlq import block_ldlq
from quipc.passes.encoders import encode
from quipc.passes.encoders.e8p import StagedQuantizer, fit_scales
from quipc.passes.encoders.trellis import fit_scale
from quipc.passes.encoders.trellis_viterbi import tail_biting_reference, viterbi_reference
from quipc.passes.ldlq import proxy_loss
from quipc_runtime import kernels
from quipc_runtime.formats import get_format
from quipc_runtime.formats.trellis import (STATE_BITS, TILE, code_table, codes_to_states, matrix_to_tiles,
                                           state_hash, states_to_codes, tiles_to_matrix)
from test_ldlq import random_problem

TABLE = code_table()


def _cost(x, table, states):
    return ((table[states] - x) ** 2).sum(axis=-1)


def _closed(states, L, k):
    g = (1 << (L - k)) - 1
    steps = ((states[:, 1:] >> k) == (states[:, :-1] & g)).all()
    return bool(steps and ((states[:, 0] >> k) == (states[:, -1] & g)).all())


def test_code_table_is_the_gaussian_quantiles_in_hashed_order():
    assert np.array_equal(np.sort(state_hash(np.arange(1 << STATE_BITS))), np.arange(1 << STATE_BITS))
    size = 1 << STATE_BITS
    q = np.array([NormalDist().inv_cdf((p + 0.5) / size) for p in range(size)])
    np.testing.assert_allclose(np.sort(TABLE), q / np.sqrt(np.mean(q ** 2)), rtol=1e-6)
    assert np.mean(TABLE.astype(np.float64) ** 2) == pytest.approx(1.0, rel=1e-6)
    # successors of a state hold unrelated values: not sorted runs
    assert abs(np.corrcoef(TABLE[:-1], TABLE[1:])[0, 1]) < 0.05


def _all_paths(L, k, T):
    """Every state path of length T on the trellis (2^L * 2^(k (T - 1)) of them), (P, T)."""
    S, K = 1 << L, 1 << k
    symbols = np.array(list(itertools.product(range(K), repeat=T - 1)), np.int64)        # (K^(T-1), T-1)
    paths = np.empty((S, len(symbols), T), np.int64)
    paths[:, :, 0] = np.arange(S)[:, None]
    for t in range(1, T):
        paths[:, :, t] = ((paths[:, :, t - 1] << k) | symbols[None, :, t - 1]) & (S - 1)
    return paths.reshape(-1, T)


@pytest.mark.parametrize("k,T", [(2, 6), (3, 5), (4, 4)])
def test_viterbi_reference_is_optimal_against_brute_force(k, T):
    """On a small trellis (L = 2k): the free pass finds the cheapest of all paths, the
    constrained pass the cheapest closed path through the given start bits."""
    L = 2 * k
    table = np.random.default_rng(k).standard_normal(1 << L).astype(np.float32)
    x = np.random.default_rng(10 + k).standard_normal((3, T)).astype(np.float32)
    g = (1 << (L - k)) - 1
    paths = _all_paths(L, k, T)
    free = viterbi_reference(x, table, k)
    for i in range(3):
        costs = _cost(x[i], table, paths)
        assert _cost(x[i], table, free[i]) == pytest.approx(costs.min(), rel=1e-6)
        start = (5 * i + 1) % (g + 1)
        closed = ((paths[:, 0] >> k) == start) & ((paths[:, -1] & g) == start)
        constrained = viterbi_reference(x[i:i + 1], table, k, np.array([start]))
        assert _cost(x[i], table, constrained[0]) == pytest.approx(costs[closed].min(), rel=1e-6)
        assert constrained[0, 0] >> k == start and constrained[0, -1] & g == start


@pytest.mark.skipif(not kernels.available(), reason="C++ kernels not built")
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("force_scalar", [False, True])
def test_kernel_equals_the_reference_state_for_state(k, force_scalar):
    x = np.random.default_rng(k).standard_normal((24, 256)).astype(np.float32) * 1.3
    want = tail_biting_reference(x, TABLE, k)
    got = kernels.trellis_encode(x, TABLE, k, threads=2, force_scalar=force_scalar)
    assert got.dtype == np.int32 and np.array_equal(got, want)
    assert _closed(got, STATE_BITS, k)


@pytest.mark.skipif(not kernels.available(), reason="C++ kernels not built")
def test_kernel_refuses_bad_arguments():
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError, match="2\\^L"):
        kernels.trellis_encode(x, TABLE[:100], 2)
    with pytest.raises(ValueError, match="k=5"):
        kernels.trellis_encode(x, TABLE, 5)
    with pytest.raises(TypeError, match="float32"):
        kernels.trellis_encode(x.astype(np.float64), TABLE, 2)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_gaussian_mse_beats_e8p_at_equal_bits(k):
    """The reason for the format: on unit Gaussian weights (what the incoherence transforms
    make of a layer) the trellis's MSE is well below E8P's at the same bits per weight."""
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32))
    trellis = encode("trellis", x, None, QuantConfig(bits=k, format="trellis")).values
    quant = StagedQuantizer(k, fit_scales(x, k), x.dtype)
    e8p = torch.cat([quant.round(x[:, i:i + 8]) for i in range(0, 256, 8)], dim=1)
    mse_t, mse_e = float((trellis - x).pow(2).mean()), float((e8p - x).pow(2).mean())
    assert mse_t < 0.85 * mse_e
    assert mse_t < {2: 0.080, 3: 0.022, 4: 0.0062}[k]   # the rate-distortion bound: 4^-k


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codes_round_trip_and_decode_to_the_encoded_values(bits):
    w = torch.from_numpy(np.random.default_rng(bits).standard_normal((32, 48)).astype(np.float32))
    enc = encode("trellis", w, None, QuantConfig(bits=bits, format="trellis"))
    fmt = get_format("trellis")
    assert enc.codes.shape == (32, 48 * bits // 8) and enc.scale.shape == (32, 1)
    states = codes_to_states(enc.codes, bits, 48)
    assert _closed(states.reshape(-1, TILE * TILE), STATE_BITS, bits)
    assert np.array_equal(states_to_codes(states, bits), enc.codes)
    decoded = fmt.decode({"codes": enc.codes, "scale": enc.scale}, bits, 48)
    assert np.array_equal(decoded, enc.values.numpy())
    tiles = np.arange(32 * 48).reshape(32, 48)
    assert np.array_equal(tiles_to_matrix(matrix_to_tiles(tiles)), tiles)
    assert matrix_to_tiles(tiles)[1, 2, 17] == tiles[16 + 1, 32 + 1]   # t = 16 r + c


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codes_packed_in_steps_are_the_whole_packing(monkeypatch, bits):
    """states_to_codes a few tile rows at a time (and from uint16 states, as the encoder keeps
    them) packs what one step packs."""
    import quipc_runtime.formats.trellis as trellis_fmt

    states = np.random.default_rng(bits).integers(0, 1 << STATE_BITS, (5, 3, TILE * TILE)).astype(np.int32)
    whole = states_to_codes(states, bits)
    monkeypatch.setattr(trellis_fmt, "STATES_STEP", 2 * 3 * TILE * TILE)     # 2 tile rows a step
    assert np.array_equal(states_to_codes(states.astype(np.uint16), bits), whole)


def test_shapes_the_format_refuses():
    fmt = get_format("trellis")
    with pytest.raises(ValueError, match="row width of 40 is not a multiple of 16"):
        fmt.check(2, 40)
    with pytest.raises(ValueError, match="row count of 24"):
        fmt.check(2, 32, 24)
    with pytest.raises(ValueError, match="stores 2/3/4 bits"):
        fmt.check(8, 32)


@pytest.mark.parametrize("seed", range(4))
def test_block_ldlq_beats_rounding_without_feedback(seed):
    w, h = random_problem(20 + seed, m=32, n=64)
    for bits in (2, 3, 4):
        cfg = QuantConfig(bits=bits, format="trellis")
        adaptive = encode("trellis", w, h, cfg).values
        nearest = encode("trellis", w, None, cfg).values
        assert proxy_loss(w, adaptive, h) < proxy_loss(w, nearest, h)


def test_each_tile_is_rounded_from_its_feedback_adjusted_target():
    """Replaying the stored values through BlockLDLQ (g = 16) gives each column block's
    feedback-adjusted input; the tail-biting Viterbi of that input is what was stored."""
    w, h = random_problem(3, m=32, n=48)
    w = w.float()
    enc = encode("trellis", w, h, QuantConfig(bits=2, format="trellis"))
    scale = torch.from_numpy(enc.scale.astype(np.float32))
    assert torch.equal(scale, fit_scale(w, 2))
    states = codes_to_states(enc.codes, 2, 48)
    seen = {}

    def replay(k, x):
        seen[k] = x.clone()
        return torch.from_numpy(TABLE[states[:, k]]).reshape(32, TILE) * scale

    assert torch.equal(block_ldlq(w, h, TILE, replay), enc.values)
    for k, x in seen.items():
        target = (x / scale).reshape(2, TILE * TILE).numpy()
        assert np.array_equal(tail_biting_reference(target, TABLE, 2), states[:, k])
    assert not torch.equal(seen[2], w[:, 32:48])     # the feedback did change the target


def test_a_shape_the_format_cannot_tile_is_refused_by_name(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="format 'trellis'.*multiple of 16"):
        compile_model(str(tiny_model[0]), tmp_path / "x", QuantConfig(bits=2, format="trellis"),
                      CalibConfig(text=str(tiny_model[1]), windows=4, length=16), progress=False)


def test_one_mad_code_of_the_quality_benchmark(monkeypatch):
    """benchmarks/trellis_code.py: QTIP's 1MAD value of a state from its formula, unit mean
    square over the 4096 states, and --code 1mad swapping the table of both the encoder and the
    reference decoder (what its records measure)."""
    import sys
    from pathlib import Path

    import quipc.passes.encoders.trellis as encoder
    import quipc_runtime.formats.trellis as fmt

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import trellis_code

    t = trellis_code.one_mad_table()
    assert t.shape == (4096,) and abs(float(np.mean(t.astype(np.float64) ** 2)) - 1) < 1e-6
    ratio = []
    for s in (0, 1, 4095):
        x = (34038481 * s + 76625530) % 2 ** 32
        ratio.append(t[s] / (sum((x >> (8 * i)) & 255 for i in range(4)) - 510))
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-6)
    monkeypatch.setattr(fmt, "code_table", fmt.code_table)
    monkeypatch.setattr(encoder, "code_table", encoder.code_table)
    trellis_code.use_code("1mad")
    assert fmt.code_table() is encoder.code_table() and np.array_equal(fmt.code_table(), t)
    assert "trellis_code" in sys.modules

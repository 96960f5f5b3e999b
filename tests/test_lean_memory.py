"""The memory-lean Hessian paths (issue 14) give the floats of the plain whole-matrix expressions."""
from __future__ import annotations

import pytest
import torch

from quipc.config import QuantConfig
from quipc.passes import hessian as hessian_mod
from quipc.passes import incoherence, ldlq, methods
from quipc.passes.block_ldlq import block_ldl_upper
from quipc.passes.hessian import regularize
from quipc.passes.incoherence import apply_rows, mu_of_eigenvectors, mu_rotated_eigenvectors, rotate_hessian
from quipc.passes.ldlq import ldl_upper
from quipc.passes.methods import LayerInput, quantize_linear
from quipc_runtime.transforms import Transform


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (the sign of zeros included)."""
    return a.shape == b.shape and torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


def _hessian(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    x *= 1 + 3 * torch.rand(n, generator=g, dtype=torch.float64)
    x[:, 3] = 0   # a dead input: exact zeros (and their signs) in the factors
    return regularize(x.t() @ x / (3 * n), 0.01)[0]


def _ldl_upper_dense(h):
    rev = torch.arange(h.shape[0] - 1, -1, -1)
    chol = torch.linalg.cholesky(h[rev][:, rev])
    diag = torch.diagonal(chol)
    upper_unit = (chol / diag[None, :])[rev][:, rev]
    return upper_unit - torch.eye(h.shape[0], dtype=h.dtype), (diag ** 2)[rev]


def _block_ldl_upper_dense(h, g):
    n = h.shape[0]
    u, d = _ldl_upper_dense(h)
    a = u + torch.eye(n, dtype=h.dtype)
    a_b = torch.empty_like(a)
    d_b = torch.empty(n // g, g, g, dtype=h.dtype)
    for j, idx in enumerate(torch.arange(n).reshape(-1, g)):
        b = a[idx][:, idx]
        a_b[:, idx] = torch.linalg.solve_triangular(b, a[:, idx], upper=True, left=False)
        d_b[j] = (b * d[idx][None, :]) @ b.t()
    return a_b - torch.eye(n, dtype=h.dtype), d_b


@pytest.mark.parametrize("n,kind,chunk", [(96, "hadamard", 7), (200, "kron", 64), (120, "hadamard", 512)])
def test_rotate_hessian_is_the_dense_expression(monkeypatch, n, kind, chunk):
    monkeypatch.setattr(incoherence, "CHUNK", chunk)
    h, t = _hessian(n), Transform.make(kind, n, 3)
    k = apply_rows(apply_rows(h, t).t(), t).t()
    ref = (k + k.t()) / 2
    got = rotate_hessian(h, t)
    assert _same(got, ref) and got.stride() == ref.stride()
    _, q = torch.linalg.eigh(h)
    assert mu_rotated_eigenvectors(q, t) == mu_of_eigenvectors(apply_rows(q.t(), t).t())


@pytest.mark.parametrize("n,step", [(97, 10), (96, 16), (40, 512)])
def test_ldl_in_place_is_the_dense_ldl(monkeypatch, n, step):
    monkeypatch.setattr(ldlq, "STEP", step)
    h = _hessian(n, seed=n)
    for got, ref in zip(ldl_upper(h), _ldl_upper_dense(h)):
        assert _same(got, ref)
    if n % 8 == 0:
        for g in (1, 4, 8):
            for got, ref in zip(block_ldl_upper(h, g), _block_ldl_upper_dense(h, g)):
                assert _same(got, ref)


def test_regularize_retries_on_the_undamped_diagonal():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 24, generator=g, dtype=torch.float64)
    h = x.t() @ x / 40
    h -= 0.5 * h.diagonal().mean() * torch.eye(24, dtype=torch.float64)   # indefinite
    got, info = regularize(h, 0.001)
    assert info["damp"] > 0.001
    ref = h.clone()
    ref.diagonal().add_(info["damp"] * float(h.diagonal().clamp_min(0).mean()))
    assert _same(got, ref)


@pytest.mark.parametrize("indefinite", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_large_hessian_is_tested_in_its_own_memory(monkeypatch, tmp_path, indefinite, transposed):
    """With a scratch folder the Cholesky test runs in H's memory (H on disk meanwhile): the same
    damping and the same floats as the test on a copy, retries included, and no file left."""
    monkeypatch.setattr(hessian_mod, "SCRATCH_TEST_BYTES", 0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 24, generator=g, dtype=torch.float64)
    h = x.t() @ x / 40
    if indefinite:
        h -= 0.5 * h.diagonal().mean() * torch.eye(24, dtype=torch.float64)
    h[:, 4] = h[4, :] = 0    # a dead input
    ref, ref_info = regularize(h, 0.001)
    spent = h.t().contiguous().t() if transposed else h.clone()
    got, info = regularize(spent, 0.001, in_place=True, scratch_dir=tmp_path)
    assert got.data_ptr() == spent.data_ptr() and _same(got, ref) and info == ref_info
    assert (info["damp"] > 0.001) == indefinite
    assert list(tmp_path.iterdir()) == []


def test_a_hessian_without_room_on_disk_is_tested_in_a_copy(monkeypatch, tmp_path):
    monkeypatch.setattr(hessian_mod, "SCRATCH_TEST_BYTES", 0)
    blocked = tmp_path / "file"
    blocked.write_text("")      # the scratch folder cannot be created under a file
    h = _hessian_raw(24)
    ref, ref_info = regularize(h, 0.01)
    got, info = regularize(h.clone(), 0.01, in_place=True, scratch_dir=blocked / "sub")
    assert _same(got, ref) and info == ref_info


@pytest.mark.parametrize("m,n,chunk", [(48, 96, 7), (24, 40, 512)])
def test_a_narrow_weight_is_read_in_float64_chunks(monkeypatch, m, n, chunk):
    """rotate_weight(dtype=float64, col_scale=d), round_error(dtype=float64), minmax_grid and
    mu_weight on a float16 weight: the floats of the float64 copy's whole-matrix expressions."""
    from quipc.passes.grid import fit_grid, minmax_grid

    monkeypatch.setattr(incoherence, "CHUNK", chunk)
    g = torch.Generator().manual_seed(n)
    w16 = torch.randn(m, n, generator=g).to(torch.float16)
    w = w16.double()
    d = 1 + torch.rand(n, generator=g, dtype=torch.float64)
    t_in, t_out = Transform.make("kron", n, 1), Transform.make("kron", m, 2)
    assert _same(incoherence.rotate_weight(w16, t_in, t_out, col_scale=d, dtype=torch.float64),
                 _dense_rotation(w * d[None, :], t_in, t_out))
    grid = fit_grid(w, 2, "minmax")
    got = minmax_grid(w16, 2)
    assert _same(got.scale, grid.scale) and _same(got.zero, grid.zero)
    assert _same(got.round_error(w16, step=chunk, dtype=torch.float64), grid.round(w) - w)
    assert incoherence.mu_weight(w16) == pytest.approx(float(w.abs().max()) * (m * n) ** 0.5 / float(w.norm()),
                                                       rel=1e-12)


def test_mu_diagnostics_skipped_above_the_width_limit(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 64, generator=g)
    w = torch.randn(16, 64, generator=g)
    cfg = QuantConfig(method="quip", bits=2, format="e8p")
    full = quantize_linear(LayerInput("l", w, None, (x.t() @ x).double() / 200), cfg)
    monkeypatch.setattr(methods, "MU_EIGH_MAX_N", 32)
    lean = quantize_linear(LayerInput("l", w, None, (x.t() @ x).double() / 200), cfg)
    assert (full.codes == lean.codes).all() and (full.scale == lean.scale).all()
    assert (full.in_scale == lean.in_scale).all()
    assert full.info["mu_h"] > 0 and "mu_h_skipped" not in full.info
    assert lean.info["mu_h"] is None and lean.info["mu_h_after"] is None and "64 x 64" in lean.info["mu_h_skipped"]


def _group_setup(g: torch.Generator):
    """A 32-wide Hessian, an empty group cache and a 2-bit grid QuIP config."""
    x = torch.randn(100, 32, generator=g)
    return (x.t() @ x).double() / 100, {}, QuantConfig(method="quip", bits=2, format="grid")


def test_group_keeps_only_the_rotated_hessian():
    g = torch.Generator().manual_seed(3)
    h, cache, cfg = _group_setup(g)
    for name in ("q", "k"):
        quantize_linear(LayerInput(name, torch.randn(8, 32, generator=g), None, h, cache), cfg)
        assert "h" not in cache and cache["h_rot"].shape == (32, 32)


def test_last_reader_frees_the_group():
    g = torch.Generator().manual_seed(4)
    h, cache, cfg = _group_setup(g)
    ws = [torch.randn(8, 32, generator=g) for _ in range(2)]
    other: dict = {}
    quantize_linear(LayerInput("q", ws[0], None, h, other), cfg)
    kept = quantize_linear(LayerInput("k", ws[1], None, h, other), cfg)
    assert "h_rot" in other
    quantize_linear(LayerInput("q", ws[0], None, h, cache), cfg)
    last = quantize_linear(LayerInput("k", ws[1], None, h, cache, last_reader=True), cfg)
    assert "h_rot" not in cache and "h" not in cache
    assert (last.codes == kept.codes).all() and last.info == kept.info


def test_staged_quantizer_index_table_matches_the_dict():
    from quipc.passes.encoders.e8p import StagedQuantizer, fit_scales

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    for bits in (2, 3, 4):
        a = StagedQuantizer(bits, fit_scales(w, bits), w.dtype)
        b = StagedQuantizer(bits, fit_scales(w, bits), w.dtype, groups=8)
        for k in range(8):
            assert torch.equal(a.round(w[:, 8 * k:8 * k + 8], keep=k), b.round(w[:, 8 * k:8 * k + 8], keep=k))
        assert (a.codes(bits, 8) == b.codes(bits, 8)).all()


def _dense_rotation(w, t_in, t_out, inverse=False):
    f = incoherence.apply_rows_transposed if inverse else apply_rows
    return f(f(w, t_in).t(), t_out).t()


@pytest.mark.parametrize("m,n,chunk", [(48, 96, 7), (200, 64, 64), (24, 40, 512)])
def test_weight_rotations_are_the_dense_expressions(monkeypatch, m, n, chunk):
    monkeypatch.setattr(incoherence, "CHUNK", chunk)
    g = torch.Generator().manual_seed(m)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    t_in, t_out = Transform.make("kron", n, 1), Transform.make("kron", m, 2)
    for fn, inverse in ((incoherence.rotate_weight, False), (incoherence.unrotate_weight, True)):
        ref = _dense_rotation(w, t_in, t_out, inverse)
        got = fn(w, t_in, t_out)
        assert _same(got, ref) and got.stride() == ref.stride()


def test_in_place_hessian_steps_are_the_copying_ones(monkeypatch):
    monkeypatch.setattr(incoherence, "CHUNK", 16)
    monkeypatch.setattr(ldlq, "STEP", 10)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 64, generator=g, dtype=torch.float64)
    raw = x.t() @ x / 300
    ref, ref_info = regularize(raw, 0.01)
    spent = raw.clone()
    got, info = regularize(spent, 0.01, in_place=True)
    assert got.data_ptr() == spent.data_ptr() and _same(got, ref) and info == ref_info
    t = Transform.make("hadamard", 64, 3)
    rotated = rotate_hessian(ref, t)
    in_place = rotate_hessian(got, t, in_place=True)
    assert in_place.data_ptr() == spent.data_ptr() and _same(in_place, rotated)
    assert in_place.stride() == rotated.stride()
    for h in (rotated, rotated.t().contiguous(), rotated.contiguous()):   # H^T or H contiguous
        for got_f, ref_f in zip(ldlq.ldl_unit_upper(h.clone(), overwrite=True), ldlq.ldl_unit_upper(h)):
            assert _same(got_f, ref_f)
    with pytest.raises(ValueError, match="contiguous"):
        ldlq.ldl_unit_upper(rotated.clone()[::2, ::2], overwrite=True)


@pytest.mark.parametrize("g", [8, 16])
def test_block_ldlq_consuming_rounds_alike_and_reports_the_loss(g):
    from quipc.passes.block_ldlq import block_ldlq, block_ldlq_consuming
    from quipc.passes.encoders.e8p import StagedQuantizer, fit_scales

    h = _hessian(64, seed=g)
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(g))
    quant = StagedQuantizer(2, fit_scales(w, 2), w.dtype)

    def rnd(k, x):
        return quant.round(x[:, :8]).repeat(1, g // 8) if g > 8 else quant.round(x)

    ref = block_ldlq(w, h, g, rnd)
    spent = h.clone()
    got, loss = block_ldlq_consuming(w, spent, g, rnd)
    assert _same(got, ref) and not torch.equal(spent, h)
    assert loss == pytest.approx(ldlq.proxy_loss(w.double(), ref.double(), h), rel=1e-5)


def _layer_group(fmt, rescale, hessian, spend, scratch_dir=None, weight_dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    cfg = QuantConfig(method="quip", bits=2, format=fmt, rescale=rescale)
    cache, out = {}, []
    for i in range(3):   # three linears reading one input (q, k, v), the last frees the group
        w = torch.randn(32, 64, generator=g).to(torch.float16).to(weight_dtype)
        out.append(quantize_linear(LayerInput(f"blk.{i}", w, None, hessian, cache, last_reader=i == 2,
                                              spend_hessian=spend, scratch_dir=scratch_dir), cfg))
    assert cache.keys() <= {"leader", "t_in", "hinfo", "mu_h", "mu_h_after"}
    return out


@pytest.mark.parametrize("fmt", ["e8p", "trellis", "grid"])
@pytest.mark.parametrize("rescale", [False, True])
def test_a_spent_hessian_gives_the_same_layers(fmt, rescale, monkeypatch, tmp_path):
    """encode_block's path (the caller's H damped, tested, rotated and factored in its own
    memory, losses from the rotated H, a float16 weight read as it is) stores what the
    copying path stores for the float32 weight, with its proxy losses."""
    monkeypatch.setattr(hessian_mod, "SCRATCH_TEST_BYTES", 0)    # every H tested in its own memory
    h = _hessian_raw(64)
    plain = _layer_group(fmt, rescale, h.clone(), spend=False)
    spent_h = h.clone()
    spent = _layer_group(fmt, rescale, spent_h, spend=True, scratch_dir=str(tmp_path), weight_dtype=torch.float16)
    assert not torch.equal(spent_h, h)       # spent in place
    assert list(tmp_path.iterdir()) == []    # the test's copy of H on disk is gone
    for a, b in zip(plain, spent):
        assert (a.codes == b.codes).all() and (a.scale == b.scale).all() and (a.in_scale == b.in_scale).all()
        for key in ("proxy_loss", "proxy_loss_rtn"):
            assert b.info[key] == pytest.approx(a.info[key], rel=1e-4), key
        assert {k: v for k, v in a.info.items() if not k.startswith("proxy")} == \
               {k: v for k, v in b.info.items() if not k.startswith("proxy")}


def _hessian_raw(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3 * n, n, generator=g, dtype=torch.float32)
    x *= 1 + 3 * torch.rand(n, generator=g)
    x[:, 5] = 0    # a dead input
    return (x.t() @ x).double() / (3 * n)


def test_a_spent_zero_hessian_reports_its_fallback():
    layers = _layer_group("e8p", False, torch.zeros(64, 64, dtype=torch.float64), spend=True)
    assert all("fallback" in l.info["hessian"] and "proxy_loss_hessian" in l.info for l in layers)


@pytest.mark.parametrize("rows,n", [(7, 1), (5, 3), (40, 65), (9, 257), (0, 4), (3, 0)])
def test_gram_widened_in_place_is_the_float32_product_in_float64(rows, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(rows, n + 2, generator=g)[:, 1:n + 1]       # a strided view, as a hook may get
    x[:, :1] = -0.0
    assert _same(hessian_mod.gram_float64(x), (x.t() @ x).double())

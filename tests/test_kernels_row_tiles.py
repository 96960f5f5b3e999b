"""Row tiles (cpp/row_tiles*.{h,cpp}): the GEMVs on int8 activations read their codes regrouped 16
rows at a time by AVX-512 VNNI kernels. Every layout that has such a GEMV (4-bit grid codes,
e8p stages as 4-bit planes, trellis int8 rows) against the same plan without tiles, through the
VNNI kernels (where the CPU has them) and the portable reference: the same integer block sums,
so the outputs agree to float rounding."""
import sys
from pathlib import Path

import numpy as np
import pytest

try:  # the installed package (with its built extension), else the source tree
    import quipc_runtime  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from quipc_runtime import kernels as K  # noqa: E402
from e8p_layers import random_e8p_layer  # noqa: E402
from test_kernels import make_layer, rel_err  # noqa: E402
from trellis_layers import random_trellis_layer  # noqa: E402

pytestmark = pytest.mark.skipif(not K.available(), reason="quipc kernels extension not built")
VNNI = K.available() and K.cpu_has_avx512_vnni()


def layer_of(kind: str, m: int, n: int, seed: int):
    if kind == "grid4":
        return make_layer(m, n, 4, seed=seed)
    if kind.startswith("e8p"):
        return random_e8p_layer(m, n, int(kind[3:]), seed=seed)
    return random_trellis_layer(m, n, 2, seed=seed)


# SmolLM2's shapes; rows past the last full tile (40, 24, 72); a partial last block (n = 200, 80)
CASES = [("grid4", 576, 576), ("grid4", 1536, 576), ("grid4", 576, 1536), ("grid4", 40, 200), ("grid4", 13, 72),
         ("e8p2", 192, 576), ("e8p3", 72, 576), ("e8p4", 24, 64), ("trellis", 576, 576), ("trellis", 48, 80)]


@pytest.mark.parametrize("force_scalar", [False, True])
@pytest.mark.parametrize("kind,m,n", CASES)
def test_tiles_compute_what_the_rows_compute(kind, m, n, force_scalar):
    layer = layer_of(kind, m, n, seed=m + n)
    tiled = K.prepare(layer, int8_activations=True, trellis_as_int8=True, row_tiles="on")
    rows = K.prepare(layer, int8_activations=True, trellis_as_int8=True, row_tiles="off")
    assert tiled.gemv_int8 and tiled.gemv_on_row_tiles and not rows.gemv_on_row_tiles
    rng = np.random.default_rng(m * n)
    for batch in (1, 2, 3, 4):
        x = (rng.standard_normal((batch, n)) * 3).astype(np.float32)
        z, zsum = tiled.transform_in(x)
        want = rows.matmul(z, zsum, threads=1, force_scalar=True)
        t1 = tiled.matmul(z, zsum, threads=1, force_scalar=force_scalar)
        t2 = tiled.matmul(z, zsum, threads=2, force_scalar=force_scalar)
        assert rel_err(t1, want) < 2e-6, (batch, rel_err(t1, want))
        np.testing.assert_array_equal(t1, t2)   # a row's sums do not depend on the split
    x = rng.standard_normal((7, n)).astype(np.float32)   # prefill: the GEMM, untouched by the tiles
    np.testing.assert_array_equal(K.quip_linear(tiled, x), K.quip_linear(rows, x))


@pytest.mark.skipif(not VNNI, reason="this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("kind", ["grid4", "e8p2", "trellis"])
def test_vnni_and_portable_tiles_agree(kind):
    layer = layer_of(kind, 96, 160, seed=1)
    plan = K.prepare(layer, int8_activations=True, trellis_as_int8=True, row_tiles="on")
    z = (np.random.default_rng(2).standard_normal((4, 160)) * 40).astype(np.float32)
    zsum = z.sum(axis=1)
    for batch in (1, 4):
        fast = plan.matmul(z[:batch], zsum[:batch], force_scalar=False)
        slow = plan.matmul(z[:batch], zsum[:batch], force_scalar=True)
        assert rel_err(fast, slow) < 1e-6


def test_auto_takes_tiles_where_the_cpu_has_vnni_and_only_for_int8_gemvs():
    layer = make_layer(64, 96, 4, seed=3)
    assert K.prepare(layer, int8_activations=True).gemv_on_row_tiles == VNNI
    assert not K.prepare(layer, int8_activations=False, row_tiles="on").gemv_on_row_tiles   # fp32 GEMV
    assert not K.prepare(make_layer(64, 96, 2), int8_activations=True, row_tiles="on").gemv_on_row_tiles
    trellis = random_trellis_layer(48, 80, 2, seed=4)
    assert not K.prepare(trellis, int8_activations=True, trellis_as_int8=False, row_tiles="on").gemv_on_row_tiles
    with pytest.raises(ValueError, match="row_tiles"):
        K.prepare(layer, int8_activations=True, row_tiles="yes")

"""C++ kernels for the code format "e8p" (cpp/e8p_*.cpp) against the reference decoder
(`layer.rotated_weight()`, runtime/quipc_runtime/formats/e8p.py) and QuipLinearRef."""
import sys
from pathlib import Path

import numpy as np
import pytest

try:  # the installed package (with its built extension), else the source tree
    import quipc_runtime  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from quipc_runtime import kernels as K  # noqa: E402
from quipc_runtime.formats import UnsupportedFormatError  # noqa: E402
from quipc_runtime.formats.e8p import STAGES  # noqa: E402
from quipc_runtime.formats.lattice import e8_one_bit_table, e8p_table  # noqa: E402
from e8p_layers import INDEX_RANGE, random_e8p_layer  # noqa: E402

torch = pytest.importorskip("torch")
from quipc_runtime.modules import QuipLinearRef  # noqa: E402

pytestmark = pytest.mark.skipif(not K.available(), reason="quipc kernels extension not built")

TOL = 2e-5  # max |y - ref| / max |ref|


def rel_err(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30)


def reference(layer, x):
    return QuipLinearRef(layer)(torch.from_numpy(x)).numpy()


def test_codebooks_equal_the_python_tables():
    e8p, one_bit = K._ext.e8p_codebooks()
    np.testing.assert_array_equal(e8p, e8p_table())
    np.testing.assert_array_equal(one_bit, e8_one_bit_table())


def _plan(layer, kernel: str):
    """The layer's CPU plan on the e8p kernels, or with its GEMV on the 4-bit grid kernel (one
    pass per stage; at 3 bits only on int8 activations, tests/test_kernels_int8.py)."""
    if kernel == "grid4" and layer.bits == 3:
        pytest.skip("3-bit e8p layers take the grid4 GEMV on int8 activations only")
    plan = K.prepare(layer, e8p_as_grid4=kernel == "grid4")
    assert plan.gemv_as_grid4 == (kernel == "grid4")   # batch <= 4; the GEMM stays e8p's
    return plan


KERNELS = ["e8p", "grid4"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_index_decodes_as_the_reference(bits, kernel):
    """64 rows x 1024 groups: each stage's 65536 (or 256) indices all occur, each in a
    different place. A wrong decode of any one of them moves t by far more than TOL."""
    m, n = 64, 8192
    rng = np.random.default_rng(bits)
    indices = []
    for k in STAGES[bits]:
        idx = rng.permutation(np.resize(np.arange(INDEX_RANGE[k]), m * n // 8))
        indices.append(idx.reshape(m, n // 8))
    layer = random_e8p_layer(m, n, bits, seed=bits, indices=indices)
    w = layer.rotated_weight().astype(np.float64)
    plan = _plan(layer, kernel)
    z = np.random.default_rng(5).standard_normal((33, n)).astype(np.float32)
    zsum = z.sum(1).astype(np.float32)
    for force_scalar in (False, True):
        for batch in (1, 4, 6, 33):  # GEMV (row-block and batched kernels, 2 passes at 2 bits), GEMM
            t = plan.matmul(z[:batch], zsum[:batch], threads=2, force_scalar=force_scalar)
            ref = z[:batch].astype(np.float64) @ w.T
            per_row = np.abs(t - ref).max(0) / np.abs(ref).max()
            assert per_row.max() < TOL, (force_scalar, batch, per_row.argmax(), per_row.max())


# SmolLM2 shapes, a 4096-wide row, odd row counts (row-pair tails) and widths whose group
# count is not a multiple of 8 (72: one block + 1 group, 40: 5 groups, 8: 1 group).
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (640, 192), (96, 4096), (37, 72),
          (7, 40), (1, 8), (3, 24)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m,n", SHAPES)
def test_quip_linear_matches_reference(bits, m, n, kernel):
    layer = random_e8p_layer(m, n, bits, seed=m + n + bits)
    plan = _plan(layer, kernel)
    x = np.random.default_rng(1).standard_normal((33, n)).astype(np.float32)
    ref = reference(layer, x)
    # GEMV kernels (<= 4 vectors per pass; in passes up to e8p_gemv_max_batch: 8 at 2 bits,
    # 4 at 3/4 bits), then the GEMM (6 at 3/4 bits; 9, 17, 33 with tail rows)
    for batch in (1, 2, 3, 4, 6, 9, 17, 33):
        y1 = K.quip_linear(plan, x[:batch], threads=1)
        y2 = K.quip_linear(plan, x[:batch], threads=2)
        assert rel_err(y1, ref[:batch]) < TOL, (batch, rel_err(y1, ref[:batch]))
        np.testing.assert_array_equal(y1, y2)  # same arithmetic whatever the thread split


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_scalar_fallback_matches(bits, monkeypatch, kernel):
    layer = random_e8p_layer(192, 576, bits, seed=7)
    plan = _plan(layer, kernel)
    x = np.random.default_rng(2).standard_normal((33, 576)).astype(np.float32)
    ref = reference(layer, x)
    for batch in (1, 2, 4, 7, 33):
        for threads in (1, 2):
            y = K.quip_linear(plan, x[:batch], threads=threads, force_scalar=True)
            assert rel_err(y, ref[:batch]) < TOL
    monkeypatch.setenv("QUIPC_FORCE_SCALAR", "1")
    assert K.kernel_name() == "scalar"
    assert rel_err(K.quip_linear(plan, x, threads=2), ref) < TOL


def test_large_layer_gemv():
    layer = random_e8p_layer(4096, 4096, 2, seed=3, kout="identity")
    x = np.random.default_rng(3).standard_normal((1, 4096)).astype(np.float32)
    y = K.quip_linear(K.prepare(layer), x, threads=2)
    assert rel_err(y, reference(layer, x)) < TOL


@pytest.mark.parametrize("kin,kout", [("kron", "kron"), ("identity", "hadamard")])
def test_transform_kinds(kin, kout):
    layer = random_e8p_layer(96, 80, 3, seed=3, kin=kin, kout=kout, bias=False)
    x = np.random.default_rng(3).standard_normal((5, 80)).astype(np.float32)
    assert rel_err(K.quip_linear(K.prepare(layer), x, threads=2), reference(layer, x)) < TOL


def test_torch_module_matches_reference():
    layer = random_e8p_layer(192, 576, 4, seed=8)
    ref, mod = QuipLinearRef(layer), K.KernelQuipLinear(layer, "cpu")
    assert "format=e8p" in repr(mod)
    for shape in ((1, 576), (2, 3, 576), (20, 576)):
        x = torch.randn(*shape)
        assert rel_err(mod(x), ref(x)) < TOL


# --- malformed buffers and formats the kernels do not run raise --------------------------
def test_bad_layer_buffers():
    layer = random_e8p_layer(64, 32, 3, seed=11)
    args = K._layer_args(layer)
    assert args["format"] == "e8p" and args["zero"] is None and args["scale"].shape == (64, 2)
    K._ext.Plan(**args)  # the good arguments build
    cases = [
        ("codes", args["codes"][:, :-1].copy(), ValueError),
        ("codes", args["codes"][:-1].copy(), ValueError),
        ("codes", args["codes"].view(np.int8), TypeError),
        ("scale", args["scale"][:, :1].copy(), ValueError),      # one stage, 3 bits needs two
        ("scale", args["scale"][:, 0].copy(), ValueError),       # (m,) as for grid
        ("scale", args["scale"].T.copy(), ValueError),
        ("scale", args["scale"].astype(np.float16), TypeError),
        ("scale", np.asfortranarray(np.ones((64, 2), np.float32)), ValueError),
        ("zero", np.zeros(64, np.float32), ValueError),           # e8p has no zero points
        ("bits", 2, ValueError),                                   # codes sized for 3 bits
        ("format", "e9p", ValueError),
    ]
    for key, value, exc in cases:
        with pytest.raises(exc):
            K._ext.Plan(**{**args, key: value})
    with pytest.raises(ValueError, match="not a multiple of 8"):
        K._ext.Plan(**{**args, "n": 36, "codes": np.zeros((64, 15), np.uint8),
                       "in_scale": np.ones(36, np.float32), "in_factors": []})
    layer.scale = layer.scale[:, :1]
    with pytest.raises(ValueError, match="scale"):
        K.prepare(layer)


def test_grid_plan_refuses_e8p_style_buffers():
    layer = random_e8p_layer(64, 32, 2, seed=12)
    args = {**K._layer_args(layer), "format": "grid"}
    with pytest.raises((TypeError, ValueError)):  # scale (m, 1) and zero None are not a grid
        K._ext.Plan(**args)


def test_unknown_format_is_refused_by_name():
    layer = random_e8p_layer(64, 32, 2, seed=12)
    layer.format = "made-up"  # a format these kernels do not run
    with pytest.raises(UnsupportedFormatError, match="C\\+\\+ kernel backend runs the code format.*'made-up'"):
        K.prepare(layer)
    with pytest.raises(UnsupportedFormatError, match="'made-up'"):
        K.KernelQuipLinear(layer, "cpu")
    with pytest.raises(UnsupportedFormatError, match="CUDA kernel backend runs the code format.*'made-up'"):
        K.KernelQuipLinear(layer, "cuda")   # refused before any GPU is looked for
    with pytest.raises(ValueError, match="code formats grid, e8p, trellis, trellis256; not 'made-up'"):
        K._ext.Plan(**{**K._layer_args(random_e8p_layer(64, 32, 2, seed=12)), "format": "made-up"})


# --- model level: a tiny e8p artifact through quipc_runtime.load --------------------------
@pytest.fixture(scope="module")
def e8p_artifact(tiny_model, tmp_path_factory):
    from quipc.compile import CalibConfig, compile_model
    from quipc.config import QuantConfig

    model, text = tiny_model
    out = tmp_path_factory.mktemp("art_e8p") / "w3"
    compile_model(str(model), out, QuantConfig(bits=3, seed=1, format="e8p"),
                  CalibConfig(text=str(text), windows=8, length=32), progress=False)
    return out


def test_model_level_matches_reference(e8p_artifact):
    import quipc_runtime
    ref = quipc_runtime.load(e8p_artifact, backend="reference")
    fast = quipc_runtime.load(e8p_artifact, backend="kernels")
    formats = {m.format for m in fast.modules() if isinstance(m, K.KernelQuipLinear)}
    assert formats == {"e8p"}
    ids = torch.randint(0, ref.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = ref(ids).logits, fast(ids).logits
        assert rel_err(b.numpy(), a.numpy()) < 1e-4
        ga = ref.generate(ids[:, :16], max_new_tokens=32, min_new_tokens=32, do_sample=False)
        gb = fast.generate(ids[:, :16], max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert torch.equal(ga, gb)


def test_gemm_micro_kernels_agree(tmp_path):
    """The AVX-512F GEMM micro-kernel (taken where the CPU has it) and the AVX2 one
    (QUIPC_NO_AVX512=1; a fresh process each, as the choice is made once) agree to float
    rounding on a prefill-sized batch (on a CPU without AVX-512F both runs take the AVX2 one)."""
    from avx512_runs import with_and_without_avx512

    code = (f"import sys, numpy as np; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from e8p_layers import random_e8p_layer\n"
            "from quipc_runtime import kernels as K\n"
            "layer = random_e8p_layer(96, 576, 2, seed=3)\n"
            "x = np.random.default_rng(0).standard_normal((37, 576)).astype(np.float32)\n"
            "np.save(sys.argv[1], K.quip_linear(K.prepare(layer), x, threads=2))\n")
    outs = with_and_without_avx512(code, tmp_path)
    ref = reference(random_e8p_layer(96, 576, 2, seed=3),
                    np.random.default_rng(0).standard_normal((37, 576)).astype(np.float32))
    for y in outs:
        assert rel_err(y, ref) < TOL
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-5 * np.abs(outs[1]).max())

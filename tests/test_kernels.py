"""CPU kernels (quipc_runtime._kernels) against the pure-torch reference and dense matrices."""
import sys
from pathlib import Path

import numpy as np
import pytest

try:  # the installed package (with its built extension), else the source tree
    import quipc_runtime  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from quipc_runtime import kernels as K  # noqa: E402
from quipc_runtime.layer import QuantizedLinear  # noqa: E402
from quipc_runtime.packing import pack  # noqa: E402
from quipc_runtime.transforms import Transform  # noqa: E402

torch = pytest.importorskip("torch")
from quipc_runtime.modules import QuipLinearRef  # noqa: E402

pytestmark = pytest.mark.skipif(not K.available(), reason="quipc kernels extension not built")

TOL = 2e-5  # max |y - ref| / max |ref|


def make_layer(m, n, bits, seed=0, kin="hadamard", kout="hadamard", bias=True, in_scale=True):
    rng = np.random.default_rng(seed)
    t_in = Transform.make(kin, n, seed + 1)
    t_in.signs = None  # stored form: the input signs live in in_scale
    t_out = Transform.make(kout, m, seed + 2)
    return QuantizedLinear(
        "t", m, n, bits, pack(rng.integers(0, 1 << bits, (m, n)), bits),
        (rng.random(m) * 0.02 + 0.001).astype(np.float16),
        (rng.standard_normal(m) * 0.02).astype(np.float16), t_in, t_out,
        ((rng.random(n) + 0.5) * rng.choice([-1, 1], n)).astype(np.float16) if in_scale else None,
        rng.standard_normal(m).astype(np.float32) if bias else None)


def rel_err(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30)


def reference(layer, x):
    return QuipLinearRef(layer)(torch.from_numpy(x)).numpy()


# (out m, in n): the SmolLM2 shapes, odd / non-power-of-two sizes, a kron-only size
# (11008 / 16 = 688 has no known Hadamard split), n not a multiple of 8, and tiny / odd
# shapes for the kernels' row-pair and group tails.
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (640, 192), (688, 96), (37, 13),
          (7, 40), (1, 8), (3, 24)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m,n", SHAPES)
def test_quip_linear_matches_reference(bits, m, n):
    layer = make_layer(m, n, bits, seed=m + n + bits)
    plan = K.prepare(layer)
    rng = np.random.default_rng(1)
    for batch in (1, 3, 9):  # GEMV (<= 4) and tiled GEMM paths, GEMM tail rows
        x = rng.standard_normal((batch, n)).astype(np.float32)
        ref = reference(layer, x)
        y1 = K.quip_linear(plan, x, threads=1)
        y2 = K.quip_linear(plan, x, threads=2)
        assert rel_err(y1, ref) < TOL, (batch, rel_err(y1, ref))
        # Each output element is computed in the same order whatever the thread split.
        np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_scalar_fallback_matches(bits, monkeypatch):
    layer = make_layer(192, 576, bits, seed=7)
    plan = K.prepare(layer)
    x = np.random.default_rng(2).standard_normal((7, 576)).astype(np.float32)
    ref = reference(layer, x)
    for batch in (1, 2, 7):
        y = K.quip_linear(plan, x[:batch], threads=2, force_scalar=True)
        assert rel_err(y, ref[:batch]) < TOL
    monkeypatch.setenv("QUIPC_FORCE_SCALAR", "1")
    assert K.kernel_name() == "scalar"
    assert rel_err(K.quip_linear(plan, x, threads=2), ref) < TOL


def test_kernel_selection():
    name = K.kernel_name()
    assert name == ("avx2" if K._ext.cpu_has_avx2_fma() else "scalar")
    assert K.kernel_name(force_scalar=True) == "scalar"


@pytest.mark.parametrize("kin,kout", [("kron", "kron"), ("identity", "hadamard"), ("hadamard", "identity")])
def test_transform_kinds(kin, kout):
    layer = make_layer(96, 80, 3, seed=3, kin=kin, kout=kout)
    x = np.random.default_rng(3).standard_normal((5, 80)).astype(np.float32)
    assert rel_err(K.quip_linear(K.prepare(layer), x, threads=2), reference(layer, x)) < TOL


def test_large_kron_split_over_threads():
    # 5504 = 64 x 86 (no Hadamard order): at batch 1 its dense factors split over threads.
    layer = make_layer(5504, 64, 3, seed=13)
    assert layer.t_out.kind == "kron"
    plan = K.prepare(layer)
    x = np.random.default_rng(13).standard_normal((1, 64)).astype(np.float32)
    y1, y2 = K.quip_linear(plan, x, threads=1), K.quip_linear(plan, x, threads=2)
    np.testing.assert_array_equal(y1, y2)
    assert rel_err(y2, reference(layer, x)) < TOL


def test_no_bias_no_in_scale():
    layer = make_layer(64, 48, 2, seed=4, bias=False, in_scale=False)
    x = np.random.default_rng(4).standard_normal((2, 48)).astype(np.float32)
    assert rel_err(K.quip_linear(K.prepare(layer), x), reference(layer, x)) < TOL


@pytest.mark.parametrize("kind,n", [("hadamard", 4096), ("hadamard", 576), ("hadamard", 1536),
                                    ("hadamard", 192), ("hadamard", 640), ("hadamard", 12),
                                    ("kron", 576), ("kron", 1536), ("kron", 2752), ("kron", 13)])
@pytest.mark.parametrize("force_scalar", [False, True])
def test_transforms_vs_dense(kind, n, force_scalar):
    t = Transform.make(kind, n, 5)
    dense = t.dense() / t.sign_vector()[None, :]  # Kronecker part only
    x = np.random.default_rng(5).standard_normal((3, n)).astype(np.float32)
    y = K.kron_apply(x, t, force_scalar=force_scalar)
    assert rel_err(y, x.astype(np.float64) @ dense.T) < TOL
    yt = K.kron_apply(x, t, transpose=True, force_scalar=force_scalar)
    assert rel_err(yt, x.astype(np.float64) @ dense) < TOL


def test_transforms_agree_with_and_without_avx512(tmp_path):
    """The dense factors' AVX-512F GEMM (taken where the CPU has it) and the AVX2 one
    (QUIPC_NO_AVX512=1; a fresh process each, as the choice is made once) run the same FMA chain
    per element: equal bit for bit, on factors 16 columns wide, wider, and ragged (on a CPU
    without AVX-512F both runs take the AVX2 one)."""
    from avx512_runs import with_and_without_avx512

    cases = [("hadamard", 576), ("hadamard", 1536), ("hadamard", 640), ("kron", 576), ("kron", 2752),
             ("kron", 13), ("kron", 100)]
    code = ("import sys, numpy as np\n"
            "from quipc_runtime import kernels as K\n"
            "from quipc_runtime.transforms import Transform\n"
            f"cases = {cases!r}\n"
            "out = {}\n"
            "for kind, n in cases:\n"
            "    t = Transform.make(kind, n, 5)\n"
            "    x = np.random.default_rng(n).standard_normal((3, n)).astype(np.float32)\n"
            "    out[f'{kind}{n}'] = K.kron_apply(x, t)\n"
            "    out[f'{kind}{n}T'] = K.kron_apply(x, t, transpose=True)\n"
            "np.savez(sys.argv[1], **out)\n")
    outs = with_and_without_avx512(code, tmp_path, ".npz")
    assert sorted(outs[0].files) == sorted(outs[1].files) and len(outs[0].files) == 2 * len(cases)
    for name in outs[0].files:
        np.testing.assert_array_equal(outs[0][name], outs[1][name], err_msg=name)


def test_stages_vs_numpy():
    layer = make_layer(100, 60, 4, seed=6)
    plan = K.prepare(layer)
    x = np.random.default_rng(6).standard_normal((6, 60)).astype(np.float32)
    k_in = layer.t_in.dense()
    k_out = layer.t_out.dense() / layer.t_out.sign_vector()[None, :]
    z_ref = (x * layer.in_scale_f32()) @ k_in.T
    z, zsum = plan.transform_in(x, threads=2)
    assert z.shape == (6, 64) and np.all(z[:, 60:] == 0)
    assert rel_err(z[:, :60], z_ref) < TOL
    np.testing.assert_allclose(zsum, z[:, :60].sum(1), rtol=1e-5, atol=1e-5)
    t = plan.matmul(z, zsum, threads=2)
    assert rel_err(t, z[:, :60].astype(np.float64) @ layer.rotated_weight().T) < TOL
    y = plan.transform_out(t, threads=2)
    y_ref = layer.t_out.sign_vector() * (t.astype(np.float64) @ k_out) + layer.bias
    assert rel_err(y, y_ref) < TOL


def test_torch_module_matches_reference():
    layer = make_layer(192, 576, 2, seed=8)
    ref, mod = QuipLinearRef(layer), K.KernelQuipLinear(layer, "cpu")
    x = torch.randn(2, 5, 576)
    assert rel_err(mod(x), ref(x)) < TOL
    assert mod(x.double()).dtype == torch.float64
    xb = x.to(torch.bfloat16)
    assert mod(xb).dtype == torch.bfloat16
    assert mod(torch.randn(0, 576)).shape == (0, 192)
    x_t = torch.randn(576, 4).t()  # non-contiguous input is fine at the torch level
    assert rel_err(mod(x_t), ref(x_t.contiguous())) < TOL
    mod.threads = 1
    assert rel_err(mod(x), ref(x)) < TOL


def test_torch_module_fast_path_is_the_checked_path():
    """Decode's fast path (float32, contiguous, CPU) gives the checked path's bytes, and an
    input it does not take (float64, non-contiguous, requiring grad) still runs the checked one."""
    layer = make_layer(192, 576, 2, seed=8)
    fast, checked = K.KernelQuipLinear(layer, "cpu"), K.KernelQuipLinear(layer, "cpu")
    checked._fast = None
    for x in (torch.randn(1, 1, 576), torch.randn(2, 5, 576), torch.randn(3, 576)):
        assert torch.equal(fast(x), checked(x)) and fast(x).shape == (*x.shape[:-1], 192)
    x = torch.randn(2, 576)
    assert torch.equal(fast(x.t().contiguous().t()), checked(x))
    assert torch.equal(fast(x.double()), checked(x.double()))
    assert torch.equal(fast(x.requires_grad_()), checked(x.detach()))


def test_out_argument():
    layer = make_layer(64, 32, 3, seed=9)
    plan = K.prepare(layer)
    x = np.random.default_rng(9).standard_normal((3, 32)).astype(np.float32)
    out = np.empty((3, 64), np.float32)
    y = K.quip_linear(plan, x, out=out)
    assert np.shares_memory(y, out)
    assert rel_err(out, reference(layer, x)) < TOL


# --- malformed inputs raise Python exceptions ------------------------------------------
def test_bad_activations():
    plan = K.prepare(make_layer(64, 32, 2, seed=10))
    good = np.zeros((2, 32), np.float32)
    with pytest.raises(TypeError, match="dtype"):
        plan.forward(good.astype(np.float64))
    with pytest.raises(TypeError, match="numpy array"):
        plan.forward([[0.0] * 32])
    with pytest.raises(ValueError, match="shape"):
        plan.forward(np.zeros((2, 31), np.float32))
    with pytest.raises(ValueError, match="shape"):
        plan.forward(np.zeros(32, np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        plan.forward(np.zeros((32, 2), np.float32).T)
    with pytest.raises(ValueError, match="contiguous"):
        plan.forward(np.zeros((4, 32), np.float32)[::2])
    with pytest.raises(ValueError, match="contiguous"):  # misaligned view
        plan.forward(np.zeros(2 * 32 * 4 + 1, np.uint8)[1:].view(np.float32).reshape(2, 32))
    with pytest.raises(ValueError, match="threads"):
        plan.forward(good, threads=0)
    with pytest.raises(ValueError, match="shape"):
        plan.forward(good, out=np.zeros((2, 63), np.float32))
    ro = np.zeros((2, 64), np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        plan.forward(good, out=ro)
    with pytest.raises(ValueError, match="shape"):
        K.quip_linear(plan, np.zeros((2, 33), np.float32))
    z, zsum = plan.transform_in(good)
    with pytest.raises(ValueError, match="zsum"):
        plan.matmul(z, zsum[:1])
    with pytest.raises(ValueError, match="shape"):
        plan.matmul(good[:, :31].copy(), zsum)


def test_bad_layer_buffers():
    layer = make_layer(64, 30, 3, seed=11)
    args = K._layer_args(layer)
    K._ext.Plan(**args)  # the good arguments build
    cases = [
        ("codes", args["codes"][:, :-1].copy(), ValueError),
        ("codes", args["codes"].astype(np.int8), TypeError),
        ("codes", args["codes"][:-1].copy(), ValueError),
        ("scale", args["scale"].astype(np.float16), TypeError),
        ("zero", args["zero"][:10].copy(), ValueError),
        ("in_scale", np.ones(31, np.float32), ValueError),
        ("bias", np.ones((64, 1), np.float32), ValueError),
        ("bits", 5, ValueError),
        ("in_factors", [(np.eye(5, dtype=np.float32), False)], ValueError),
        ("in_factors", [(np.eye(30, dtype=np.float64), False)], TypeError),
        ("in_factors", [(np.eye(30, 29, dtype=np.float32), False)], ValueError),
        ("out_factors", [(np.eye(64, dtype=np.float32), False), (np.eye(2, dtype=np.float32), False)],
         ValueError),
        ("in_factors", [(np.eye(30, dtype=np.float32), True)], ValueError),  # FWHT order not 2^k
        ("in_factors", [np.eye(30, dtype=np.float32)], Exception),
    ]
    for key, value, exc in cases:
        with pytest.raises(exc):
            K._ext.Plan(**{**args, key: value})
    layer.codes = layer.codes[:, :-1]
    with pytest.raises(ValueError):
        K.prepare(layer)
    with pytest.raises(TypeError):
        K.prepare("not a layer")


def test_torch_module_bad_input():
    mod = K.KernelQuipLinear(make_layer(64, 32, 4, seed=12), "cpu")
    with pytest.raises(ValueError, match="shape"):
        mod(torch.zeros(3, 31))
    with pytest.raises(TypeError):
        mod(np.zeros((3, 32), np.float32))
    with pytest.raises(ValueError, match="device"):
        K.KernelQuipLinear(make_layer(64, 32, 4, seed=12), "meta")


# --- model level: the tiny artifact through quipc_runtime.load ---------------------------
def test_model_level_matches_reference(tiny_artifact):
    import quipc_runtime
    ref = quipc_runtime.load(tiny_artifact, backend="reference")
    fast = quipc_runtime.load(tiny_artifact, backend="kernels")
    ids = torch.randint(0, ref.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = ref(ids).logits, fast(ids).logits
        assert rel_err(b.numpy(), a.numpy()) < 1e-4
        ga = ref.generate(ids[:, :16], max_new_tokens=64, min_new_tokens=64, do_sample=False)
        gb = fast.generate(ids[:, :16], max_new_tokens=64, min_new_tokens=64, do_sample=False)
    assert torch.equal(ga, gb)


def test_model_hands_threads_to_the_pool(tiny_artifact):
    """During a forward torch runs single-threaded and the pool gets torch's thread count;
    both are restored afterwards, also when the forward raises."""
    import quipc_runtime
    fast = quipc_runtime.load(tiny_artifact, backend="kernels")
    seen = []
    layer = next(m for m in fast.modules() if isinstance(m, K.KernelQuipLinear))
    hook = layer.register_forward_pre_hook(lambda m, a: seen.append((torch.get_num_threads(), K.default_threads())))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            fast(torch.zeros(1, 4, dtype=torch.long))
        assert seen[0] == (1, 2) and torch.get_num_threads() == 2 and K._pool_threads is None
        with pytest.raises(IndexError), torch.inference_mode():
            fast(torch.full((1, 4), 10 ** 6, dtype=torch.long))  # token id past the vocabulary
        assert torch.get_num_threads() == 2 and K._pool_threads is None
    finally:
        hook.remove()
        torch.set_num_threads(before)

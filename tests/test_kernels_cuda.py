"""CUDA kernels against the CPU kernels (and the reference). Skips, saying why, where the
extension has no CUDA build or no GPU is visible. Run on a GPU machine: scripts/gpu_check.sh."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:  # the installed package (with its built extension), else the source tree
    import quipc_runtime  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from quipc_runtime import kernels as K  # noqa: E402
from test_kernels import SHAPES, make_layer, rel_err  # noqa: E402
from test_kernels_e8p import SHAPES as E8P_SHAPES  # noqa: E402
from e8p_layers import random_e8p_layer  # noqa: E402


def _skip_reason():
    if not K.available():
        return "quipc kernels extension not built"
    if not K._ext.cuda_built():
        return "extension built without CUDA (rebuild with QUIPC_CUDA=ON)"
    if K._ext.cuda_device_count() == 0:
        return "no CUDA device visible"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

TOL = 2e-5


@pytest.fixture(params=["fast", "simple"])
def gemv_variant(request, monkeypatch):
    if request.param == "simple":
        monkeypatch.setenv("QUIPC_CUDA_GEMV", "simple")
    else:
        monkeypatch.delenv("QUIPC_CUDA_GEMV", raising=False)
    return request.param


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m,n", SHAPES + [(256, 4096), (4096, 256)])
def test_cuda_forward_matches_cpu(bits, m, n, gemv_variant):
    layer = make_layer(m, n, bits, seed=m + n + bits)
    cpu, gpu = K.prepare(layer), K.prepare_cuda(layer)
    rng = np.random.default_rng(0)
    for batch in (1, 2, 3, 4, 5, 13, 16, 70):  # GEMV (1..4, pairs + odd; 5..16 in 4s), tiled GEMM
        x = rng.standard_normal((batch, n)).astype(np.float32)
        want = cpu.forward(x, threads=2)
        got = gpu.run_host("forward", x)
        assert rel_err(got, want) < TOL, (batch, rel_err(got, want))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m,n", [(576, 576), (1536, 576), (688, 96), (37, 13)])
def test_cuda_stages_match_cpu(bits, m, n):
    layer = make_layer(m, n, bits, seed=3 * m + n)
    cpu, gpu = K.prepare(layer), K.prepare_cuda(layer)
    x = np.random.default_rng(1).standard_normal((6, n)).astype(np.float32)
    z, zsum = cpu.transform_in(x, threads=2)
    z_gpu = gpu.run_host("transform_in", x)
    assert z_gpu.shape == z.shape and np.all(z_gpu[:, n:] == 0)
    assert rel_err(z_gpu, z) < TOL
    for batch in (1, 2, 6):
        t = cpu.matmul(z[:batch], zsum[:batch], threads=2)
        assert rel_err(gpu.run_host("matmul", z[:batch]), t) < TOL
    t = cpu.matmul(z, zsum)
    assert rel_err(gpu.run_host("transform_out", t), cpu.transform_out(t)) < TOL


def test_cuda_transform_kinds():
    for kin, kout in [("kron", "kron"), ("identity", "hadamard"), ("hadamard", "identity")]:
        layer = make_layer(96, 80, 3, seed=5, kin=kin, kout=kout)
        x = np.random.default_rng(2).standard_normal((3, 80)).astype(np.float32)
        got = K.prepare_cuda(layer).run_host("forward", x)
        assert rel_err(got, K.prepare(layer).forward(x)) < TOL, (kin, kout)


def test_cuda_large_dense_kron_factors():
    """11008 = 43 x 256 as two dense factors: too much work for one block a row, so one kernel per
    factor (launch_kron_chain declines); 576 = 36 x 16 runs as one chain launch."""
    for m, n in [(96, 11008), (11008, 96), (576, 576)]:
        layer = make_layer(m, n, 2, seed=9, kin="kron", kout="kron")
        x = np.random.default_rng(4).standard_normal((3, n)).astype(np.float32)
        assert rel_err(K.prepare_cuda(layer).run_host("forward", x), K.prepare(layer).forward(x)) < TOL, (m, n)


@pytest.mark.parametrize("n", [16384, 32768])
def test_cuda_large_hadamard(n):
    """16384: the one-launch chain with > 48 KiB of shared memory; 32768: two rows of it exceed
    kChainMaxSmem, so one kernel per factor."""
    layer = make_layer(64, n, 2, seed=6)
    x = np.random.default_rng(3).standard_normal((2, n)).astype(np.float32)
    assert rel_err(K.prepare_cuda(layer).run_host("forward", x), K.prepare(layer).forward(x)) < TOL


def test_cuda_bad_inputs():
    layer = make_layer(64, 32, 2, seed=7)
    gpu = K.prepare_cuda(layer)
    with pytest.raises(ValueError):
        gpu.run_host("forward", np.zeros((2, 31), np.float32))
    with pytest.raises(TypeError):
        gpu.run_host("forward", np.zeros((2, 32), np.float64))
    with pytest.raises(ValueError):
        gpu.run_host("nonsense", np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError):
        K._ext.CudaPlan(device=K._ext.cuda_device_count(), **K._layer_args(layer))
    with pytest.raises(ValueError):
        K._ext.CudaPlan(device=0, **{**K._layer_args(layer), "bits": 7})
    with pytest.raises(TypeError):
        K.cuda_quip_linear(gpu, np.zeros((2, 32), np.float32), np.zeros((2, 64), np.float32))


def test_torch_cuda_module():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here (the kernels were checked through run_host)")
    from quipc_runtime.modules import QuipLinearRef
    layer = make_layer(640, 576, 3, seed=8)
    mod = K.KernelQuipLinear(layer, "cuda")
    x = torch.randn(3, 7, 576)
    ref = QuipLinearRef(layer)(x)
    y = mod(x.cuda())                                  # the fast path (float32, contiguous)
    assert y.is_cuda and y.shape == (3, 7, 640) and rel_err(y.cpu().numpy(), ref.numpy()) < TOL
    y = mod(x.cuda().transpose(0, 1))                  # the general path: a strided view
    assert rel_err(y.cpu().numpy(), ref.transpose(0, 1).numpy()) < TOL
    y = mod(x.cuda().half())                           # ... and another dtype, returned in it
    assert y.dtype == torch.float16 and rel_err(y.float().cpu().numpy(), QuipLinearRef(layer)(x.half().float()).numpy()) < 1e-3
    assert mod(x.cuda()[:0]).shape == (0, 7, 640)
    checked = K.KernelQuipLinear(layer, "cuda")
    checked._fast = None                               # the fast path gives the checked path's bytes
    assert torch.equal(mod(x.cuda()), checked(x.cuda()))
    out = torch.empty(21, 640, device="cuda")
    K.cuda_quip_linear(mod._plan, x.reshape(21, 576).cuda(), out)
    assert rel_err(out.cpu().numpy(), ref.reshape(21, 640).numpy()) < TOL
    with pytest.raises(ValueError):
        mod(x)  # CPU tensor into a CUDA layer
    with pytest.raises(ValueError):
        K.cuda_quip_linear(mod._plan, x.reshape(21, 576).cuda()[:, :575], out)
    with pytest.raises(TypeError):
        K.cuda_quip_linear(mod._plan, x.reshape(21, 576).cuda().double(), out)


# --- format "e8p" (cpp/cuda/e8p.cu) against the CPU e8p kernels ------------------------
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m,n", E8P_SHAPES + [(256, 4096), (4096, 256)])
def test_cuda_e8p_forward_matches_cpu(bits, m, n):
    layer = random_e8p_layer(m, n, bits, seed=m + n + bits)
    cpu, gpu = K.prepare(layer), K.prepare_cuda(layer)
    rng = np.random.default_rng(0)
    for batch in (1, 2, 3, 4, 5, 13, 16, 70):  # GEMV (1..4; 5..16 in 4s) and tiled GEMM
        x = rng.standard_normal((batch, n)).astype(np.float32)
        want = cpu.forward(x, threads=2)
        got = gpu.run_host("forward", x)
        assert rel_err(got, want) < TOL, (batch, rel_err(got, want))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cuda_e8p_every_index(bits):
    """Every index of each stage occurs (64 rows x 1024 groups): GPU matmul = CPU matmul."""
    from quipc_runtime.formats.e8p import STAGES
    m, n = 64, 8192
    rng = np.random.default_rng(bits)
    size = {"e8p": 1 << 16, "e8_1bit": 256}
    indices = [rng.permutation(np.resize(np.arange(size[k]), m * n // 8)).reshape(m, n // 8)
               for k in STAGES[bits]]
    layer = random_e8p_layer(m, n, bits, seed=bits, indices=indices)
    cpu, gpu = K.prepare(layer), K.prepare_cuda(layer)
    z = rng.standard_normal((6, n)).astype(np.float32)
    for batch in (1, 4, 6):
        want = cpu.matmul(z[:batch], z[:batch].sum(1).astype(np.float32), threads=2)
        assert rel_err(gpu.run_host("matmul", z[:batch]), want) < TOL, batch


def test_cuda_e8p_bad_buffers():
    args = K._layer_args(random_e8p_layer(64, 32, 3, seed=9))
    K._ext.CudaPlan(device=0, **args)
    for key, value in [("scale", args["scale"][:, :1].copy()), ("zero", np.zeros(64, np.float32)),
                       ("codes", args["codes"][:, :-1].copy()), ("format", "nonsense")]:
        with pytest.raises(ValueError):
            K._ext.CudaPlan(device=0, **{**args, key: value})


# --- format "trellis" (cpp/cuda/trellis.cu) against the CPU trellis kernels --------------
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m,n", [(576, 576), (1536, 576), (576, 1536), (192, 576), (48, 80), (256, 4096)])
def test_cuda_trellis_forward_matches_cpu(bits, m, n):
    from trellis_layers import random_trellis_layer

    layer = random_trellis_layer(m, n, bits, seed=m + n + bits)
    cpu, gpu = K.prepare(layer, trellis_as_int8=False), K.prepare_cuda(layer)   # both exact
    rng = np.random.default_rng(0)
    for batch in (1, 2, 3, 4, 5, 13, 16, 70):  # GEMV (1..4; 5..16 in 4s), GEMM (n = 80: a half K step)
        x = rng.standard_normal((batch, n)).astype(np.float32)
        want = cpu.forward(x, threads=2)
        got = gpu.run_host("forward", x)
        assert rel_err(got, want) < TOL, (batch, rel_err(got, want))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m,n", [(576, 576), (64, 1552), (48, 80)])
def test_cuda_trellis_gemv_variants_agree(bits, m, n, monkeypatch):
    """The word-load GEMV (opt-in, QUIPC_CUDA_TRELLIS_ROWS) at 1, 2, 4 and auto rows per warp against the
    first (byte-load) kernel and the CPU; batches 5-16 as its 4-row chunks (QUIPC_CUDA_TRELLIS_CHUNKS)."""
    from trellis_layers import random_trellis_layer

    layer = random_trellis_layer(m, n, bits, seed=7 * m + n + bits)
    cpu, gpu = K.prepare(layer, trellis_as_int8=False), K.prepare_cuda(layer)
    rng = np.random.default_rng(3)
    for batch in (1, 2, 3, 4):
        x = rng.standard_normal((batch, n)).astype(np.float32)
        want = cpu.forward(x, threads=2)
        monkeypatch.delenv("QUIPC_CUDA_TRELLIS_ROWS", raising=False)
        simple = gpu.run_host("forward", x)
        assert rel_err(simple, want) < TOL, (batch, "first kernel")
        for rows in ("1", "2", "4", "auto"):
            monkeypatch.setenv("QUIPC_CUDA_TRELLIS_ROWS", rows)
            got = gpu.run_host("forward", x)
            assert rel_err(got, want) < TOL, (batch, rows, rel_err(got, want))
            assert rel_err(got, simple) < TOL, (batch, rows)
    monkeypatch.setenv("QUIPC_CUDA_TRELLIS_CHUNKS", "1")   # batches 5-16 as 4-row GEMVs
    for batch in (5, 13, 16):
        x = rng.standard_normal((batch, n)).astype(np.float32)
        got = gpu.run_host("forward", x)
        assert rel_err(got, cpu.forward(x, threads=2)) < TOL, (batch, "chunks")


def test_cuda_trellis_bad_buffers():
    from trellis_layers import random_trellis_layer

    args = K._layer_args(random_trellis_layer(64, 32, 3, seed=9))
    K._ext.CudaPlan(device=0, **args)
    for key, value in [("scale", np.repeat(args["scale"], 2, axis=1)), ("zero", np.zeros(64, np.float32)),
                       ("codes", args["codes"][:, :-1].copy()), ("m", 63)]:
        with pytest.raises(ValueError):
            K._ext.CudaPlan(device=0, **{**args, key: value})


# --- model level: the tiny model in the default's shape, on the GPU -----------------------
@pytest.fixture(scope="module")
def e8p_trellis_head_artifact(tiny_model, tmp_path_factory):
    """2-bit e8p blocks and a 4-bit trellis lm_head (the shape of `--calib`'s default)."""
    from quipc.compile import CalibConfig, compile_model
    from quipc.config import QuantConfig

    model, text = tiny_model
    out = tmp_path_factory.mktemp("art_cuda") / "w2"
    compile_model(str(model), out, QuantConfig(bits=2, seed=1, format="e8p", head_bits=4, head_format="trellis"),
                  CalibConfig(text=str(text), windows=8, length=32), progress=False)
    return out


def test_cuda_model_matches_cpu(e8p_trellis_head_artifact):
    """Prefill and KV-cache decode on the CUDA kernels against the reference on the CPU."""
    import torch

    import quipc_runtime
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    ref = quipc_runtime.load(e8p_trellis_head_artifact, backend="reference")
    gpu = quipc_runtime.load(e8p_trellis_head_artifact, device="cuda", backend="kernels")
    mods = [m for m in gpu.modules() if isinstance(m, K.KernelQuipLinear)]
    assert {m.format for m in mods} == {"e8p", "trellis"} and all(m.device.type == "cuda" for m in mods)
    ids = torch.randint(0, ref.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = ref(ids).logits
        got = gpu(ids.cuda()).logits
        assert got.is_cuda and rel_err(got.cpu().numpy(), want.numpy()) < 1e-4
        prompt = ids[:1, :16].cuda()  # (its pad token id 0 among them: the mask says it is text)
        out = gpu.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, min_new_tokens=24,
                           do_sample=False, output_logits=True, return_dict_in_generate=True)
        steps = torch.stack(out.logits, dim=1).cpu()         # (1, 24, vocab): decode, batch 1
        teacher = ref(out.sequences.cpu()).logits[:, 15:-1]  # the same positions, prefilled on the CPU
    assert rel_err(steps.numpy(), teacher.numpy()) < 1e-4
    from quipc.eval.chat import answer_ids                   # what `quipc chat --device cuda` prints
    from quipc_runtime.loader import load_tokenizer
    tok = load_tokenizer(e8p_trellis_head_artifact)
    assert answer_ids(gpu, tok, "the", 8) == answer_ids(ref, tok, "the", 8)

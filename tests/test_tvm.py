"""TVM backend: the TIR QuIP-linear kernel against QuipLinearRef, and the whole compiled model
(Relax + KV cache, loaded by the TVM runtime alone) against the torch path."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from quipc_runtime.layer import QuantizedLinear  # noqa: E402
from quipc_runtime.modules import QuipLinearRef  # noqa: E402
from quipc_runtime.packing import pack  # noqa: E402
from quipc_runtime.transforms import Transform  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def random_layer(m, n, bits, kind="hadamard", seed=0, bias=True, in_scale=True):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, (m, n))
    return QuantizedLinear(
        "layer", m, n, bits, pack(codes, bits),
        rng.normal(0, 0.05, m).astype(np.float16), rng.normal(0, 0.05, m).astype(np.float16),
        Transform.make(kind, n, seed + 1), Transform.make(kind, m, seed + 2),
        in_scale=rng.uniform(0.5, 2, n).astype(np.float16) if in_scale else None,
        bias=rng.normal(0, 1, m).astype(np.float32) if bias else None)


def run_kernel(layer, mode, rows, residual=None, x=None, int8_acts=False):
    import dataclasses

    from quipc.backends.tvm import tir_quip_linear as Q
    from quipc.backends.tvm.lowering import linear_prim_func
    from quipc.backends.tvm.build import resolve_target
    from quipc.backends.tvm.schedules import schedule_func

    spec = dataclasses.replace(Q.LinearSpec.of(layer), int8_acts=int8_acts)
    func = schedule_func(linear_prim_func(spec, mode, residual=residual is not None))
    lib = tvm.compile(func.with_attr("global_symbol", "main"), target=resolve_target("llvm"))
    if x is None:
        x = np.random.default_rng(7).normal(size=(rows, layer.in_features)).astype(np.float32)
    params = Q.linear_params(layer, spec)
    args = [x] + [params[k] for k in Q.param_names(spec)] + ([residual] if residual is not None else [])
    y = tvm.runtime.empty((rows, layer.out_features), "float32", tvm.cpu())
    lib(*[tvm.runtime.tensor(a) for a in args], y)
    return x, y.numpy()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape,kind,mode", [
    ((48, 96), "hadamard", "gemv"), ((48, 96), "hadamard", "gemm"),
    ((576, 192), "hadamard", "gemv"), ((576, 192), "hadamard", "gemm"),
    ((40, 72), "kron", "gemm"),  # padded rows and columns, random orthogonal factors
])
def test_kernel_matches_reference(bits, shape, kind, mode):
    layer = random_layer(*shape, bits, kind=kind, seed=bits)
    rows = 1 if mode == "gemv" else 32
    x, y = run_kernel(layer, mode, rows)
    ref = QuipLinearRef(layer)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_kernel_identity_transform_and_residual():
    layer = random_layer(32, 64, 2, kind="identity", bias=False, in_scale=False)
    res = np.random.default_rng(3).normal(size=(1, 32)).astype(np.float32)
    x, y = run_kernel(layer, "gemv", 1, residual=res)
    ref = QuipLinearRef(layer)(torch.from_numpy(x)).numpy() + res
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_llvm_target_leaves_out_the_vector_features_the_host_hides(tmp_path):
    """A VM can report a CPU model (znver4) whose AVX-512 the hypervisor masks: the features
    /proc/cpuinfo does not list are switched off, named in LLVM's spelling."""
    from quipc.backends.tvm.build import features_the_host_lacks, resolve_target

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma vaes avx512f avx512_vnni\n")
    model = {"avx2", "fma", "vaes", "avx512f", "avx512vnni", "avx512bw", "gfni", "sse4.1"}
    assert features_the_host_lacks(model, info) == ["avx512bw", "gfni"]
    assert features_the_host_lacks(model, tmp_path / "absent") == []
    target = resolve_target("llvm")      # this host: whatever it lacks is off in the target
    off = features_the_host_lacks(tvm.target.codegen.llvm_get_cpu_features(
        tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu", "mcpu": str(target.mcpu)})))
    assert sorted(str(a) for a in target.attrs.get("mattr", [])) == sorted(f"-{f}" for f in off)


def test_codes_repack_roundtrip():
    from quipc.backends.tvm.tir_quip_linear import K_GROUP, PLANES, TILE_O, repack_codes

    rng = np.random.default_rng(0)
    for bits in (2, 3, 4):
        codes = rng.integers(0, 1 << bits, (20, 40))
        planes = repack_codes(codes, bits)
        back = np.zeros((32, 64), np.int64)
        for plane, (shift, width) in zip(planes, PLANES[bits]):
            cpw = 32 // width
            words = plane.view(np.uint32).transpose(0, 2, 1).reshape(32, -1).astype(np.int64)
            for j in range(cpw):   # 4 bits: byte j % 4 of the word, its high nibble for j >= 4
                at = 8 * (j % 4) + 4 * (j // 4) if width == 4 else width * j
                back[:, j::cpw] |= ((words >> at) & ((1 << width) - 1)) << shift
        assert TILE_O == 16 and K_GROUP == 32
        np.testing.assert_array_equal(back[:20, :40], codes)
        assert not back[20:].any() and not back[:, 40:].any()


@pytest.mark.parametrize("heads,kv_heads,head_dim,cache,pos,span", [
    (4, 2, 16, 32, 12, 32),    # the tiny hidden-64 Llama of the tests: head_dim 16
    (9, 3, 64, 48, 16, 48),    # SmolLM2's heads, one past a 16-position tile, the whole cache
    (9, 3, 64, 48, 16, 32),    # the same over the span decode is given (pos + 1 rounded up to 16)
])
def test_decode_attention_ignores_unwritten_cache(heads, kv_heads, head_dim, cache, pos, span):
    """Decode attention runs over [0, span), masking positions past pos; a cache allocated
    uninitialized can hold NaN there, and a zero softmax weight times NaN is NaN (the
    hand-written build's decode returned NaN in some runs): they must never reach the output."""
    from tvm import te

    from quipc.backends.tvm.build import resolve_target
    from quipc.backends.tvm.attention import te_attention
    from quipc.backends.tvm.relax_model import LlamaSpec
    from quipc.backends.tvm.schedules import schedule_func

    sp = LlamaSpec(heads * head_dim, 4 * heads * head_dim, 2, heads, kv_heads, head_dim, 32, 1e-6, cache, True)
    q = te.placeholder((heads, 1, head_dim), "float32", name="q")
    ck = te.placeholder((2, kv_heads, head_dim, cache), "float32", name="cache_k")
    cv = te.placeholder((2, kv_heads, cache, head_dim), "float32", name="cache_v")
    p_pos = te.placeholder((1,), "int64", name="pos")
    p_layer = te.placeholder((1,), "int64", name="layer")
    out = te_attention(q, ck, cv, p_pos, p_layer, span, sp)
    func = schedule_func(te.create_prim_func([q, ck, cv, p_pos, p_layer, out]))
    lib = tvm.compile(func.with_attr("global_symbol", "main"), target=resolve_target("llvm"))
    rng = np.random.default_rng(0)
    qn = rng.normal(size=(heads, 1, head_dim)).astype(np.float32)
    kn = rng.normal(size=(2, kv_heads, head_dim, cache)).astype(np.float32)
    vn = rng.normal(size=(2, kv_heads, cache, head_dim)).astype(np.float32)
    kn[..., pos + 1:] = np.nan                       # never written: anything, NaN and inf included
    vn[:, :, pos + 1:] = np.nan
    vn[:, :, -1] = np.inf
    y = tvm.runtime.empty((1, heads * head_dim), "float32", tvm.cpu())
    lib(*[tvm.runtime.tensor(a) for a in (qn, kn, vn, np.array([pos], np.int64), np.array([1], np.int64))], y)
    grp = heads // kv_heads
    keys, vals = kn[1, :, :, :pos + 1], vn[1, :, :pos + 1]
    want = []
    for h in range(heads):
        s = qn[h, 0] @ keys[h // grp] / np.sqrt(head_dim)
        w = np.exp(s - s.max())
        want.append(w @ vals[h // grp] / w.sum())
    np.testing.assert_allclose(y.numpy()[0], np.concatenate(want), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tvm_build(tiny_artifact, tmp_path_factory):
    from quipc.backends.tvm import compile_artifact

    out = tmp_path_factory.mktemp("tvm") / "w3"
    compile_artifact(tiny_artifact, out, progress=False)
    return out


def test_whole_model_logits_and_generation(tiny_artifact, tvm_build):
    import quipc_runtime
    from quipc_runtime.tvm_runtime import TvmLM

    assert_matches_torch_path(quipc_runtime.load(tiny_artifact), TvmLM(tvm_build, threads=2), new_tokens=10)


def test_decode_logits_do_not_depend_on_cache_capacity(tvm_build):
    """Decode attends to the span of positions written so far (rounded up to 16), however
    large the cache: the same tokens give the same logits in a 32- and a 128-position cache, across
    the first tile boundary."""
    from quipc_runtime.tvm_runtime import TvmLM

    lm = TvmLM(tvm_build, threads=1)
    assert lm.decode_span
    ids = np.arange(3, 15)
    runs = []
    for capacity in (32, 128):
        cache = lm.new_cache(capacity)
        steps = [lm.prefill(ids, cache)]
        steps += [lm.decode(5 + i, ids.size + i, cache) for i in range(6)]   # positions 12..17
        runs.append(np.stack(steps))
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5, atol=1e-5 * np.abs(runs[1]).max())


def test_decode_profile_sees_every_call(tvm_build):
    """benchmarks/tvm_profile.py: one decode step's calls, each layer's kernels once per token."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from tvm_profile import profile
    finally:
        sys.path.pop(0)
    res = profile(str(tvm_build), cache_positions=32, pos=8, threads=1, steps=2, repeat=1)
    calls = {r["function"]: r["calls_per_token"] for r in res["functions"]}
    layers = json.loads((tvm_build / "tvm_config.json").read_text())["model"]["layers"]
    assert calls["kv_write"] == layers
    assert sum(c for f, c in calls.items() if f.startswith("attention")) == layers
    assert res["plain_ms_per_token"] > 0 and res["sum_ms_per_token"] > 0


def assert_matches_torch_path(model, lm, new_tokens: int) -> None:
    """A TVM build's prefill logits and greedy tokens (KV cache) equal the torch path's."""
    ids = torch.randint(3, 17, (1, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits[0].numpy()
    got = lm.logits(ids[0].numpy())
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    with torch.no_grad():
        want = model.generate(ids[:, :9], max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0].tolist()
    assert lm.generate(ids[0, :9].numpy(), new_tokens, stop_at_eos=False)[0].tolist() == want


def test_runtime_needs_only_tvm(tvm_build):
    # (apache-tvm itself imports torch when it is installed; the runtime never imports quipc)
    code = ("import sys, numpy as np\n"
            "from quipc_runtime.tvm_runtime import TvmLM\n"
            f"lm = TvmLM({str(tvm_build)!r}, threads=1)\n"
            "out = lm.generate(np.array([3, 4, 5]), 4, stop_at_eos=False)\n"
            "assert out.shape == (1, 7), out.shape\n"
            "bad = [m for m in sys.modules if m == 'quipc' or m.startswith('quipc.')]\n"
            "assert not bad, bad\n")
    env = {"PYTHONPATH": str(ROOT / "runtime"), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_bad_inputs(tmp_path, tiny_artifact):
    from quipc.backends.tvm import compile_artifact

    with pytest.raises(FileNotFoundError):
        compile_artifact(tmp_path / "nope", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="unknown TVM target"):
        compile_artifact(tiny_artifact, tmp_path / "out", target="vulkan-ish", progress=False)
    from quipc_runtime.tvm_runtime import TvmLM

    with pytest.raises(FileNotFoundError):
        TvmLM(tmp_path)


def test_params_of_other_shapes_refused_at_load(tvm_build, tmp_path):
    """The VM takes the parameter tuple unchecked on each call (a check per call cost 0.5 ms a
    token), so the runtime checks it once at load: a params.bin whose tensor has another shape
    or dtype is refused with an error naming it, before any kernel reads it."""
    import shutil

    from tvm.runtime import load_param_dict_from_file, save_param_dict_to_file

    from quipc_runtime.tvm_runtime import TvmLM

    cfg = json.loads((tvm_build / "tvm_config.json").read_text())
    assert len(cfg["param_types"]) == len(cfg["params"])
    for change in ("shape", "dtype"):
        bad = tmp_path / change
        shutil.copytree(tvm_build, bad)
        params = {k: v.numpy() for k, v in load_param_dict_from_file(str(bad / "params.bin")).items()}
        name = cfg["params"][-1]
        a = params[name]
        params[name] = a.reshape(-1)[:-1] if change == "shape" else a.astype(np.float64)
        save_param_dict_to_file({k: tvm.runtime.tensor(v) for k, v in params.items()}, str(bad / "params.bin"))
        with pytest.raises(ValueError, match=f"{name} is .*the build expects"):
            TvmLM(bad, threads=1)

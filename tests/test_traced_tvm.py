"""The traced TVM lowering (backends/tvm/traced.py) on tiny random models: prefill and 8
KV-cache decode steps against the torch path, through TvmLM (which hands a traced build to
TracedTvmLM); the quantized linears as call_tir of quipc's TIR kernels; the hand-written build
of a Llama with hidden size 64 (it divided by zero in TVM's region analysis; its decode read NaN
from cache positions not written yet)."""
from __future__ import annotations

import re

import pytest

tvm = pytest.importorskip("tvm")

from quipc_runtime import artifact as art  # noqa: E402
from traced_families import (DECODE_STEPS, FAMILY_CONFIGS, PROMPT_LEN, family_artifact, prompt, rel,  # noqa: E402
                             torch_reference)

TOL = 1e-4
# every family (phi3's split of its fused projections gave the prompt-op schedules an empty loop)
TVM_FAMILIES = tuple(FAMILY_CONFIGS)


def tvm_steps(path):
    from quipc_runtime.tvm_runtime import TvmLM

    lm = TvmLM(path, threads=2)
    ids = prompt().numpy()
    full = lm.logits(ids)
    tokens = lm.generate(ids, DECODE_STEPS, stop_at_eos=False)[0].tolist()
    cache = lm.new_cache(PROMPT_LEN + DECODE_STEPS)
    if type(lm).__name__ == "TracedTvmLM":   # the build's own prefill (last row's logits only)
        assert lm._prefill is not None
    last = lm.prefill(ids, cache)
    steps = []
    for k in range(DECODE_STEPS):
        steps.append(last)
        last = lm.decode(tokens[PROMPT_LEN + k], PROMPT_LEN + k, cache)
    return type(lm).__name__, full, steps, tokens


def check_against_torch(artifact, path, runtime: str):
    want_full, want_steps, want_tokens = torch_reference(artifact)
    name, full, steps, tokens = tvm_steps(path)
    assert name == runtime
    assert rel(full, want_full) < TOL
    assert max(rel(a, b) for a, b in zip(steps, want_steps)) < TOL
    assert tokens == want_tokens


def capture_build(monkeypatch) -> dict:
    """{"mod": the IRModule that compile_traced builds next} (filled when it builds)."""
    from quipc.backends.tvm import traced

    built = {}
    real = traced.build_module

    def keep(*args, **kwargs):
        built["mod"], traceable = real(*args, **kwargs)
        return built["mod"], traceable
    monkeypatch.setattr(traced, "build_module", keep)
    return built


def round_trellis_rows(monkeypatch):
    """The torch path with every trellis layer's rows rounded to 8 bits (quipc_runtime.int8_rows),
    as TVM's int8x2 lowering runs them; returns the rounding (W' -> rounded W')."""
    import numpy as np
    from quipc_runtime.int8_rows import rows_as_int8
    from quipc_runtime.layer import QuantizedLinear

    def rounded(w):
        q, step = rows_as_int8(w)
        return (q * step[:, None]).astype(np.float32)
    weight = QuantizedLinear.rotated_weight
    monkeypatch.setattr(QuantizedLinear, "rotated_weight",
                        lambda self: rounded(weight(self)) if self.format == "trellis" else weight(self))
    return rounded


@pytest.mark.parametrize("family", TVM_FAMILIES)
def test_family_traced_tvm_matches_torch(family, tmp_path):
    from quipc.backends.tvm.traced import compile_traced

    artifact = family_artifact(family)
    check_against_torch(artifact, compile_traced(artifact, tmp_path / "tvm", progress=False), "TracedTvmLM")


@pytest.fixture(scope="module")
def traced_llama(tmp_path_factory):
    from quipc.backends.tvm.traced import compile_traced

    artifact = family_artifact("llama")
    return artifact, compile_traced(artifact, tmp_path_factory.mktemp("traced") / "tvm", progress=False)


def test_capacity_cache_written_in_place(traced_llama):
    """The build's cache is updated in place: the arrays handed in hold the prompt's keys after
    prefill (its padding's too, overwritten by the decode steps), and positions never written
    (NaN here) are never read."""
    import numpy as np

    from quipc_runtime.tvm_runtime import TvmLM

    artifact, path = traced_llama
    _, want_steps, want_tokens = torch_reference(artifact)
    lm = TvmLM(path, threads=2)
    assert lm.capacity_cache
    cache = lm.new_cache(PROMPT_LEN + DECODE_STEPS + 5)
    cache[:] = [lm._t(np.full(tuple(int(d) for d in c.shape), np.nan, np.float32)) for c in cache]
    handed_in = list(cache)
    last = lm.prefill(prompt().numpy(), cache)
    keys = handed_in[0].numpy()
    padded = -(-PROMPT_LEN // lm.row_multiple) * lm.row_multiple   # the prompt's rows padded at the end
    assert lm.row_multiple == 16 and padded > PROMPT_LEN
    assert np.isfinite(keys[:, :, :padded]).all() and np.isnan(keys[:, :, padded:]).all()
    for k in range(DECODE_STEPS):
        assert rel(last, want_steps[k]) < TOL
        last = lm.decode(want_tokens[PROMPT_LEN + k], PROMPT_LEN + k, cache)
    assert cache.held == PROMPT_LEN + DECODE_STEPS
    assert np.isfinite(handed_in[-1].numpy()[:, :, :cache.held]).all()


def test_capacity_cache_one_token_prompt_and_overflow(traced_llama):
    """A one-token prompt (one attended position) and its decode against the torch path's
    logits of the same rows; a decode past the cache's capacity is refused."""
    from quipc_runtime.tvm_runtime import TvmLM

    artifact, path = traced_llama
    want_full, _, _ = torch_reference(artifact)
    ids = prompt().numpy()
    lm = TvmLM(path, threads=2)
    assert rel(lm.logits(ids[:, :1])[0], want_full[0]) < TOL
    cache = lm.new_cache(2)
    assert rel(lm.prefill(ids[:, :1], cache), want_full[0]) < TOL
    assert rel(lm.decode(int(ids[0, 1]), 1, cache), want_full[1]) < TOL
    with pytest.raises(ValueError, match="do not fit a cache of 2 positions"):
        lm.decode(int(ids[0, 2]), 2, cache)
    with pytest.raises(ValueError, match="cache holds 2 positions"):
        lm.decode(int(ids[0, 2]), 1, cache)


def test_concatenated_cache_build_still_runs(tmp_path, monkeypatch):
    """Builds made before the capacity cache (`past` in, `present` out, concatenated) run as
    before, also with the allocator's free blocks released after every call (TracedTvmLM
    releases them every CLEAR_EVERY calls): the cache arrays in use stay valid."""
    import json

    from quipc.backends.tvm.traced import compile_traced
    from quipc_runtime import tvm_traced

    monkeypatch.setattr(tvm_traced, "CLEAR_EVERY", 1)
    artifact = family_artifact("llama")
    path = compile_traced(artifact, tmp_path / "tvm", progress=False, cache="concat")
    assert "cache" not in json.loads((path / "tvm_config.json").read_text())
    check_against_torch(artifact, path, "TracedTvmLM")


@pytest.mark.parametrize("e8p_kernel", ["grid4", "codebook"])
def test_head_and_shared_embedding(tmp_path, monkeypatch, e8p_kernel):
    """The CLI's defaults (e8p blocks, a 4-bit grid lm_head whose codes are the embedding): the
    embedding decodes from the head's constants, no dense (vocab, hidden) table in the module;
    the 2-bit e8p blocks run by the 4-bit grid kernel (grid4, the default) or the e8p kernel."""
    import json

    from quipc.backends.tvm import traced

    built = capture_build(monkeypatch)
    artifact = family_artifact("qwen2", head=True)   # the traced ONNX tests' artifact (cached)
    assert art.load_block(artifact, art.read_manifest(artifact)["head"])[0].has_row_patch  # 8-bit rows too
    path = traced.compile_traced(artifact, tmp_path / "tvm", progress=False, e8p_kernel=e8p_kernel)
    check_against_torch(artifact, path, "TracedTvmLM")
    assert json.loads((path / "tvm_config.json").read_text())["e8p_kernel"] == e8p_kernel
    for fname in ("forward", "decode"):
        shapes = {tuple(c.value.shape) for c in _constants(built["mod"][fname])}
        assert (256, 64) not in shapes
        text = built["mod"][fname].script()
        assert ("_quip_e8p_" in text) == (e8p_kernel == "codebook")


def test_trellis_head_runs_on_its_rows_rounded_to_8_bits(tmp_path, monkeypatch):
    """A trellis lm_head whose codes are the embedding too (and 8-bit rows) lowers as "int8x2"
    (trellis_as_int8): prefill, decode and tokens are the torch path's with the head's rows
    rounded to 8 bits (quipc_runtime.int8_rows) in the head and the embedding, which decodes
    from the head's planes (no dense table)."""
    from quipc.backends.tvm import traced
    from quipc_runtime import embedding

    built = capture_build(monkeypatch)
    artifact = family_artifact("qwen2", head=True, head_format="trellis")
    path = traced.compile_traced(artifact, tmp_path / "tvm", progress=False)
    for fname in ("forward", "decode"):
        assert (256, 64) not in {tuple(c.value.shape) for c in _constants(built["mod"][fname])}
        assert "trellis" not in built["mod"][fname].script()   # the blocks are e8p: no trellis kernel left

    rows = embedding.head_rotated_rows
    rounded = round_trellis_rows(monkeypatch)
    monkeypatch.setattr(embedding, "head_rotated_rows", lambda layer, ids: rounded(rows(layer, ids)))
    check_against_torch(artifact, path, "TracedTvmLM")
    monkeypatch.undo()   # and the rounding does move the logits: the exact head's are not these
    want_full = torch_reference(artifact)[0]
    assert rel(tvm_steps(path)[1], want_full) > TOL


@pytest.mark.parametrize("kernel", ["int8", "codes"])
def test_trellis_blocks_by_kernel(kernel, tmp_path, monkeypatch):
    """--tvm-trellis: "int8" (default) lowers every trellis layer as "int8x2" (rows rounded to 8
    bits: the torch path with those rounded rows, and no trellis kernel left), "codes" keeps the
    trellis kernels (the torch path itself)."""
    import json

    from quipc.backends.tvm import traced

    built = capture_build(monkeypatch)
    artifact = family_artifact("qwen2", blocks_format="trellis")
    path = traced.compile_traced(artifact, tmp_path / "tvm", progress=False, trellis_kernel=kernel)
    assert json.loads((path / "tvm_config.json").read_text())["trellis_kernel"] == kernel
    assert ("trellis" in built["mod"]["decode"].script()) == (kernel == "codes")
    if kernel == "int8":
        round_trellis_rows(monkeypatch)
    check_against_torch(artifact, path, "TracedTvmLM")
    with pytest.raises(ValueError, match="unknown trellis kernel"):
        traced.build_module(artifact, trellis_kernel="lut")


def test_quantized_linears_and_attention_are_call_tir():
    from quipc.backends.tvm.traced import build_module

    artifact = family_artifact("qwen2")
    mod, traceable = build_module(artifact)
    n_layers = len(art.load_layers(artifact, art.read_manifest(artifact)))
    for fname, kernel in (("forward", "quip_gemm"), ("prefill", "quip_gemm"), ("decode", "quip_gemv")):
        text = mod[fname].script()
        assert text.count(f"{fname}_quip_") == n_layers      # one call_tir per quantized linear
        assert kernel in text
        # one call_tir per layer's attention: no repeated kv heads, transposes, matmuls or softmax
        assert len(re.findall(rf"R\.call_tir\({fname}_attention\d*,", text)) == traceable.layout.layers
        assert "R.nn.softmax" not in text
        shapes = {tuple(c.value.shape) for c in _constants(mod[fname])}
        assert not shapes & {(128, 64), (64, 128)}            # no dense gate/up/down weight
        # prompts come padded to 16 rows: no linear pads its rows (zeros + concat) for its kernel
        assert text.count("R.zeros(") < n_layers // 2
    _check_prompt_ops_scheduled(mod)


def _check_prompt_ops_scheduled(mod):
    """schedules/legalized.py: TVM's own ops that only forward / prefill call run in parallel
    (SiLU vectorized too); decode's keep the default serial loop nest, fused (decode_fusion.py)."""
    import tvm
    from tvm import relax, tirx

    from quipc.backends.tvm.build import resolve_target
    from quipc.backends.tvm.schedules.legalized import called_by
    from quipc.backends.tvm.traced import lower_operators

    # quipc's kernels (SiLU's converter aside: TVM ops, fused like the legalized ones)
    ours = {g.name_hint for g in called_by(mod["decode"]) if "silu" not in g.name_hint}
    with tvm.target.Target("llvm"):
        unfused = relax.transform.LegalizeOps()(mod)["decode"].script().count("R.call_tir")
    mod = lower_operators(mod, resolve_target("llvm"))
    calls = {gv.name_hint: {g.name_hint for g in called_by(f)} for gv, f in mod.functions.items()
             if not isinstance(f, tirx.PrimFunc)}
    silu = mod["prefill_silu"].script()
    assert "T.parallel" in silu and "T.vectorized" in silu
    assert silu.count("T.sblock(") - silu.count('T.sblock("root")') == 1   # fast_exp's stages inlined
    decode_only = calls["decode"] - calls["forward"] - calls["prefill"]
    legal = [n for n in decode_only if not n.startswith("decode_")]   # TVM's legalized ops
    assert legal and not any("T.parallel" in mod[n].script() for n in legal)
    # decode's norms, rotary embeddings and activations fused; quipc's kernels called as built
    fused = [n for n in legal if n.startswith("fused_")]
    assert any("mean" in n and "rsqrt" in n for n in fused)         # an RMSNorm, one function
    assert mod["decode"].script().count("R.call_tir") < 0.6 * unfused
    assert ours and ours <= calls["decode"]


def _constants(func):
    from tvm import relax

    found = []
    constant = type(relax.const(0.0))
    relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(e, constant) else None)
    return found


@pytest.fixture(scope="module")
def handwritten_hidden_64(tmp_path_factory):
    from quipc.backends.tvm import compile_artifact

    artifact = family_artifact("llama")
    return artifact, compile_artifact(artifact, tmp_path_factory.mktemp("hw64") / "tvm", progress=False)


def test_handwritten_hidden_64_builds(handwritten_hidden_64):
    """The issue's known bug: a Llama with hidden size 64 stopped with 'Divide by zero'.
    The build and its prefill logits (deterministic) against the torch path."""
    from quipc_runtime.tvm_runtime import TvmLM

    artifact, path = handwritten_hidden_64
    want_full, _, _ = torch_reference(artifact)
    assert rel(TvmLM(path, threads=2).logits(prompt().numpy()), want_full) < TOL


def test_handwritten_hidden_64_decodes(handwritten_hidden_64):
    """Its cached decode returned NaN in some runs: the decode attention weighted the cache
    positions not written yet by a softmax weight of 0, and 0 * NaN is NaN when the cache's
    uninitialized memory held NaN; they are masked by a select now."""
    artifact, path = handwritten_hidden_64
    check_against_torch(artifact, path, "TvmLM")


def test_handwritten_hidden_64_decodes_nan_in_unwritten_cache(handwritten_hidden_64):
    """The same, deterministic: a cache whose every position holds NaN before prefill and
    decode write it."""
    import numpy as np

    from quipc_runtime.tvm_runtime import TvmLM

    artifact, path = handwritten_hidden_64
    _, want_steps, want_tokens = torch_reference(artifact)
    lm = TvmLM(path, threads=2)
    shapes = [c.shape for c in lm.new_cache(PROMPT_LEN + DECODE_STEPS)]
    cache = [lm._t(np.full(tuple(int(d) for d in s), np.nan, np.float32)) for s in shapes]
    last = lm.prefill(prompt().numpy(), cache)
    for k in range(DECODE_STEPS):
        assert rel(last, want_steps[k]) < TOL
        last = lm.decode(want_tokens[PROMPT_LEN + k], PROMPT_LEN + k, cache)


def test_cli_traced_tvm_refuses_cuda(tmp_path):
    from quipc.backends.lower import lower_artifact

    with pytest.raises(ValueError, match="traced TVM build runs on llvm"):
        lower_artifact(family_artifact("qwen2"), tmp_path / "tvm", target="tvm", graph="traced",
                       tvm_target="cuda", progress=False)
    assert not (tmp_path / "tvm").exists()

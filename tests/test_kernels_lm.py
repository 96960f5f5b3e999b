"""The lean decoder (quipc_runtime.kernels_lm) against transformers driving the same
kernels-backend model: prefill and every greedy decode step's logits, per family, through the
C++ blocks (`_kernels.DecoderLayer`) and through the torch glue."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from quipc_runtime import kernels as K

pytestmark = pytest.mark.skipif(not K.available(), reason="quipc kernels extension not built")

from traced_families import DECODE_STEPS, family_artifact, prompt, rel, torch_reference

TOL = 2e-5


def _lean(artifact):
    import quipc_runtime
    from quipc_runtime.kernels_lm import KernelsLM

    return KernelsLM(quipc_runtime.load(artifact, backend="kernels"), threads=2)


def _steps(lm, tokens):
    """Logits of the prefill and of each decode step fed `tokens` (the reference's choices)."""
    ids = prompt()[0].numpy()
    cache = lm.new_cache(ids.size + DECODE_STEPS)
    out = [lm.prefill(ids, cache)]
    for i, tok in enumerate(tokens[ids.size:ids.size + DECODE_STEPS - 1]):
        out.append(lm.decode(tok, ids.size + i, cache))
    return out


@pytest.mark.parametrize("family,head", [("llama", False), ("mistral", False), ("qwen2", False),
                                         ("qwen3", False), ("phi3", False), ("gemma2", False),
                                         ("gemma3", False), ("llama", True), ("gemma3", True)])
def test_lean_decoder_matches_transformers(family, head):
    artifact = family_artifact(family, head=head)
    full, steps, tokens = torch_reference(artifact, backend="kernels")
    lm = _lean(artifact)
    assert lm.native is not None   # decode runs the C++ blocks
    # q / k / v and gate / up share their input side before fine-tuning: the blocks run them as
    # groups (Phi-3's are fused projections already)
    assert all(b.qkv_grouped and b.gate_up_grouped for b in lm.native) == (family != "phi3")
    got = _steps(lm, tokens)
    assert rel(got[0], full[-1]) < TOL
    for i, (a, b) in enumerate(zip(got, steps)):
        assert rel(a, b) < TOL, f"step {i}"
    gen = lm.generate(prompt()[0].numpy(), DECODE_STEPS, stop_at_eos=False)
    assert gen[0].tolist() == tokens


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma2", "gemma3"])
def test_torch_glue_decode_matches_the_cpp_blocks(family):
    artifact = family_artifact(family)
    lm = _lean(artifact)
    _, _, tokens = torch_reference(artifact, backend="kernels")
    native = _steps(lm, tokens)
    lm.native = None
    glue = _steps(lm, tokens)
    for a, b in zip(glue, native):
        assert rel(a, b) < TOL


def test_families_it_does_not_run_keep_transformers():
    from transformers import AutoConfig, AutoModelForCausalLM

    from quipc_runtime.kernels_lm import KernelsLM, lean, unsupported

    config = AutoConfig.for_model("gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=256)
    model = AutoModelForCausalLM.from_config(config)
    assert "gpt_neox" in unsupported(model)
    assert lean(model) is model
    with pytest.raises(ValueError, match="cannot run this model"):
        KernelsLM(model)


@pytest.mark.parametrize("family", ["llama", "gemma3"])   # gemma3: a sliding layer (window 8)
def test_a_prompt_in_chunks_gives_the_prompts_logits(family):
    """extend() after prefill(): a conversation's next turn runs on the cache of the earlier ones."""
    lm = _lean(family_artifact(family))
    ids = prompt()[0].numpy()
    whole = lm.prefill(ids, lm.new_cache(ids.size + 1))
    cache = lm.new_cache(ids.size + 1)
    lm.prefill(ids[:3], cache)
    lm.extend(ids[3:5], 3, cache)
    assert rel(lm.extend(ids[5:], 5, cache), whole) < TOL
    with pytest.raises(ValueError, match="no tokens"):
        lm.extend([], 3, cache)


def test_cache_positions_are_checked():
    lm = _lean(family_artifact("llama"))
    cache = lm.new_cache(16)
    lm.prefill(np.arange(3, 15), cache)
    with pytest.raises(ValueError, match="outside the cache"):
        lm.decode(5, 16, cache)
    with pytest.raises(ValueError, match="outside the cache"):
        lm.extend([3, 4, 5, 6, 7], 12, cache)
    with pytest.raises(ValueError, match="positions"):
        lm.new_cache(10 ** 6)


def test_decoder_layer_refuses_what_does_not_fit():
    lm = _lean(family_artifact("llama"))
    layer = lm.model.model.layers[0]
    a, mlp = layer.self_attn, layer.mlp
    plans = [m._plan for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    ones = np.ones(lm.hidden, np.float32)
    args = (lm.hidden, lm.heads, lm.kv_heads, lm.head_dim, lm.inter, 1e-5, 1e-5, 0.25, ones, ones, None, None, 0.0)
    with pytest.raises(ValueError, match="gate_proj is"):
        K._ext.DecoderLayer(*args, *plans[:4], plans[6], plans[5], plans[6])
    with pytest.raises(TypeError, match="must be a Plan"):
        K._ext.DecoderLayer(*args, *plans[:6], "down")
    with pytest.raises(ValueError, match="act must be"):
        K._ext.DecoderLayer(*args, *plans, act="relu")
    with pytest.raises(ValueError, match="sliding window must be >= 0"):
        K._ext.DecoderLayer(*args, *plans, window=-1)
    with pytest.raises(ValueError, match="post_attn and post_mlp"):
        K._ext.DecoderLayer(*args, *plans, post_attn=ones)
    with pytest.raises(ValueError, match="k_proj and v_proj must both be given"):
        K._ext.DecoderLayer(*args, plans[0], plans[1], None, *plans[3:])
    with pytest.raises(ValueError, match="qkv_proj is"):      # q alone is not a fused qkv_proj
        K._ext.DecoderLayer(*args, plans[0], None, None, *plans[3:])
    with pytest.raises(ValueError, match="gate_up_proj is"):  # nor up alone a fused gate_up_proj
        K._ext.DecoderLayer(*args, *plans[:4], None, *plans[5:])
    block = K._ext.DecoderLayer(*args, *plans)
    cache = np.zeros((lm.kv_heads, 4, lm.head_dim), np.float32)
    row = np.ones(lm.head_dim, np.float32)
    h = np.ones(lm.hidden, np.float32)
    with pytest.raises(ValueError, match="outside the cache"):
        block.step(h, 4, cache, cache.copy(), row, row)
    with pytest.raises(ValueError, match="k_cache has shape"):
        block.step(h, 0, cache[:, :, :-1].copy(), cache, row, row)
    block.step(h, 0, cache, cache.copy(), row, row)
    assert np.isfinite(h).all() and not np.array_equal(h, np.ones_like(h))


@pytest.mark.parametrize("family", ["llama", "gemma2"])   # gemma2: soft-capped scores
def test_attention_kernels_agree(family):
    """The AVX2 attention (8-lane dot products, polynomial exp) against the portable one, over
    more positions than a vector holds and scores spread wide enough to underflow some exps."""
    lm = _lean(family_artifact(family))
    block = lm.native[0]
    rng = np.random.default_rng(0)
    k = rng.normal(0, 4, (lm.kv_heads, 40, lm.head_dim)).astype(np.float32)
    v = rng.normal(0, 1, k.shape).astype(np.float32)
    cos = rng.uniform(-1, 1, lm.head_dim).astype(np.float32)
    sin = rng.uniform(-1, 1, lm.head_dim).astype(np.float32)
    h0 = rng.normal(0, 1, lm.hidden).astype(np.float32)
    out = {}
    for scalar in (True, False):
        h, kc, vc = h0.copy(), k.copy(), v.copy()
        block.step(h, 37, kc, vc, cos, sin, threads=2, force_scalar=scalar)
        out[scalar] = h
    assert not np.array_equal(out[True], h0)
    assert rel(out[False], out[True]) < 1e-5


@pytest.mark.parametrize("model_type,settings,why", [
    ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "changes with the sequence length"),
    ("phi3", dict(partial_rotary_factor=0.5, pad_token_id=0), "partial rotary"),
    ("gemma3_text", dict(use_bidirectional_attention=True), "bidirectional"),
])
def test_settings_it_does_not_reproduce_are_named(model_type, settings, why):
    from transformers import AutoConfig, AutoModelForCausalLM

    from quipc_runtime.kernels_lm import unsupported

    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                  max_position_embeddings=128, **settings)
    assert why in unsupported(AutoModelForCausalLM.from_config(config))


@pytest.mark.parametrize("family,settings", [
    ("mistral", dict(sliding_window=5)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),  # layer 1 slides
])
def test_sliding_windows_match_transformers(family, settings, tmp_path):
    """Windows shorter than the prompt: the prefill's masked attention (torch glue) and every
    decode step's (C++ blocks, then the glue) attend to the last `window` positions only."""
    from quipc.compile import CalibConfig, compile_model
    from quipc.config import QuantConfig
    from tiny import write_text
    from traced_families import make_family_model

    folder = make_family_model(tmp_path / "hf", family, **settings)
    art = tmp_path / "art"
    compile_model(str(folder), art, QuantConfig(bits=2), CalibConfig(text=str(write_text(tmp_path / "c.txt")),
                                                                     windows=4, length=32), progress=False)
    full, steps, tokens = torch_reference(art, backend="kernels")
    lm = _lean(art)
    assert lm.native is not None and any(b.window == 5 for b in lm.blocks)
    for native in (True, False):
        if not native:
            lm.native = None
        got = _steps(lm, tokens)
        assert rel(got[0], full[-1]) < TOL
        for i, (a, b) in enumerate(zip(got, steps)):
            assert rel(a, b) < TOL, f"step {i} ({'C++' if native else 'glue'})"

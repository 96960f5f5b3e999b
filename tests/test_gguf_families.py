"""GGUF files of every family (tests/gguf_writer.py writes them as llama.cpp lays them out,
float32): quipc's eager and streaming frontends load each to the logits of the Hugging Face
model it was written from, and `quipc compile` of the GGUF gives the layer codes that compiling
the Hugging Face folder gives. An architecture transformers cannot read from GGUF is a clear
error naming it."""
from __future__ import annotations

import json
from functools import lru_cache

import pytest
import torch

from gguf_writer import ARCHS, write_gguf
from tiny import write_text
from traced_families import _ROOT, FAMILY_CONFIGS, make_family_model, prompt

from quipc.frontend.models import resolve

# A GGUF states no per-layer attention pattern: transformers (and llama.cpp) take Gemma 3's
# default of five sliding layers to one global, so a 2-layer file means two sliding layers.
GGUF_OVERRIDES = {"gemma3": dict(layer_types=None)}
# the families tests/gguf_writer.py lays out as llama.cpp does (the traced families beyond them are
# Hugging Face folders only here)
CASES = {f: (f, {}) for f, (model_type, _) in FAMILY_CONFIGS.items() if model_type in ARCHS} | \
    {"llama-untied": ("llama", dict(tie_word_embeddings=False))}
# config keys a GGUF does not carry, or carries as float32
LOSSY = ("architectures", "unk_token_id", "rms_norm_eps")


@lru_cache(maxsize=None)
def gguf_case(case: str):
    """(HF folder, .gguf path) of the case's tiny model; the folder holds the tokenizer that
    transformers rebuilds from the GGUF, so both tokenize the calibration text alike."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    family, extra = CASES[case]
    root = _ROOT / f"gguf-{case}"
    folder = make_family_model(root / "hf", family, **{**GGUF_OVERRIDES.get(family, {}), **extra})
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    path = write_gguf(model, root / f"{case}.gguf")
    rebuilt = AutoTokenizer.from_pretrained(root, gguf_file=path.name)
    # as a plain fast tokenizer: saved under the family's class (GemmaTokenizer, ...) it would
    # be rebuilt by that class's own rules on loading, not as the GGUF's byte-level BPE
    PreTrainedTokenizerFast(tokenizer_object=rebuilt.backend_tokenizer, bos_token=rebuilt.bos_token,
                            eos_token=rebuilt.eos_token, unk_token=rebuilt.unk_token,
                            pad_token=rebuilt.pad_token).save_pretrained(folder)
    return folder, path


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_loads_to_the_source_logits(case):
    from transformers import AutoModelForCausalLM

    from quipc.frontend.hf import load_model
    from quipc.frontend.streaming import open_streamed

    folder, path = gguf_case(case)
    source = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = prompt()
    want = _logits(source, ids)
    eager, tok = load_model(resolve(str(path)))
    assert type(eager) is type(source) or case == "mistral"   # llama.cpp writes mistral as llama
    torch.testing.assert_close(_logits(eager, ids), want, rtol=0, atol=1e-5)
    stream, stok = open_streamed(resolve(str(path)))
    with stream.fully_loaded() as whole:
        torch.testing.assert_close(_logits(whole, ids), want, rtol=0, atol=1e-5)
    assert stream.loaded == set()
    if case == "llama-untied":
        assert not torch.equal(stream.model.lm_head.weight, stream.model.model.embed_tokens.weight)
    else:
        assert stream.model.lm_head.weight is stream.model.get_input_embeddings().weight
    text = "the cat sat on the mat\nand the dog ran"
    assert tok(text).input_ids == stok(text).input_ids == source_tokenizer(folder)(text).input_ids


def source_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _artifact_parts(folder):
    """{relative path: bytes} of the tensors, and the manifest without what names the source."""
    tensors = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}
    man = json.loads((folder / "manifest.json").read_text())
    for key in ("source", "job_key", "compile_seconds"):
        man.pop(key)
    man["summary"] = {k: v for k, v in man["summary"].items() if k not in ("total_bytes", "bits_per_param", "pad")}
    return tensors, man


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_compiles_to_the_same_codes(case, tmp_path):
    from quipc.compile import CalibConfig, compile_model
    from quipc.config import QuantConfig

    folder, path = gguf_case(case)
    text = write_text(tmp_path / "calib.txt")
    calib, cfg = CalibConfig(text=str(text), windows=4, length=32), QuantConfig(bits=2)
    compile_model(str(folder), tmp_path / "hf", cfg, calib, progress=False)
    compile_model(str(path), tmp_path / "gguf", cfg, calib, progress=False)
    want_tensors, want = _artifact_parts(tmp_path / "hf")
    got_tensors, got = _artifact_parts(tmp_path / "gguf")
    assert got_tensors.keys() == want_tensors.keys()
    assert [n for n in want_tensors if got_tensors[n] != want_tensors[n]] == []
    hf_config, gguf_config = want.pop("model_config"), got.pop("model_config")
    assert gguf_config["rms_norm_eps"] == pytest.approx(hf_config["rms_norm_eps"], rel=1e-6)  # a float32
    lossy = LOSSY
    if case == "mistral":   # llama.cpp writes Mistral as a llama (no sliding window): read back as one
        assert (want.pop("architecture"), got.pop("architecture")) == ("MistralForCausalLM", "LlamaForCausalLM")
        assert hf_config["sliding_window"] is None
        lossy += ("model_type", "sliding_window", "pretraining_tp", "mlp_bias", "attention_bias")
    assert got == want
    assert {k: v for k, v in gguf_config.items() if k not in lossy} == \
        {k: v for k, v in hf_config.items() if k not in lossy}


def test_unsupported_architecture_is_named(tmp_path):
    """A GGUF whose architecture transformers' GGUF loader lacks (here OLMo) stops both
    frontends with an error naming it, not a traceback."""
    import gguf

    from quipc.frontend.hf import load_model
    from quipc.frontend.streaming import open_streamed

    path = tmp_path / "olmo.gguf"
    w = gguf.GGUFWriter(str(path), "olmo")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for load in (load_model, open_streamed):
        with pytest.raises(ValueError, match=r"could not load .*olmo\.gguf as a causal LM: .*architecture olmo "
                                             r"is not supported"):
            load(resolve(str(path)))

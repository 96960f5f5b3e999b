"""The streaming frontend: blocks materialized one at a time from safetensors shards or a GGUF
file equal what transformers' from_pretrained loads; the teacher's logits from carried fp
hidden states equal the fp model's; a sharded folder compiles to the same bytes."""
import json

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from quipc.compile import CalibConfig, compile_model
from quipc.config import QuantConfig
from quipc.distributed import SINGLE
from quipc.frontend.models import resolve
from quipc.frontend.streaming import StreamedModel, open_streamed
from quipc.frontend.tensor_sources import GGUFSource, SafetensorsSource


def _eager(folder, **kw):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()


def _stream(folder, source_of, **kw) -> StreamedModel:
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, **kw), dtype=torch.float32)
    return StreamedModel(skeleton, source_of(skeleton), torch.float32)


def _assert_blocks_equal(stream: StreamedModel, eager):
    linears = {f"{stream.prefix}.{i}.{n}.weight" for i, b in enumerate(stream.blocks)
               for n, m in b.named_modules() if isinstance(m, torch.nn.Linear)}
    outside = stream.model.state_dict()
    for name, t in eager.state_dict().items():   # everything outside the blocks' linears is loaded
        if name not in linears:
            assert torch.equal(outside[name], t), name
    for i, ref in enumerate(eager.model.layers):
        block = stream.load_block(i)
        assert stream.loaded == {i}
        for (n, a), (m, b) in zip(block.state_dict().items(), ref.state_dict().items()):
            assert n == m and torch.equal(a, b), n
        stream.release_block(i)
        assert block.self_attn.q_proj.weight.device.type == "meta"


def test_sharded_safetensors_stream_block_by_block(tiny_model, tmp_path):
    sharded = tmp_path / "sharded"
    model = _eager(tiny_model[0])
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    _assert_blocks_equal(_stream(sharded, lambda _: SafetensorsSource(sharded)), model)
    stream, _ = open_streamed(resolve(str(tiny_model[0])))
    _assert_blocks_equal(stream, model)
    assert stream.model.lm_head.weight is stream.model.model.embed_tokens.weight  # tied again
    with stream.fully_loaded() as whole:
        ids = torch.randint(3, 17, (2, 12))
        with torch.no_grad():
            assert torch.equal(whole(ids).logits, model(ids).logits)
    assert stream.loaded == set()


def test_gguf_streams_block_by_block(tmp_path):
    from gguf_writer import write_gguf
    from tiny import make_tiny_llama

    folder = make_tiny_llama(tmp_path / "hf", hidden=64, intermediate=128)   # Q8_0 rows: 32 values
    source = _eager(folder)
    path = write_gguf(source, tmp_path / "tiny.gguf", q8_linears=True)
    eager = _eager(tmp_path, gguf_file=path.name)
    stream = _stream(tmp_path, lambda skeleton: GGUFSource(path, skeleton), gguf_file=path.name)
    _assert_blocks_equal(stream, eager)
    q = stream.load_block(1).self_attn.q_proj.weight       # q rows back in transformers' order
    ref = source.model.layers[1].self_attn.q_proj.weight
    assert (q - ref).abs().max() < 0.01 * ref.abs().max()   # Q8_0 rounding only


def test_teacher_logits_equal_the_fp_models(tiny_model):
    from quipc.frontend.calibration import text_windows
    from quipc.passes.head import final_norm
    from quipc.passes.teacher import TeacherLogits, TeacherStates

    stream, tok = open_streamed(resolve(str(tiny_model[0])))
    windows = text_windows(tok, tiny_model[1], 3, 16)
    states = TeacherStates(stream.model, stream.blocks, windows, "cpu", SINGLE)
    for i in range(len(stream.blocks)):
        states.step(stream.load_block(i))
        stream.release_block(i)
    teacher = TeacherLogits(final_norm(stream.model, stream.blocks), stream.model.lm_head, windows,
                            states.gather(SINGLE))
    eager = _eager(tiny_model[0])
    with torch.no_grad():
        for w in windows:
            assert torch.equal(teacher(input_ids=w[None]).logits, eager(input_ids=w[None]).logits)


def test_sharded_folder_compiles_to_the_same_bytes(tiny_model, tmp_path):
    from test_compile import folder_digest

    sharded = tmp_path / "sharded"
    _eager(tiny_model[0]).save_pretrained(sharded, max_shard_size="20KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / f).write_bytes((tiny_model[0] / f).read_bytes())
    calib = CalibConfig(text=str(tiny_model[1]), windows=4, length=32)
    cfg = QuantConfig(bits=2, format="e8p", head_bits=4)
    compile_model(str(tiny_model[0]), tmp_path / "one", cfg, calib, progress=False)
    compile_model(str(sharded), tmp_path / "shards", cfg, calib, progress=False)
    for d in ("one", "shards"):   # the source is named by the folder's files: drop it
        man = json.loads((tmp_path / d / "manifest.json").read_text())
        man.pop("source"), man.pop("job_key")
        (tmp_path / d / "manifest.json").write_text(json.dumps(man))
    assert folder_digest(tmp_path / "one") == folder_digest(tmp_path / "shards")

"""The lm_head's frequent rows kept at 8 bits (a layer's row patch, quipc_runtime/layer.py;
chosen in quipc/passes/head.py): which rows, the stored tensors and their exact meaning, every
backend computing it (torch reference, C++ kernels, ONNX, TVM), the embedding still decoding
the head's codes, refused malformed patches, and what it costs in bytes."""
import dataclasses

import numpy as np
import pytest
import torch

import quipc
from quipc.compile import CalibConfig, compile_model
from quipc.config import QuantConfig
from quipc.passes import head as headpass
from quipc_runtime import artifact as art
from quipc_runtime import kernels
from quipc_runtime.embedding import head_rows

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="C++ kernels not built")
VOCAB = 64   # tiny_model's


@pytest.fixture(scope="module")
def patched(tiny_model, tmp_path_factory):
    """w2 blocks, a 4-bit tied head with its 8 (= 64 / 8) most frequent rows at 8 bits."""
    model, text = tiny_model
    out = tmp_path_factory.mktemp("rows") / "w2"
    compile_model(str(model), out, QuantConfig(bits=2, seed=2, head_bits=4, head_int8_rows=4096),
                  CalibConfig(text=str(text), windows=8, length=32), progress=False)
    (head,) = art.load_block(out, art.read_manifest(out)["head"])
    return out, head


def test_frequent_rows_by_count_then_id():
    tokens = torch.tensor([[5, 5, 5, 9, 9, 2, 70, -1]])   # 70, -1: outside a vocabulary of 12
    assert headpass.frequent_rows(tokens, 12, 4).tolist() == [0, 2, 5, 9]   # 5, 9, 2, then unseen 0
    assert headpass.frequent_rows(None, 12, 3).tolist() == [0, 1, 2]
    assert headpass.patch_rows(4096, 49152) == 4096 and headpass.patch_rows(4096, 64) == 8
    assert headpass.patch_rows(0, 49152) == 0


def test_patch_is_the_rows_at_8_bits(patched, tiny_model):
    from transformers import AutoModelForCausalLM

    out, head = patched
    src = AutoModelForCausalLM.from_pretrained(tiny_model[0], dtype=torch.float32)
    w = src.get_output_embeddings().weight.detach().numpy()
    assert head.row_ids.dtype == np.int32 and len(head.row_ids) == VOCAB // 8
    assert head.info["rows_8bit"] == VOCAB // 8
    ids, rows = head.row_patch_f32()
    step = head.row_scale.astype(np.float32)[:, None]
    assert np.abs(rows - w[ids]).max() <= (step / 2 + 1e-3 * np.abs(w[ids])).max()
    eff = head.effective_weight()
    np.testing.assert_allclose(eff[ids], rows, rtol=0, atol=0)
    rest = np.setdiff1d(np.arange(VOCAB), ids)
    np.testing.assert_allclose(eff[rest], head_rows(head, rest), rtol=1e-5, atol=1e-6)
    # the codes of the patched rows stay: the embedding decodes them
    assert not np.allclose(head_rows(head, ids), rows)


def test_size_accounting_counts_the_rows(patched):
    out, head = patched
    meta = art.read_manifest(out)["head"]["layers"][0]
    k, n = head.row_values.shape
    plain = dataclasses.replace(head, row_ids=None, row_values=None, row_scale=None)
    assert meta["storage_bits"] == head.storage_bits() == plain.storage_bits() + 8 * (k * n + 2 * k + 4 * k)


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernels", marks=needs_kernels)])
def test_torch_backends_compute_the_patch(patched, backend):
    out, head = patched
    model = quipc.load(out, backend=backend)
    x = torch.randn(2, 5, head.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model.get_output_embeddings()(x)
    want = x.double() @ torch.from_numpy(head.effective_weight()).T
    torch.testing.assert_close(y.double(), want, atol=2e-5, rtol=1e-5)
    ids = torch.arange(VOCAB).reshape(1, -1)
    emb = model.get_input_embeddings()(ids)[0].detach().numpy()
    np.testing.assert_allclose(emb, head_rows(head, np.arange(VOCAB)), atol=1e-5, rtol=1e-5)


def test_onnx_and_tvm_compute_the_patch(patched, tmp_path):
    from quipc.backends.lower import lower_artifact   # --graph auto: what a user gets
    from quipc_runtime.onnx_runtime import OnnxLM

    out, _ = patched
    ids = torch.randint(3, 17, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = quipc.load(out)(ids).logits[0].numpy()
    onnx_path = lower_artifact(out, tmp_path / "onnx", target="onnx", progress=False, accuracy_level=0)
    got = np.asarray(OnnxLM(onnx_path, threads=1).logits(ids.numpy())).reshape(20, -1)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    tvm = pytest.importorskip("tvm")  # noqa: F841
    from quipc.backends.tvm import compile_artifact
    from quipc_runtime.tvm_runtime import TvmLM

    compile_artifact(out, tmp_path / "tvm", progress=False)
    lm = TvmLM(tmp_path / "tvm", threads=1)
    got = np.asarray(lm.logits(ids.numpy())).reshape(20, -1)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():   # KV-cache decode: the decode function's patch too
        gen = quipc.load(out).generate(ids[:, :6], max_new_tokens=6, do_sample=False, eos_token_id=None,
                                       pad_token_id=0)[0].tolist()
    assert lm.generate(ids[0, :6].numpy(), 6, stop_at_eos=False)[0].tolist() == gen


def test_malformed_patches_are_refused(patched):
    _, head = patched
    bad = {"unsorted": dict(row_ids=head.row_ids[::-1].copy()),
           "out of range": dict(row_ids=np.append(head.row_ids[1:], VOCAB).astype(np.int32)),
           "wrong dtype": dict(row_values=head.row_values.astype(np.int16)),
           "half a patch": dict(row_scale=None)}
    for what, change in bad.items():
        with pytest.raises(ValueError, match="lm_head"):
            dataclasses.replace(head, **change).validate()


def test_no_rows_without_the_flag(tiny_model, tmp_path):
    model, text = tiny_model
    out = tmp_path / "w2"
    compile_model(str(model), out, QuantConfig(bits=2, seed=2, head_bits=4, method="rtn"),
                  CalibConfig(text=str(text), windows=8, length=32), progress=False)
    (head,) = art.load_block(out, art.read_manifest(out)["head"])
    assert not head.has_row_patch and "rows_8bit" not in head.info


@needs_kernels
def test_a_bare_kernel_plan_refuses_the_patch(patched):
    with pytest.raises(ValueError, match="rows at 8 bits"):
        kernels.prepare(patched[1])

"""End-to-end fine-tuning (quipc.passes.finetune, quipc.finetune_stage): it lowers the KL it
optimizes, keeps every code, and writes a complete artifact."""
import numpy as np
import pytest
import torch

import quipc
from quipc.compile import CalibConfig, compile_model
from quipc.config import QuantConfig
from quipc.frontend import calibration
from quipc.passes.finetune import FinetuneConfig, _kl, finetune_e2e
from quipc_runtime import artifact as art


def _layers(folder):
    return art.load_layers(folder, art.read_manifest(folder))


@pytest.fixture(scope="module")
def pair(tiny_model, tmp_path_factory):
    model, text = tiny_model
    root = tmp_path_factory.mktemp("ft")
    calib = CalibConfig(text=str(text), windows=12, length=32)
    for mode in ("none", "e2e"):
        compile_model(str(model), root / mode, QuantConfig(bits=2, seed=3, finetune=mode,
                                                           finetune_epochs=2), calib, progress=False)
    return root / "none", root / "e2e"


def test_finetune_keeps_codes_and_changes_only_continuous_values(pair):
    plain, tuned = _layers(pair[0]), _layers(pair[1])
    assert plain.keys() == tuned.keys()
    changed = 0
    for name, a in plain.items():
        b = tuned[name]
        assert np.array_equal(a.codes, b.codes) and a.format == b.format
        changed += int(not np.array_equal(a.scale, b.scale)) + int(not np.array_equal(a.in_scale, b.in_scale))
    assert changed > 0
    man = art.read_manifest(pair[1])
    assert man["complete"] and man["finetune"]["mode"] == "e2e"
    hist = man["finetune"]["holdout_kl"]
    assert hist[man["finetune"]["kept_epoch"]] == min(hist)
    files = {p.relative_to(pair[1]).as_posix() for p in pair[1].rglob("*.safetensors")}
    assert files == set(art.data_files(man)) - {"manifest.json"}   # the rounded files are gone
    quipc.load(pair[1])


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_finetune_lowers_the_kl_it_optimizes(tiny_model, pair, schedule):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, text = tiny_model
    teacher = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model)
    windows = calibration.text_windows(tok, str(text), 12, 32)
    student = quipc.load(pair[0])

    def train_kl():
        with torch.no_grad():
            return float(np.mean([_kl(teacher(input_ids=w[None]).logits, student(input_ids=w[None]).logits)
                                  for w in windows[:-4]]))

    before = train_kl()
    names = list(_layers(pair[0]))
    result = finetune_e2e(student, teacher, names, windows, FinetuneConfig("e2e", epochs=2, holdout=4, lr=2e-3,
                                                                           schedule=schedule))
    assert train_kl() < before
    assert result["record"]["holdout_kl"][result["record"]["kept_epoch"]] <= result["record"]["holdout_kl"][0]


def test_finetune_settings_are_checked():
    with pytest.raises(ValueError, match="unknown fine-tuning mode"):
        QuantConfig(finetune="block2").validate()
    with pytest.raises(ValueError, match="rtn"):
        QuantConfig(method="rtn", finetune="e2e").validate()
    with pytest.raises(ValueError, match="learning-rate schedule"):
        FinetuneConfig("e2e", schedule="linear").validate()


def test_tied_head_is_finetuned_and_the_embedding_follows_it(tiny_model, tmp_path):
    """A quantized tied lm_head is trained like the block linears (codes kept), and the
    embedding decoded from its codes computes during training exactly what the stored head
    gives once the trained values are folded into its fp16 tensors."""
    from quipc.passes.finetune import TiedTunableEmbedding, TunableQuipLinear
    from quipc_runtime.embedding import head_rows
    from quipc_runtime.modules import QuipLinearRef

    model, text = tiny_model
    calib = CalibConfig(text=str(text), windows=12, length=32)
    folders = {}
    for mode in ("none", "e2e"):
        folders[mode] = tmp_path / mode
        compile_model(str(model), folders[mode], QuantConfig(bits=2, seed=3, head_bits=4, finetune=mode,
                                                             finetune_epochs=1), calib, progress=False)
    heads = {mode: art.load_block(f, art.read_manifest(f)["head"])[0] for mode, f in folders.items()}
    man = art.read_manifest(folders["e2e"])
    assert man["embedding"]["kind"] == "head" and man["head"]["file"].endswith("_ft.safetensors")
    assert not (folders["e2e"] / art.read_manifest(folders["none"])["head"]["file"]).exists()
    assert np.array_equal(heads["none"].codes, heads["e2e"].codes)
    assert not np.array_equal(heads["none"].scale, heads["e2e"].scale)

    layer = heads["none"]
    tunable = TunableQuipLinear(QuipLinearRef(layer))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        tunable.row_gain.mul_(1 + 0.1 * torch.randn(layer.out_features, generator=gen))
        tunable.in_scale.mul_(1 + 0.1 * torch.randn(layer.in_features, generator=gen))
    ids = torch.tensor([[0, 5, 17, 3], [2, 2, 9, 1]])
    stored = tunable.apply_to(layer)
    with torch.no_grad():
        got = TiedTunableEmbedding(tunable)(ids).numpy()
        x = torch.randn(3, layer.in_features, generator=gen)
        y_train, y_stored = tunable(x).numpy(), QuipLinearRef(stored)(x).numpy()
    np.testing.assert_allclose(got, head_rows(stored, ids.numpy()), rtol=2e-3, atol=2e-3 * np.abs(got).max())
    np.testing.assert_allclose(y_train, y_stored, rtol=2e-3, atol=2e-3 * np.abs(y_train).max())
    quipc.load(folders["e2e"])


@pytest.mark.parametrize("patch", [False, True])
def test_tunable_linear_dense_path_is_the_activation_path(patch):
    """Batches of many rows go through one dense weight (QuipLinearRef.dense_weight_with) instead
    of the factors over the activations: the same outputs and the same gradients for in_scale
    and the row gains, patched rows included."""
    import dataclasses

    from quipc.passes.finetune import TunableQuipLinear
    from quipc_runtime.modules import QuipLinearRef
    from test_kernels import make_layer

    m, n = 48, 24
    layer = make_layer(m, n, 2, seed=5, bias=not patch)
    if patch:
        rng = np.random.default_rng(1)
        layer = dataclasses.replace(layer, row_ids=np.array([3, 17, 40], np.int32),
                                    row_values=rng.integers(-127, 128, (3, n)).astype(np.int8),
                                    row_scale=np.full(3, 0.01, np.float16))
        layer.validate()
    tunable = TunableQuipLinear(QuipLinearRef(layer))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        tunable.row_gain.mul_(1 + 0.1 * torch.randn(m, generator=gen))
    x = torch.randn(2, 40, n, generator=gen)    # 80 rows >= max(m, n): the dense path
    weights = torch.linspace(-1, 1, m)
    grads = []
    for y in (lambda: tunable(x), lambda: tunable.ref.apply_with(x, tunable.in_scale, tunable.row_gain)):
        tunable.zero_grad()
        out = y()
        (out * weights).sum().backward()
        grads.append((out.detach(), tunable.in_scale.grad.clone(), tunable.row_gain.grad.clone()))
    for a, b in zip(*grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    with torch.no_grad():   # a few rows take the activation path: the same layer
        np.testing.assert_allclose(tunable(x[0, :2]).numpy(), grads[1][0][0, :2].numpy(),
                                   rtol=1e-4, atol=1e-5 * float(grads[1][0].abs().max()))

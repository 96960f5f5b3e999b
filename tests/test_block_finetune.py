"""Fine-tuning within a block (quipc.passes.block_finetune): rounds follow the block's inputs,
tuning lowers the loss it optimizes without touching a rounded code, and `--finetune block|all`
writes a complete artifact that every path loads."""
import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import quipc
from quipc.compile import CalibConfig, compile_model
from quipc.config import QuantConfig
from quipc.distributed import Group
from quipc.frontend import calibration
from quipc.frontend.trace import find_blocks
from quipc.passes import sequential as seq
from quipc.passes.block_finetune import block_loss, input_rounds, round_block_tuned
from quipc.passes.finetune import FinetuneConfig
from quipc.passes.spread import encode_block
from quipc_runtime import artifact as art

CFG = QuantConfig(bits=2, seed=3, format="e8p", finetune="block")


@pytest.fixture(scope="module")
def block0(tiny_model):
    model_dir, text = tiny_model
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    windows = calibration.text_windows(AutoTokenizer.from_pretrained(model_dir), str(text), 12, 32)
    prefix, blocks = find_blocks(model)
    inputs = seq.capture_first_block_inputs(model, blocks, windows, 4, "cpu")
    names = seq._block_linears(blocks[0], inputs)
    return blocks[0], inputs, names, {n: f"{prefix}.0.{n}" for n in names}


def _round(block0, steps: int):
    block, inputs, names, full = block0
    block = copy.deepcopy(block)
    targets = seq.run_block(block, inputs)
    layers, record = round_block_tuned(
        block, inputs, names, full, CFG,
        lambda blk, rn, h: encode_block(blk, rn, h, full, CFG),
        lambda blk, rn: seq.calibrate_block(blk, inputs, rn),
        ft=FinetuneConfig(mode="block", block_steps=steps, seed=0))
    assert all(type(block.get_submodule(n)) is torch.nn.Linear for n in names)   # modules restored
    seq.install_quantized(block, dict(zip(names, layers)))
    loss = float(sum(block_loss(o, t) for o, t in zip(seq.run_block(block, inputs)[:-1], targets[:-1])))
    return dict(zip(names, layers)), record, loss


def test_block_loss_weighs_every_token_alike():
    """A token with massive activations (an attention sink) counts as much as any other, as it
    does after the next RMSNorm; a plain relative MSE would be ruled by it."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 5, 8, generator=g)
    out = target + 0.1 * torch.randn(2, 5, 8, generator=g)
    per_token = ((out - target).pow(2).sum(-1) / target.pow(2).sum(-1)).mean()
    assert torch.allclose(block_loss(out, target), per_token)
    scale = torch.ones(2, 5, 1)
    scale[0, 0] = 1000.0   # one token 1000x larger, its error in proportion
    assert torch.allclose(block_loss(out * scale, target * scale), per_token)
    plain = (out * scale - target * scale).pow(2).mean() / (target * scale).pow(2).mean()
    assert not torch.allclose(plain, per_token, rtol=0.1)


def test_rounds_follow_the_inputs(block0):
    block, inputs, names, _ = block0
    assert input_rounds(block, inputs, names) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_tuning_lowers_the_block_loss_and_keeps_the_codes(block0):
    plain, rec0, loss0 = _round(block0, 0)
    tuned, rec, loss = _round(block0, 12)
    assert [r["steps"] for r in rec0["rounds"]] == [0, 0, 0, 0]
    assert [r["steps"] for r in rec["rounds"]] == [12, 12, 12, 12]
    assert loss < 0.9 * loss0, (loss, loss0)
    for r in rec["rounds"]:   # a round keeps its values only when the held-out batch improves
        assert r["kept"] == (r["held_after"] < r["held_before"])
    assert any(r["kept"] for r in rec["rounds"])
    # q/k/v are rounded before any tuning: their codes are the plain rounding's; tuning moved
    # only their continuous values (fp16 row scales, in_scale)
    for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert np.array_equal(plain[n].codes, tuned[n].codes)
    assert any(not np.array_equal(plain[n].scale, tuned[n].scale) for n in plain)
    # later rounds were rounded from tuned weights: some codes differ
    assert any(not np.array_equal(plain[n].codes, tuned[n].codes) for n in ("mlp.down_proj", "self_attn.o_proj"))


def test_refuses_several_ranks(block0):
    block, inputs, names, full = block0
    with pytest.raises(ValueError, match="one process"):
        round_block_tuned(block, inputs, names, full, CFG, None, None, Group(rank=0, world=2))


def test_modes():
    assert FinetuneConfig(mode="all").block and FinetuneConfig(mode="all").e2e
    assert FinetuneConfig(mode="block").block and not FinetuneConfig(mode="block").e2e
    assert not FinetuneConfig(mode="e2e").block
    with pytest.raises(ValueError, match="fine-tuning mode"):
        FinetuneConfig(mode="blocks").validate()


@pytest.mark.parametrize("mode", ["block", "all"])
def test_compile_with_block_finetuning(tiny_model, tmp_path, mode):
    model, text = tiny_model
    out = tmp_path / mode
    compile_model(str(model), out, QuantConfig(bits=2, seed=3, format="e8p", finetune=mode),
                  CalibConfig(text=str(text), windows=12, length=32), progress=False)
    man = art.read_manifest(out)
    assert man["complete"] and ("finetune" in man) == (mode == "all")
    layers = art.load_layers(out, man)
    assert all("block_finetune" in layer.info for layer in layers.values())
    lm = quipc.load(out)
    with torch.no_grad():
        assert torch.isfinite(lm(input_ids=torch.arange(8)[None]).logits).all()


def test_inspect_reports_block_finetuning(tiny_model, tmp_path):
    from quipc.inspect_artifact import render

    model, text = tiny_model
    compile_model(str(model), tmp_path / "b", QuantConfig(bits=2, seed=3, format="e8p", finetune="block"),
                  CalibConfig(text=str(text), windows=12, length=32), progress=False)
    assert "block fine-tuning: 2 blocks, held-out relative error" in render(tmp_path / "b")

"""The CLI: clear one-line errors (no traceback), nothing half-written, the happy paths."""
import json

import pytest
import torch

from quipc.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, words):
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("quipc: error:")
    assert words in last


def test_unknown_model(capsys, tmp_path):
    code, _, err = run(capsys, "compile", tmp_path / "nope", "-o", tmp_path / "out")
    assert_clean_error(code, err, "not found")
    assert not (tmp_path / "out").exists()


def test_file_that_is_not_a_model(capsys, tmp_path):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"\x00" * 64)
    code, _, err = run(capsys, "compile", junk, "-o", tmp_path / "out")
    assert_clean_error(code, err, "not a GGUF file")
    (tmp_path / "weights.bin").write_bytes(b"hello")
    code, _, err = run(capsys, "compile", tmp_path / "weights.bin", "-o", tmp_path / "out")
    assert_clean_error(code, err, "not a model quipc can read")
    assert not (tmp_path / "out").exists()


def test_unsupported_bits(capsys, tiny_model, tmp_path):
    code, _, err = run(capsys, "compile", tiny_model[0], "--bits", 5, "-o", tmp_path / "out")
    assert_clean_error(code, err, "unsupported bits 5")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["rtn", "quip"])
def test_nan_weights(capsys, tiny_model, tmp_path, method):
    """The tensor that holds the NaN is named, also where calibration and block fine-tuning
    (quip's defaults) would otherwise have spread it to the block's other layers first."""
    from tiny import make_tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model[0])
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    make_tokenizer().save_pretrained(tmp_path / "nan")
    calib = ["--calib", tiny_model[1], "--calib-windows", 2, "--calib-len", 32, "--no-progress"]
    code, _, err = run(capsys, "compile", tmp_path / "nan", "--method", method, *(calib if method == "quip" else []),
                       "-o", tmp_path / "out")
    assert_clean_error(code, err, "model.layers.1.mlp.up_proj.weight: the weight holds NaN or Inf (1 of")
    assert (tmp_path / "out" / "blocks").is_dir()   # block 0, done before, is kept for --resume


def test_model_without_linear_layers(capsys, tmp_path):
    """GPT-2 keeps its projections in Conv1D modules: refused, naming the family and what its
    blocks hold."""
    from tiny import make_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(
        tmp_path / "gpt2")
    make_tokenizer().save_pretrained(tmp_path / "gpt2")
    code, _, err = run(capsys, "compile", tmp_path / "gpt2", "--method", "rtn", "-o", tmp_path / "out")
    assert_clean_error(code, err, "in GPT2LMHeadModel (model_type 'gpt2'); its blocks (transformer.h) hold no "
                                  "torch.nn.Linear, only Conv1D")


@pytest.mark.parametrize("keep", [0.01, 0.9])
def test_truncated_safetensors(capsys, tiny_model, tmp_path, keep):
    import shutil

    folder = tmp_path / "cut"
    shutil.copytree(tiny_model[0], folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:int(len(data) * keep)])
    code, _, err = run(capsys, "compile", folder, "--method", "rtn", "-o", tmp_path / "out")
    assert_clean_error(code, err, "model.safetensors is not a readable safetensors file")


def test_compile_inspect_eval(capsys, tiny_model, tmp_path):
    model, text = tiny_model
    out = tmp_path / "w4"
    code, stdout, _ = run(capsys, "compile", model, "--bits", 4, "--calib", text, "--calib-windows", 4,
                          "--calib-len", 32, "--no-progress", "-o", out)
    assert code == 0 and "bpw" in stdout
    code, stdout, _ = run(capsys, "inspect", out)
    assert code == 0 and "model.layers.1.mlp.down_proj" in stdout and "bpw" in stdout
    assert " e8p " in stdout and "fine-tuning: all, held-out KL" in stdout   # the CLI's defaults with --calib
    assert "block fine-tuning: 2 blocks" in stdout
    code, stdout, _ = run(capsys, "eval", out, "--text", text, "--ctx", 64, "--windows", 3, "--json", "--no-progress")
    result = json.loads(stdout)
    assert code == 0 and result["windows"] == 3 and result["tokens"] == 3 * 63 and result["ctx"] == 64
    code, stdout, _ = run(capsys, "eval", model, "--text", text, "--ctx", 64, "--windows", 3, "--json", "--no-progress")
    fp = json.loads(stdout)
    assert 1 < fp["ppl"] < 1e4 and fp["ppl"] != result["ppl"]
    code, _, err = run(capsys, "compile", model, "--bits", 4, "-o", out)
    assert_clean_error(code, err, "already exists")


def test_chat_prints_the_greedy_answer(capsys, tiny_model, tmp_path, monkeypatch):
    """`quipc chat` answers with the same tokens as generate() on the loaded artifact."""
    import quipc
    from quipc.compile import CalibConfig, compile_model
    from quipc.config import QuantConfig
    from quipc.eval.chat import answer_ids
    from quipc_runtime.loader import load_tokenizer

    model, text = tiny_model
    out = tmp_path / "a"
    compile_model(str(model), out, QuantConfig(bits=4), CalibConfig(text=str(text), windows=4, length=32),
                  progress=False)
    code, stdout, _ = run(capsys, "chat", out, "the", "--max-new-tokens", 6)   # backend auto: the kernels
    tok = load_tokenizer(out)
    expect = answer_ids(quipc.load(out), tok, "the", 6)                          # the reference path
    assert code == 0 and len(expect) > 0 and stdout.rstrip("\n") == tok.decode(expect)
    code, _, _ = run(capsys, "compile", out, "--target", "onnx", "-o", tmp_path / "onnx", "--no-progress")
    assert code == 0
    code, stdout, _ = run(capsys, "chat", tmp_path / "onnx", "the", "--max-new-tokens", 6)
    assert code == 0 and stdout.rstrip("\n") == tok.decode(expect)
    code, _, err = run(capsys, "chat", tmp_path / "onnx", "the", "--device", "cuda")
    assert_clean_error(code, err, "--device cuda")
    code, _, err = run(capsys, "chat", out, "the", "--max-new-tokens", 0)
    assert_clean_error(code, err, "max-new-tokens")
    code, _, err = run(capsys, "chat", out, "")
    assert_clean_error(code, err, "the prompt is empty")
    code, _, err = run(capsys, "eval", out, "--text", tmp_path / "nope.txt")
    assert_clean_error(code, err, "text file")
    seen = []        # --trellis-as-int8 (default: all) and --activations (default: int8) reach the loader
    real_load = quipc.load

    def spy(*a, **kw):
        seen.append((kw.get("trellis_as_int8"), kw.get("int8_activations")))
        return real_load(*a, **kw)

    import quipc_runtime
    monkeypatch.setattr(quipc_runtime, "load", spy)
    assert run(capsys, "chat", out, "the", "--max-new-tokens", 1)[0] == 0
    assert run(capsys, "chat", out, "the", "--max-new-tokens", 1, "--trellis-as-int8", "head",
               "--activations", "fp32")[0] == 0
    assert run(capsys, "chat", out, "the", "--max-new-tokens", 1, "--backend", "reference")[0] == 0
    assert seen == [("all", True), ("head", False), ("all", False)]


TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")


def test_chat_without_a_prompt_holds_a_conversation(capsys, tiny_model, tmp_path, monkeypatch):
    """`quipc chat TARGET` reads user turns from stdin until an empty line; each answer follows the
    earlier turns and answers through the chat template (the reference path's tokens); a tokenizer
    without a template is refused before anything is read."""
    import io

    import quipc
    from quipc.compile import CalibConfig, compile_model
    from quipc.config import QuantConfig
    from quipc.eval.chat import conversation_ids, reply_ids
    from quipc_runtime.loader import load_tokenizer

    model, text = tiny_model
    out = tmp_path / "a"
    compile_model(str(model), out, QuantConfig(bits=4), CalibConfig(text=str(text), windows=4, length=32),
                  progress=False)
    monkeypatch.setattr("sys.stdin", io.StringIO("the\n"))
    code, _, err = run(capsys, "chat", out)
    assert_clean_error(code, err, "chat template")
    tok = load_tokenizer(out)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(out / "tokenizer")
    ref, messages, expect = quipc.load(out), [], []
    for turn in ("the", "of"):
        messages.append({"role": "user", "content": turn})
        answer = tok.decode(reply_ids(ref, tok, conversation_ids(tok, messages), 5))
        messages.append({"role": "assistant", "content": answer})
        expect.append(answer)
    import quipc.eval.chat as chat

    seen = []   # the ids each turn runs: the whole conversation so far

    def spy(model, tokenizer, ids, max_new_tokens):
        seen.append(ids[0].tolist())
        return reply_ids(model, tokenizer, ids, max_new_tokens)

    monkeypatch.setattr(chat, "reply_ids", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("the\nof\n\nnever read\n"))
    code, stdout, _ = run(capsys, "chat", out, "--max-new-tokens", 5)
    assert code == 0 and stdout == "".join(a + "\n" for a in expect)
    assert seen == [conversation_ids(tok, messages[:1])[0].tolist(), conversation_ids(tok, messages[:3])[0].tolist()]


def test_model_folder_without_tokenizer(capsys, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_model[0]).save_pretrained(tmp_path / "m")
    code, _, err = run(capsys, "compile", tmp_path / "m", "--method", "rtn", "-o", tmp_path / "out")
    assert_clean_error(code, err, "could not load a tokenizer")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, expect", [
    (["m", "-o", "x"], ("e8p", "all", 1)),                                     # data-free, 2 bits
    (["m", "-o", "x", "--target", "onnx"], ("e8p", "all", 1)),
    (["m", "-o", "x", "--target", "tvm", "--finetune", "none"], ("e8p", "none", 1)),
    (["m.onnx", "-o", "x"], ("e8p", "none", 1)),
    (["m", "-o", "x", "--method", "rtn"], ("e8p", "none", 1)),
    (["m", "-o", "x", "--format", "grid"], ("grid", "all", 1)),
    (["m", "-o", "x", "--bits", "3"], ("auto", "e2e", 1)),                      # data-free (stops 53, 56)
    (["m", "-o", "x", "--workers", "2"], ("e8p", "e2e", 2)),
    (["m", "-o", "x", "--workers", "2", "--finetune-step-windows", "1"], ("e8p", "e2e", 1)),
    (["m", "-o", "x", "--finetune-step-windows", "3"], ("e8p", "all", 3)),
    (["m", "-o", "x", "--workers", "2", "--finetune-step-windows", "0"], ("e8p", "e2e", 0)),   # refused later
    (["m", "-o", "x", "--calib", "t.txt"], ("e8p", "all", 1)),                  # 2 bits
    (["m", "-o", "x", "--calib", "t.txt", "--bits", "3"], ("auto", "all", 1)),  # trellis on whole tiles
    (["m", "-o", "x", "--calib", "t.txt", "--bits", "4"], ("auto", "all", 1)),
    (["m", "-o", "x", "--calib", "t.txt", "--bits", "4", "--format", "e8p"], ("e8p", "all", 1)),
    (["m", "-o", "x", "--bits", "4"], ("auto", "all", 1)),                      # data-free (stops 53, 55)
    (["m.onnx", "-o", "x", "--bits", "4"], ("e8p", "none", 1)),
    (["m.onnx", "-o", "x", "--calib", "t.txt", "--bits", "4"], ("e8p", "none", 1)),
    (["m", "-o", "x", "--calib", "t.txt", "--format", "auto"], ("auto", "all", 1)),
    (["m", "-o", "x", "--calib", "t.txt", "--workers", "2"], ("e8p", "e2e", 2)),
    (["m.onnx", "-o", "x", "--calib", "t.txt"], ("e8p", "none", 1)),
])
def test_compile_defaults_per_target(argv, expect):
    """Without flags every target gets the benchmark's best format and fine-tuning, data-free
    or with --calib (an .onnx input is not fine-tuned: its frontend has no teacher to match;
    several ranks skip the block stage, which runs in one process, and share each e2e step's
    two windows)."""
    from quipc.cli import build_parser
    from quipc.compile_command import format_and_finetune

    assert format_and_finetune(build_parser().parse_args(["compile", *argv])) == expect


def test_compile_onnx_accuracy_level_argument(capsys):
    """--onnx-accuracy-level: auto by default (None: per code format, onnx.emitter), or 0-4."""
    from quipc.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["compile", "m", "-o", "x"]).onnx_accuracy_level is None
    assert parse(["compile", "m", "-o", "x", "--onnx-accuracy-level", "auto"]).onnx_accuracy_level is None
    assert parse(["compile", "m", "-o", "x", "--onnx-accuracy-level", "4"]).onnx_accuracy_level == 4
    with pytest.raises(SystemExit):
        parse(["compile", "m", "-o", "x", "--onnx-accuracy-level", "5"])
    assert "expected auto or 0-4" in capsys.readouterr().err

@pytest.mark.parametrize("argv,expect", [
    (["m", "-o", "x"], 5e-4),
    (["m", "-o", "x", "--bits", "4"], 1e-4),                      # data-free: after the block stage too
    (["m", "-o", "x", "--bits", "4", "--finetune", "e2e"], 5e-4),  # e2e alone
    (["m", "-o", "x", "--bits", "3", "--calib", "t.txt"], 5e-4),
    (["m", "-o", "x", "--bits", "4", "--calib", "t.txt"], 1e-4),   # after the block stage
    (["m", "-o", "x", "--bits", "4", "--calib", "t.txt", "--finetune", "e2e"], 5e-4),
    (["m", "-o", "x", "--bits", "4", "--finetune-lr", "3e-4"], 3e-4),
])
def test_compile_finetune_lr_default_per_width(argv, expect):
    """e2e fine-tuning's learning rate: 5e-4, and 1e-4 at 4 bits after the block stage (where
    5e-4 made the held-out KL worse; quipc.config), unless told; it reaches the compile's
    QuantConfig (and so its job key and manifest)."""
    from quipc.cli import build_parser
    from quipc.compile_command import finetune_lr, format_and_finetune
    from quipc.config import QuantConfig

    args = build_parser().parse_args(["compile", *argv])
    lr = finetune_lr(args, format_and_finetune(args)[1])
    assert lr == expect
    assert QuantConfig(finetune="e2e", finetune_lr=lr).validate().finetune_config().lr == expect
    with pytest.raises(ValueError, match="lr > 0"):
        QuantConfig(finetune="e2e", finetune_lr=0.0).validate()


@pytest.mark.parametrize("argv,expect", [
    (["m", "-o", "x"], False),                                   # 2 bits: fp32's answers got worse
    (["m", "-o", "x", "--bits", "4"], True),
    (["m", "-o", "x", "--bits", "3"], False),                    # not measured
    (["m", "-o", "x", "--bits", "4", "--calib", "t.txt"], False),
    (["m", "-o", "x", "--finetune-tie-inputs"], True),
    (["m", "-o", "x", "--bits", "4", "--no-finetune-tie-inputs"], False),
])
def test_compile_tie_inputs_default_per_width(argv, expect):
    """Tied input scales: data-free at 4 bits, where every reading measured better (quipc.config);
    the flags win; the choice reaches the compile's fine-tuning settings."""
    from quipc.cli import build_parser
    from quipc.compile_command import tie_inputs
    from quipc.config import QuantConfig

    tie = tie_inputs(build_parser().parse_args(["compile", *argv]))
    assert tie is expect
    assert QuantConfig(finetune="all", finetune_tie_inputs=tie).finetune_config().tie_inputs is expect


@pytest.mark.parametrize("argv,expect", [
    (["m", "-o", "x"], "auto"),                         # trellis on whole 16x16 tiles, else e8p, grid
    (["m", "-o", "x", "--calib", "t.txt"], "auto"),
    (["m", "-o", "x", "--calib", "t.txt", "--head-format", "grid"], "grid"),
    (["m", "-o", "x", "--head-format", "trellis"], "trellis"),
])
def test_compile_head_format_default_per_calibration(argv, expect):
    """The head's code format: the trellis head (auto) with and without --calib, where it
    measured best (quipc.config); an explicit --head-format wins."""
    from quipc.cli import build_parser
    from quipc.compile_command import head_format

    assert head_format(build_parser().parse_args(["compile", *argv])) == expect


@pytest.mark.parametrize("argv,expect", [
    (["m", "-o", "x"], 0.0),                                         # data-free: its own conversations
    (["m", "-o", "x", "--calib", "t.txt"], 0.25),
    (["m", "-o", "x", "--calib", "t.txt", "--calib-chat", "0"], 0.0),
    (["m", "-o", "x", "--calib", "t.txt", "--calib-chat", "0.5"], 0.5),
    (["m.onnx", "-o", "x", "--calib", "t.txt"], 0.0),               # no generation on an .onnx input
])
def test_compile_chat_share_default(argv, expect):
    """With --calib a quarter of a chat model's calibration windows are conversations unless told otherwise
    (quipc.config.CLI_CALIB_CHAT); an .onnx input has none."""
    from quipc.cli import build_parser
    from quipc.compile_command import calib_chat

    assert calib_chat(build_parser().parse_args(["compile", *argv])) == expect


def test_compile_refuses_a_chat_share_for_an_onnx_input():
    from quipc.cli import build_parser
    from quipc.compile_command import calib_chat

    args = build_parser().parse_args(["compile", "m.onnx", "-o", "x", "--calib", "t.txt", "--calib-chat", "0.5"])
    with pytest.raises(ValueError, match="--calib-chat needs a Hugging Face"):
        calib_chat(args)


def test_unknown_format_is_refused_before_any_work(capsys, tmp_path):
    code, _, err = run(capsys, "compile", tmp_path / "nope", "-o", tmp_path / "out", "--target", "onnx",
                       "--format", "e9q")
    assert_clean_error(code, err, "unknown code format 'e9q'")
    assert not (tmp_path / "out").exists()


def test_zero_windows_per_step_is_refused_before_any_work(capsys, tmp_path):
    code, _, err = run(capsys, "compile", tmp_path / "nope", "-o", tmp_path / "out", "--finetune-step-windows", "0")
    assert_clean_error(code, err, "at least 1 window per step")
    assert not (tmp_path / "out").exists()

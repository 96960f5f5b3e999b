"""The `quipc` command: compile, eval, chat, inspect, bench."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from quipc_runtime.int8_rows import TRELLIS_AS_INT8

from .compile_command import cmd_compile

EXIT_USAGE, EXIT_FAIL = 2, 1


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    from .config import (CLI_FINETUNE_LR, CLI_FINETUNE_LR_AFTER_BLOCK, CLI_FINETUNE_STEP_WINDOWS,
                         CLI_FINETUNE_STEP_WINDOWS_RANKS, CLI_FINETUNE_TIE_INPUTS_DATAFREE, QuantConfig)

    d = QuantConfig()
    p.add_argument("--method", default=d.method, help="rtn | ldlq | quip (default)")
    p.add_argument("--bits", type=int, default=d.bits, help="2, 3 or 4")
    p.add_argument("--incoherence", default=d.incoherence,
                   help="quip transform: hadamard (falls back to kron where needed) | kron")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--damp", type=float, default=d.damp, help="relative Hessian damping")
    p.add_argument("--greedy-passes", type=int, default=d.greedy_passes)
    p.add_argument("--rescale", action="store_true", help="QuIP's diagonal rescaling (off by default)")
    p.add_argument("--grid", default=d.grid, help="per-row grid range: mse (default) | minmax")
    p.add_argument("--format", default=None,
                   help="code format of the rotated weights: e8p (E8-lattice vector codes, residual "
                        "stages at 3/4 bits; the default data-free, and with --calib at 2 bits) | trellis "
                        "(tail-biting trellis codes on 16x16 tiles: lowest error; at 2 bits slower CPU decode) "
                        "| trellis256 (the same trellis with a 256-value int8 code: lower error still, and "
                        "exact on the kernels' 8-bit rows) "
                        "| auto (per layer: trellis where the shape is whole 16x16 tiles, else e8p, else grid; "
                        "the default with --calib at 3 and 4 bits) | grid (per-row scalar grid)")
    p.add_argument("--finetune", default=None,
                   help="none | block | e2e | all. block: round each decoder block's linears input by "
                        "input, training in between what is still continuous (input and row scales, "
                        "weights not rounded yet) to match the fp block's outputs; e2e: after rounding, "
                        "train input and row scales and norms to match the unquantized model's logits "
                        "on the calibration text; all: both (default: all with --calib and data-free at 2 bits, e2e "
                        "data-free at 3 and 4 bits or with several ranks, none for rtn and .onnx inputs)")
    p.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs)
    p.add_argument("--finetune-lr", type=float, default=None,
                   help=f"e2e fine-tuning: Adam's learning rate (default {CLI_FINETUNE_LR:g}; after the block "
                        "stage " + ", ".join(f"{lr:g} at {b} bits" for b, lr in CLI_FINETUNE_LR_AFTER_BLOCK.items())
                        + ")")
    p.add_argument("--finetune-tie-inputs", action=argparse.BooleanOptionalAction, default=None,
                   help="block and e2e fine-tuning: one input scale per set of linears reading the same tensor "
                        "(q/k/v, gate/up), so that the ONNX custom-op library runs each set as one "
                        "QuipLinearGroup node (default: data-free at "
                        + ", ".join(str(b) for b, on in CLI_FINETUNE_TIE_INPUTS_DATAFREE.items() if on)
                        + " bits, else off)")
    p.add_argument("--finetune-step-windows", type=int, default=None,
                   help="e2e fine-tuning: calibration windows per Adam step, their gradients summed "
                        f"(several ranks share a step's windows; default {CLI_FINETUNE_STEP_WINDOWS}, "
                        f"{CLI_FINETUNE_STEP_WINDOWS_RANKS} with --workers / under torchrun)")


def head_format_choices() -> tuple[str, ...]:
    """Every registered code format, and auto."""
    from quipc_runtime.formats import FORMATS

    from .passes.encoders import AUTO

    return (*sorted(FORMATS), AUTO)


def _add_head_args(p: argparse.ArgumentParser) -> None:
    from .config import (CLI_EMBED_BITS, CLI_HEAD_BITS, CLI_HEAD_FORMAT, CLI_HEAD_INT8_ROWS, CLI_HEAD_REFIT_DAMP,
                         EMBED_CHOICES)

    p.add_argument("--head-bits", type=int, default=CLI_HEAD_BITS,
                   help=f"lm_head bits: 2, 3, 4, or 32 to keep it dense (default {CLI_HEAD_BITS})")
    p.add_argument("--head-format", default=None, choices=head_format_choices(),
                   help="lm_head's code format (and so the shared embedding's): grid decodes fastest, trellis "
                        f"loses least (see docs/results/whole-model.md; default {CLI_HEAD_FORMAT}: trellis "
                        "where the head is whole 16x16 tiles, else e8p, else grid)")
    p.add_argument("--head-refit-damp", type=float, default=None,
                   help="with e2e fine-tuning: quantize lm_head again after it, on the fine-tuned model's final "
                        "hidden states, at this Hessian damping (0: no refit; default, data-free with a quantized "
                        f"head and an e2e stage: {CLI_HEAD_REFIT_DAMP} by --bits, else 0; see "
                        "docs/results/whole-model.md)")
    p.add_argument("--head-int8-rows", type=int, default=CLI_HEAD_INT8_ROWS,
                   help="lm_head rows of the most frequent calibration tokens kept at 8 bits, e.g. 4096 "
                        f"(at most a vocabulary's eighth; 0: none; default {CLI_HEAD_INT8_ROWS}; see "
                        "docs/results/whole-model.md)")
    p.add_argument("--embed-bits", default=CLI_EMBED_BITS, choices=EMBED_CHOICES,
                   help="embedding table: head (a tied model's one table: the lm_head's codes), 8 (per row) "
                        "or 4 (per group of 32) integer tables, 16 / 32 dense; auto (default): head for a "
                        "tied model with a quantized lm_head, else 8, or 32 when lm_head is kept dense")


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", help="calibration text file (default: text generated by the model)")
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--calib-batch", type=int, default=8)
    p.add_argument("--calib-chat", type=float, default=None,
                   help="with --calib and a chat model: this share of the windows are conversations the model "
                        "writes through its chat template, so that it keeps answering in turn (default 0.25; "
                        "0: the file only; a model without a chat template gets none)")


def _accuracy_level(value: str) -> int | None:
    """--onnx-accuracy-level: "auto" (None: per code format) or 0-4."""
    if value == "auto":
        return None
    if value not in ("0", "1", "2", "3", "4"):
        raise argparse.ArgumentTypeError(f"expected auto or 0-4, not {value!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quipc", description="QuIP 2/3/4-bit LLM compiler")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="quantize a model (HF folder, .gguf, alias, .onnx)")
    c.add_argument("model")
    c.add_argument("-o", "--out", required=True)
    c.add_argument("--target", default="torch", choices=["torch", "onnx", "tvm"],
                   help="torch: a quipc artifact (default); onnx / tvm: lowered model")
    c.add_argument("--onnx-ops", default="quip", choices=["quip", "std"])
    c.add_argument("--onnx-accuracy-level", type=_accuracy_level, default=None, metavar="auto|0|1|2|3|4",
                   help="the quipc nodes' accuracy level (MatMulNBits' minimum accuracy of the activations): "
                        "1 = fp32 activations everywhere; 4 = int8 (stock onnxruntime: +13%% ppl measured at w2 "
                        "grid; quipc's custom-op library: its decode GEMVs on int8, +0.09%% decode ppl at w2, "
                        "+0.3%% at w4 trellis); 0 = unset: fp32 in stock onnxruntime, int8 decode GEMVs in the "
                        "library (its choice); auto (default): 4 for trellis nodes (their bodies ignore it), 0 "
                        "for the others")
    c.add_argument("--onnx-calibration", default="sequential", choices=["sequential", "one-pass"],
                   help=".onnx input: sequential (default; each layer calibrated on the outputs of the "
                        "already-quantized earlier layers) or one-pass (every Hessian from the fp32 model)")
    c.add_argument("--tvm-target", default="llvm")
    c.add_argument("--tvm-e8p", default="grid4", choices=["grid4", "codebook"],
                   help="tvm (traced, CPU): run e8p layers by 4-bit grid kernels (grid4, default: a 2-bit "
                        "layer as one 4-bit grid, a 4-bit one as two; the same weights, ~0.69x the decode "
                        "time, the build larger: SmolLM2 w2 76 instead of 50 MB, w4 128 instead of 76) or "
                        "by the e8p codebook kernels (codebook: the smaller build)")
    c.add_argument("--tvm-trellis", default="int8", choices=["int8", "codes"],
                   help="tvm (traced, CPU): run trellis layers by 4-bit grid kernels on their rows rounded to "
                        "8 bits (int8, default; as the head always runs: the build 8 bits a weight) or by the "
                        "trellis kernels on their codes (codes: the smaller build, ~3x slower decode)")
    c.add_argument("--tvm-activations", default="int8", choices=["int8", "fp32"],
                   help="tvm (CPU): decode's 4-bit GEMVs (grid, e8p as grid, the 4-bit head) on int8 "
                        "activations, one step per row (int8, default, x86 CPUs with AVX2; elsewhere "
                        "fp32) or on the fp32 activations (exactly the torch path's sums)")
    c.add_argument("--graph", default="auto", choices=["auto", "traced", "handwritten"],
                   help="onnx / tvm: the traced transformers model (every family) or, for TVM, the "
                        "hand-written Llama graph; auto (default): traced, except hand-written for a llama "
                        "model to TVM on a GPU target")
    c.add_argument("--tokenizer", help="tokenizer for an .onnx input (folder, .gguf or alias)")
    c.add_argument("--device", default="cpu", help="calibration device (cpu, cuda, cuda:1, ...)")
    c.add_argument("--resume", action="store_true", help="finish an interrupted compile in --out")
    c.add_argument("--workers", type=int, default=1,
                   help="processes on this machine sharing the compile (runs torchrun --standalone "
                        "--nproc-per-node N -m quipc compile ...; the artifact is the same bytes)")
    c.add_argument("--no-progress", action="store_true")
    _add_quant_args(c)
    _add_head_args(c)
    _add_calib_args(c)

    e = sub.add_parser("eval", help="perplexity per PROTOCOL (artifact or unquantized model)")
    e.add_argument("target", help="artifact folder, ONNX (.onnx or its folder) or TVM output folder, "
                                  "or an unquantized model (HF folder, .gguf, alias)")
    e.add_argument("--text", required=True, help="evaluation text (e.g. wiki.test.raw)")
    e.add_argument("--windows", type=int, default=16, help="number of windows (0 = all)")
    e.add_argument("--ctx", type=int, default=2048)
    e.add_argument("--backend", default="reference", help="artifact backend: reference | kernels")
    e.add_argument("--device", default="cpu")
    e.add_argument("--no-onnx-custom-ops", action="store_true",
                   help="ONNX target: run the quipc nodes' function bodies (stock onnxruntime) instead of "
                        "quipc's onnxruntime custom-op library")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--no-progress", action="store_true")

    ch = sub.add_parser("chat", help="greedy answer to a chat prompt, or a conversation on standard input "
                                     "(artifact, ONNX or TVM output, or unquantized model)")
    ch.add_argument("target", help="artifact folder, ONNX (.onnx or its folder) or TVM output folder, "
                                   "or an unquantized model (HF folder, .gguf, alias)")
    ch.add_argument("prompt", nargs="?", default=None,
                    help="one user turn, sent through the model's chat template; omitted: a conversation, "
                         "one user turn per line of standard input (an empty line or the end of input ends "
                         "it), each answered after the earlier turns")
    ch.add_argument("--max-new-tokens", type=int, default=64)
    ch.add_argument("--device", default="cpu", help="artifact or unquantized model: cpu, cuda, cuda:1, ...")
    ch.add_argument("--backend", default="auto",
                    help="artifact backend: auto (the C++ kernels where they are built, else reference; "
                         "default) | reference | kernels")
    ch.add_argument("--trellis-as-int8", choices=TRELLIS_AS_INT8, default="all",
                    help="kernels backend: the trellis layers whose decode GEMVs run on an 8-bit copy of "
                         "their rows, made at load: all (default, as the ONNX library and TVM builds: "
                         "~1.4x faster decode of SmolLM2 w4, a byte a weight of memory, decode perplexity "
                         "+0.4 %%; +0.5 %% at w2), head (the lm_head only) or none (every GEMV exact)")
    ch.add_argument("--activations", choices=("int8", "fp32"), default="int8",
                    help="kernels backend on the CPU: the decode GEMVs of 4-bit codes and 8-bit rows on int8 "
                         "activations (default, as TVM builds: SmolLM2 w2 decode 0.6x the time, decode "
                         "perplexity +0.2 %%) or on fp32 ones (the torch path's sums)")

    i = sub.add_parser("inspect", help="per-layer table of an artifact")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="latency across backends")
    try:
        from . import bench
        bench.add_arguments(b)
    except ImportError as err:
        b.set_defaults(bench_missing=str(err))
    return parser


def _is_artifact(path: str) -> bool:
    return Path(path, "manifest.json").is_file()


def cmd_eval(args) -> int:
    from .eval.perplexity import eval_windows, perplexity, torch_logits_fn

    lowered = _lowered_model(args.target, custom_ops=False if args.no_onnx_custom_ops else None)
    if lowered is not None:
        lm, tokenizer, what = lowered
        logits_fn = lambda ids: lm.logits(ids.numpy())  # noqa: E731
    elif _is_artifact(args.target):
        import quipc_runtime
        from quipc_runtime.loader import load_tokenizer

        model = quipc_runtime.load(args.target, device=args.device, backend=args.backend)
        tokenizer = load_tokenizer(args.target)
        what = {"artifact": args.target, "backend": args.backend}
    else:
        from .frontend.hf import load_model
        from .frontend.models import resolve

        model, tokenizer = load_model(resolve(args.target))
        model.to(args.device)
        what = {"model": args.target, "backend": "transformers fp32"}
    if lowered is None:
        logits_fn = torch_logits_fn(model)
    windows = eval_windows(tokenizer, args.text, args.ctx, args.windows or None)
    result = {**what, **perplexity(logits_fn, windows, progress=not args.no_progress)}
    result["threads"] = _threads()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"ppl {result['ppl']:.4f} over {result['windows']} windows x {result['ctx']} tokens "
              f"({result['tokens']} predicted) in {result['seconds']:.0f} s")
    return 0


def cmd_chat(args) -> int:
    from .eval.chat import answer_ids

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    lowered = None
    if _is_artifact(args.target):
        import quipc_runtime
        from quipc_runtime.loader import load_tokenizer

        backend = _chat_backend(args.backend, args.device)
        model = quipc_runtime.load(args.target, device=args.device, backend=backend,
                                   trellis_as_int8=args.trellis_as_int8,
                                   int8_activations=backend == "kernels" and args.device == "cpu"
                                   and args.activations == "int8")
        if backend == "kernels":   # the lean decoder where it runs the family
            from quipc_runtime.kernels_lm import lean

            model = lean(model, threads=_threads())
        tokenizer = load_tokenizer(args.target)
    elif (lowered := _lowered_model(args.target)) is not None:
        if args.device != "cpu":
            raise ValueError(f"--device {args.device}: an ONNX or TVM output runs on the device it was built "
                             "for; --device applies to an artifact or an unquantized model")
        model, tokenizer, _ = lowered
    else:
        from .frontend.hf import load_model
        from .frontend.models import resolve

        model, tokenizer = load_model(resolve(args.target))
        model.to(args.device)
    if args.prompt is not None:
        print(tokenizer.decode(answer_ids(model, tokenizer, args.prompt, args.max_new_tokens)))
        return 0
    return _conversation(model, tokenizer, args.max_new_tokens)


def _conversation(model, tokenizer, max_new_tokens: int) -> int:
    """`quipc chat TARGET` without a prompt: user turns from standard input, answers to stdout."""
    from .eval.chat import converse, require_chat_template

    require_chat_template(tokenizer)   # before reading anything
    interactive = sys.stdin.isatty()

    def turns():
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                return
            yield line

    converse(model, tokenizer, turns(), max_new_tokens, lambda text: print(text, flush=True))
    return 0


def _chat_backend(name: str, device: str = "cpu") -> str:
    """auto: the C++ kernels when the extension is built (the same logits as the reference path,
    decoded ~3x faster on a CPU; on a GPU, when it is built with CUDA), else the reference path."""
    if name != "auto":
        return name
    from quipc_runtime import kernels

    on_gpu = device.split(":")[0] == "cuda"
    return "kernels" if (kernels.cuda_available() if on_gpu else kernels.available()) else "reference"


def _lowered_model(target: str, custom_ops: bool | None = None):
    """(language model, tokenizer, description) for an ONNX or TVM output, else None;
    custom_ops: OnnxLM's (None: quipc's custom-op library when it is built)."""
    from transformers import AutoTokenizer

    path = Path(target)
    onnx_file = path if path.suffix == ".onnx" else path / "model.onnx"
    threads = _threads()
    if onnx_file.is_file():
        from quipc_runtime.onnx_runtime import OnnxLM

        lm = OnnxLM(onnx_file, threads=threads, custom_ops=custom_ops)
        return lm, lm.tokenizer(), {"model": str(onnx_file), "backend": "onnxruntime",
                                    "custom_ops": lm.custom_ops}
    if (path / "tvm_config.json").is_file():
        from quipc_runtime.tvm_runtime import TvmLM

        return (TvmLM(path, threads=threads), AutoTokenizer.from_pretrained(path / "tokenizer"),
                {"model": str(path), "backend": "tvm"})
    return None


def cmd_inspect(args) -> int:
    from .inspect_artifact import layer_rows, render

    if args.json:
        from quipc_runtime import artifact as art

        from .inspect_artifact import deployment_size

        manifest = art.read_manifest(args.artifact, allow_incomplete=True)
        print(json.dumps({"layers": layer_rows(manifest), "summary": manifest.get("summary"),
                          "deployment": deployment_size(args.artifact, manifest),
                          "head": {k: v for k, v in (manifest.get("head") or {}).items() if k != "layers"} or None,
                          "embedding": manifest.get("embedding")}))
    else:
        print(render(args.artifact))
    return 0


def cmd_bench(args) -> int:
    if getattr(args, "bench_missing", None):
        raise RuntimeError(f"quipc bench is unavailable: {args.bench_missing}")
    from . import bench

    return bench.run(args)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


COMMANDS = {"compile": cmd_compile, "eval": cmd_eval, "chat": cmd_chat, "inspect": cmd_inspect,
            "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("quipc: interrupted; finished blocks are kept (rerun compile with --resume)", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError, ImportError) as err:
        print(f"quipc: error: {err}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())

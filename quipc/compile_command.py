"""`quipc compile`: the configuration a bare command resolves for its target (the defaults are
the product: quipc.config says which benchmark chose each), and the compile itself, on one
process, on --workers ranks, or lowered to a backend."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def format_and_finetune(args) -> tuple[str, str, int]:
    """--format / --finetune / --finetune-step-windows, or the defaults for this target (see
    quipc.config)."""
    from .config import (CLI_FINETUNE, CLI_FINETUNE_CALIB, CLI_FINETUNE_RANKS, CLI_FINETUNE_STEP_WINDOWS,
                         CLI_FINETUNE_STEP_WINDOWS_RANKS, CLI_FORMAT, CLI_FORMAT_CALIB, CLI_FORMAT_DATAFREE)
    from .distributed import launched_by_torchrun

    onnx_input = args.model.endswith(".onnx")
    calib = getattr(args, "calib", None)
    # every backend lowers every format (quipc_runtime.formats); .onnx inputs keep e8p (not measured)
    per_width = {} if onnx_input else CLI_FORMAT_CALIB if calib else CLI_FORMAT_DATAFREE
    fmt = args.format or per_width.get(args.bits, CLI_FORMAT)
    several_ranks = getattr(args, "workers", 1) > 1 or launched_by_torchrun()
    default = (CLI_FINETUNE_RANKS if several_ranks   # block fine-tuning runs in one process
               else CLI_FINETUNE_CALIB if calib else CLI_FINETUNE.get(args.bits, "e2e"))
    finetune = args.finetune or ("none" if onnx_input or args.method == "rtn" else default)
    if onnx_input and finetune != "none":
        raise ValueError("fine-tuning runs on Hugging Face / GGUF models; an .onnx input takes --finetune none")
    step = args.finetune_step_windows   # an explicit 0 or less is refused by QuantConfig.validate
    if step is None:
        step = CLI_FINETUNE_STEP_WINDOWS_RANKS if several_ranks else CLI_FINETUNE_STEP_WINDOWS
    return fmt, finetune, step


def finetune_lr(args, finetune: str) -> float:
    """--finetune-lr, or the default for this width and fine-tuning mode (see quipc.config)."""
    from .config import CLI_FINETUNE_LR, CLI_FINETUNE_LR_AFTER_BLOCK
    from .passes.finetune import FinetuneConfig

    if args.finetune_lr is not None:
        return args.finetune_lr
    if FinetuneConfig(mode=finetune).block:
        return CLI_FINETUNE_LR_AFTER_BLOCK.get(args.bits, CLI_FINETUNE_LR)
    return CLI_FINETUNE_LR


def _data_free(args) -> bool:
    """Calibrated on text the model writes itself: no --calib, and not an .onnx input."""
    return not getattr(args, "calib", None) and not args.model.endswith(".onnx")


def tie_inputs(args) -> bool:
    """--finetune-tie-inputs / --no-finetune-tie-inputs, or the default for this width, data-free
    (see quipc.config); off with --calib and for .onnx inputs (not measured / no fine-tuning)."""
    from .config import CLI_FINETUNE_TIE_INPUTS_DATAFREE

    if args.finetune_tie_inputs is not None:
        return args.finetune_tie_inputs
    return _data_free(args) and CLI_FINETUNE_TIE_INPUTS_DATAFREE.get(args.bits, False)


def head_format(args) -> str:
    """--head-format, or the default (see quipc.config)."""
    from .config import CLI_HEAD_FORMAT

    return args.head_format or CLI_HEAD_FORMAT


def head_refit_damp(args) -> float:
    """--head-refit-damp, or the default for this width (see quipc.config): data-free, where the compile
    quantizes the head and has an e2e stage to refit it after."""
    from .config import CLI_HEAD_REFIT_DAMP, DENSE_BITS
    from .passes.finetune import FinetuneConfig

    if args.head_refit_damp is not None:
        return args.head_refit_damp
    if _data_free(args) and args.head_bits != DENSE_BITS and FinetuneConfig(mode=args.finetune).e2e:
        return CLI_HEAD_REFIT_DAMP.get(args.bits, 0.0)
    return 0.0


def calib_chat(args) -> float:
    """--calib-chat, or the default share of conversations with --calib (see quipc.config); an
    .onnx input has no generation to write them, and data-free calibration has its own."""
    from .config import CLI_CALIB_CHAT

    if args.model.endswith(".onnx"):
        if args.calib_chat:
            raise ValueError("--calib-chat needs a Hugging Face / GGUF model to write the conversations; "
                             "an .onnx input is calibrated on the file's text only")
        return 0.0
    if args.calib_chat is None:
        return CLI_CALIB_CHAT if getattr(args, "calib", None) else 0.0
    return args.calib_chat


def cmd_compile(args) -> int:
    from .compile import CalibConfig, compile_model
    from .config import QuantConfig

    args.format, args.finetune, args.finetune_step_windows = format_and_finetune(args)
    args.head_format = head_format(args)
    cfg = QuantConfig(method=args.method, bits=args.bits, incoherence=args.incoherence, seed=args.seed,
                      damp=args.damp, greedy_passes=args.greedy_passes, rescale=args.rescale,
                      grid=args.grid, format=args.format, finetune=args.finetune,
                      finetune_epochs=args.finetune_epochs,
                      finetune_step_windows=args.finetune_step_windows,
                      finetune_lr=finetune_lr(args, args.finetune),
                      finetune_tie_inputs=tie_inputs(args),
                      head_bits=args.head_bits,
                      head_format=args.head_format, head_int8_rows=args.head_int8_rows,
                      head_refit_damp=head_refit_damp(args), embed_bits=args.embed_bits).validate()
    calib = CalibConfig(text=args.calib, windows=args.calib_windows, length=args.calib_len,
                        batch=args.calib_batch, chat=calib_chat(args))
    progress = not args.no_progress
    out = Path(args.out)
    if args.model.endswith(".onnx"):
        import dataclasses

        import torch

        from .frontend.onnx_model import compile_onnx

        # the ONNX frontend keeps lm_head and the embedding as they are (QuantConfig.quantize_lm_head)
        cfg = dataclasses.replace(cfg, head_bits=32, head_int8_rows=0, head_refit_damp=0.0, embed_bits="auto")
        summary = compile_onnx(Path(args.model), out, cfg, calib, tokenizer=args.tokenizer,
                               ops=args.onnx_ops, progress=progress, accuracy_level=args.onnx_accuracy_level,
                               threads=torch.get_num_threads(), calibration=args.onnx_calibration)
        print(json.dumps(summary, indent=1, default=str))
        return 0
    if args.workers > 1:
        return _run_workers(args)
    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    if args.target == "torch":
        manifest = _compile_on_ranks(args.model, out, cfg, calib, device=args.device, resume=args.resume,
                                     progress=progress)
        if manifest is None:
            return 0   # a rank other than 0 of a distributed compile: rank 0 reports
        s = manifest["summary"]
        print(f"wrote {out}: {s['quantized_layers']} layers at {s['bpw']:.3f} bpw; whole model "
              f"{s['total_bytes'] / 1e6:.2f} MB without tokenizer, {s['bits_per_param']:.3f} bits/param; "
              f"in {manifest['compile_seconds']:.0f} s")
        return 0
    is_artifact = Path(args.model, "manifest.json").is_file()
    artifact = Path(args.model) if is_artifact else out / "artifact"
    if not is_artifact:
        compile_model(args.model, artifact, cfg, calib, device=args.device, resume=args.resume,
                      progress=progress)
    from .backends.lower import lower_artifact

    path = lower_artifact(artifact, out, target=args.target, graph=args.graph, onnx_ops=args.onnx_ops,
                          accuracy_level=args.onnx_accuracy_level, tvm_target=args.tvm_target,
                          progress=progress, tvm_e8p=args.tvm_e8p, tvm_activations=args.tvm_activations,
                          tvm_trellis=args.tvm_trellis)
    print(f"wrote {path}")
    return 0


def _compile_on_ranks(*args, **kwargs):
    """compile_model, leaving torchrun's process group (if any) when done."""
    from .compile import compile_model
    from .distributed import leave

    finished = False
    try:
        manifest = compile_model(*args, **kwargs)
        finished = True
        return manifest
    finally:
        leave(finished)


def _run_workers(args) -> int:
    """`--workers N`: the same command under torchrun on this machine (N ranks)."""
    import subprocess

    from .distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise ValueError("--workers is for a plain `quipc compile`; under torchrun use --nproc-per-node")
    if args.target != "torch" or args.model.endswith(".onnx"):
        raise ValueError("--workers compiles Hugging Face / GGUF models to a quipc artifact (--target torch)")
    argv, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
        elif a == "--workers":
            skip = True
        elif not a.startswith("--workers="):
            argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.workers}",
           "-m", "quipc", *argv]
    return subprocess.call(cmd)

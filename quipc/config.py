"""Quantization settings: one frozen dataclass, validated once, recorded in the artifact."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from quipc_runtime.packing import SUPPORTED_BITS
from quipc_runtime.transforms import KINDS

DENSE_BITS = 32  # head_bits / embed_bits: kept in floating point as today
EMBED_CHOICES = ("auto", "head", "4", "8", "16", "32")
# `quipc compile`'s defaults for lm_head and the embedding (the library's QuantConfig keeps
# both dense); chosen from measurements on SmolLM2-135M, see docs/results/whole-model.md.
CLI_HEAD_BITS = 4
# the head's code format, data-free and with --calib: auto (trellis where the head is whole 16x16 tiles, as
# SmolLM2's; else e8p, else grid). Data-free w2, the default pipeline (all), Xeon host, same generated windows
# (stop 52): trellis 58.42 / held-out KL 0.561 / NLL of fp32's answers 1.696 against the grid head's 59.39 /
# 0.572 / 1.737 (dense head: 56.82), ROUGE-L 0.283 against 0.287 (a tie), 41.95 against 42.05 MB; its decode
# GEMV runs on an 8-bit copy of the rows: TVM 3.97 against 3.39 ms a token, the kernels runtime 7.86 against
# 7.37 (benchmarks/results/decode_w2_head_grid_vs_trellis_stop52.json). With --calib (stop 41) it cost +1.52 %
# against the grid head's +4.38 % on 2-bit blocks, and in full compiles 62.29 against 63.44.
CLI_HEAD_FORMAT = "auto"
# data-free, with an e2e stage and a quantized head, per width: the head quantized again after e2e, on the
# fine-tuned model's final hidden states, damped 0.1 (quipc/head_refit_stage.py). Xeon host, the same generated
# windows, `benchmarks/head_embed.py --calib generated` on each default artifact (which computes what the compile
# does: the w2 compile gave its 57.4026 to every digit): w2 as compiled 58.42, refit at damp 0.01 57.81, 0.1
# 57.40, 1.0 57.75 (dense-head compile 56.82: +2.82 % -> +1.02 %); the w2 compile with it: ROUGE-L 0.313 vs
# 0.283, fp32's tokens picked 0.585 vs 0.589 at NLL 1.709 vs 1.696 (stop 54). w3 (e2e): 29.67 -> 29.58 (0.01),
# 29.52 (0.1). w4 (all): 23.36 -> 23.53 (0.01), 23.49 (0.1): worse, the e2e stage's head gains count more
# there, so no refit at 4 bits. With --calib: not measured, off.
CLI_HEAD_REFIT_DAMP = {2: 0.1, 3: 0.1}
# `quipc compile`'s code format and fine-tuning (the library's QuantConfig keeps grid / none):
# the best rows of benchmarks/quality.py (docs/results/quality.md), for every target (each backend lowers every
# format). e8p, not trellis / auto, although trellis wins on perplexity (data-free w2 default
# configuration 51.17 vs 60.92, agreement 0.340 vs 0.330, same bytes): it decodes 1.5x / 2.5x /
# 10x slower on the kernels runtime / ONNX / TVM (45 / 40 / 140 against 30 / 15.6 / 14 ms per
# token), and with --calib at w2 its block + e2e model lost the chat turn (agreement 0.042).
CLI_FORMAT = "e8p"            # data-free at 2 bits; with --calib at 2 bits (and for an .onnx input)
# with --calib at 3 and 4 bits: auto (trellis where the layer is whole 16x16 tiles, as all of SmolLM2's,
# else e8p, else grid). Stop 49 (Xeon host, the --calib default otherwise: all, a quarter conversations,
# trellis head), against e8p: w3 ppl 23.60 / agreement 0.463 against 25.60 / 0.387 (55.23 vs 55.54 MB),
# w4 22.00 / 0.581 against 22.67 / 0.538 (68.50 vs 68.81 MB). At these widths e8p is two residual
# stages, so trellis decodes as fast or faster on the kernels runtime and through the custom-op library
# (w4: 34 vs 42 and 17 vs 18 ms per token), and TVM runs it on 8-bit rows (--tvm-trellis int8; docs/results/tvm.md).
# At 2 bits e8p stays: one stage there, 1.5x / 2.5x faster than trellis on those runtimes.
CLI_FORMAT_CALIB = {2: "e8p", 3: "auto", 4: "auto"}
# data-free at 4 bits: auto too (stop 55, AMD EPYC host, the same generated windows, the bare compile otherwise):
# perplexity 22.57 against e8p's 23.39 in fewer bytes (68.50 vs 68.81 MB), both answer "Paris"; TVM decodes
# both alike (8-bit planes; 1.2x llama.cpp Q4_0 on that host, stop 56). At 3 bits auto too (stop 56, same
# host, the same generated windows): 26.77 against e8p's 29.97 (55.13 vs 55.44 MB), both answer "Paris".
# 2 bits data-free: e8p.
CLI_FORMAT_DATAFREE = {3: "auto", 4: "auto"}
# data-free, per width: all (block + e2e) at 2 bits. It gave 58.85 vs e2e's 60.92 on one host (agreement 0.275 vs
# 0.330, which kept e2e then), and at stop 50 (Xeon host, same generated windows) 59.39 vs 61.27, held-out KL
# 0.572 vs 0.645, NLL of fp32's answers 1.737 vs 1.784 (their tokens picked 0.568 vs 0.565; ROUGE-L 0.287 vs
# 0.293, within its noise), and "The capital of France is Paris, ..." where e2e named no city (docs/results/quality.md).
# 4 bits data-free: all too (stop 53, Xeon host, the same generated windows): ppl 23.36 vs e2e's 23.73, held-out
# KL 0.0671 vs 0.0753, ROUGE-L 0.569 vs 0.537, fp32's tokens picked 0.832 vs 0.829 at NLL 0.805 vs 0.810, for
# 33:37 of compile against 18:17 (benchmarks/results/*datafree_w4*_stop53.json). 3 bits data-free: e2e; all
# (same windows, stop 53) had the lower held-out KL on the generated text (0.197 vs 0.215) but not on WikiText or
# fp32's answers: ppl 29.87 vs 29.67, fp32's tokens picked 0.706 vs 0.710 at NLL 1.080 vs 1.063, ROUGE-L 0.442 vs
# 0.428 (within its noise), for 24:34 of compile against 15:23 (*datafree_w3*_stop53.json).
CLI_FINETUNE = {2: "all", 3: "e2e", 4: "all"}
CLI_FINETUNE_CALIB = "all"    # with --calib: block + e2e (w2 37.74 vs 39.24, w3 25.21 vs 25.62,
                              # w4 22.28 vs 22.02 but agreement 0.500 vs 0.458; w2 0.304 vs 0.154)
CLI_FINETUNE_RANKS = "e2e"    # with --workers / under torchrun: block fine-tuning runs in one process
# e2e: windows per Adam step. One process: 1 (data-free w2 default, Xeon host: ppl 61.27, held-out KL
# 0.645, against 62.02 / 0.665 with 2 windows per step, same compile time). With --workers / under
# torchrun: 2, so that two ranks share each step (the same bytes as one process given the same
# value; benchmarks/scale.py's timing part passes it to every run)
CLI_FINETUNE_STEP_WINDOWS = 1
# e2e: Adam's learning rate per width. At 4 bits, after the block stage (with --calib; data-free since stop 53), 5e-4 raised the held-out KL in its
# first epoch, so early stopping kept the block-tuned values (w4 trellis 0.0357 -> 0.0376, e8p 0.0519 ->
# 0.0522: the stage was 3.5 minutes for nothing); 1e-4 lowers it, 0.0357 -> 0.0339 -> 0.0335, perplexity
# 22.00 -> 21.82, NLL of fp32's answers 0.769 -> 0.760 (their tokens picked 85.4 -> 85.2 %; ROUGE-L of
# free answers 0.581 -> 0.561, 24 prompts; stop 50, docs/results/whole-model.md). At 2 and 3 bits 5e-4 still
# lowers it every epoch, and so it does at 4 bits without the block stage (e2e alone, the data-free default: 0.0713 ->
# 0.0612 -> 0.0606), so the smaller step goes only where the block stage ran first.
CLI_FINETUNE_LR = 5e-4
CLI_FINETUNE_LR_AFTER_BLOCK = {4: 1e-4}
CLI_FINETUNE_STEP_WINDOWS_RANKS = 2
# block and e2e, data-free, per width: one in_scale per set of linears reading the same tensor (q/k/v,
# gate/up), trained on all of the set's gradients, so that the export runs the set as one QuipLinearGroup node
# (input scale and transform once, one product). Stop 59, AMD EPYC host, the same generated windows, each
# against the same compile untied (docs/results/tied-input-scales.md). w4 default: ppl 22.49 vs 22.57,
# held-out KL 0.0448 vs 0.0476, NLL of fp32's answers 0.749 vs 0.760 (their tokens picked 0.859 vs 0.861),
# ROUGE-L 0.564 vs 0.548, "Paris" both; ONNX library decode 12.88 vs 12.97 ms (trellis on 8-bit rows); with
# grid blocks and an fp32 head 23.83 vs 23.43 but decode 9.79 vs 10.91. w2 default: ppl 59.71 vs 60.75, KL 0.565
# vs 0.577, decode 9.29 vs 10.58, but fp32's answers lost: NLL 1.759 vs 1.734, tokens picked 0.555 vs 0.591,
# ROUGE-L 0.256 vs 0.277, so not at 2 bits. 3 bits and --calib: not measured, off.
CLI_FINETUNE_TIE_INPUTS_DATAFREE = {4: True}
CLI_EMBED_BITS = "auto"
# rows of the head kept at 8 bits (the most frequent calibration tokens), off: in the default pipeline
# 4096 rows gave ppl 63.98 against 64.28 for +2.39 MB (44.34 MB), one pair, rows chosen by count on
# the model's own text, which covers 63 % of WikiText's tokens (docs/results/whole-model.md)
CLI_HEAD_INT8_ROWS = 0
# with --calib: this share of the calibration windows are conversations the model writes through its
# chat template (none for a model without one). WikiText alone cost the w2 default its chat turn: block +
# e2e fine-tuned, 4-bit trellis head, it answered every prompt by reciting the template's system prompt
# (ppl 38.35, agreement 0.115); with half conversations 41.12, agreement 0.277, "The capital of France
# is Paris" (stop 44, one host; docs/results/whole-model.md). Swapping fp32 rows into its head or embedding
# did not bring the answers back: the blocks lost them, not the head. A quarter (stop 47, same host, same
# command otherwise): ppl 39.42, agreement 0.324, "Paris", ahead of the half's 41.26 / 0.277 on both (w2).
# Stop 48 (another host): w4 22.67 / 0.538 against the half's 22.72 / 0.509, w3 25.60 / 0.387 against
# 25.91 / 0.440 (one run each; both answer "Paris").
CLI_CALIB_CHAT = 0.25


@dataclass(frozen=True)
class QuantConfig:
    method: str = "quip"          # rtn | ldlq | quip (see quipc.passes.methods)
    bits: int = 2
    incoherence: str = "hadamard"  # quip only: hadamard (falls back to kron) | kron
    seed: int = 0
    damp: float = 0.01            # H += damp * mean(diag H) * I
    greedy_passes: int = 0        # coordinate-descent passes after LDLQ
    rescale: bool = False         # QuIP's diagonal rescaling before the rotations (see README)
    grid: str = "mse"             # per-row grid range: mse (clip search) | minmax
    format: str = "grid"          # code format of W' (quipc_runtime.formats): grid | e8p | trellis,
                                  # or auto: per layer the first of passes.encoders.AUTO_ORDER that fits
    finetune: str = "none"        # none | block | e2e | all (quipc.passes.finetune, block_finetune)
    finetune_epochs: int = 2
    finetune_step_windows: int = 1  # e2e: calibration windows per Adam step (spread over the ranks)
    finetune_lr: float = 5e-4     # e2e: Adam's learning rate (passes/finetune.FinetuneConfig.lr)
    finetune_tie_inputs: bool = False  # block and e2e: one in_scale per set of linears reading the same
                                       # tensor, so that they run as one group (passes/input_siblings.py)
    quantize_lm_head: bool = False  # ONNX frontend only (the HF path uses head_bits)
    head_bits: int = 32           # HF path: lm_head bits (2/3/4; 32 = kept dense), see passes/head.py
    head_format: str = "grid"     # HF path: lm_head's code format (grid | e8p | trellis | auto); a tied
                                  # head's codes are the embedding table in every format
    head_int8_rows: int = 0       # HF path: lm_head rows of the most frequent calibration tokens kept at
                                  # 8 bits (at most vocab / 8; 0 = none), see passes/head.py
    head_refit_damp: float = 0.0  # HF path, with e2e fine-tuning: > 0 quantizes lm_head again after the e2e
                                  # stage, on the fine-tuned model's final hidden states, at this damping
                                  # (0: quantized once, after the blocks); see quipc/head_refit_stage.py
    embed_bits: int | str = "auto"  # HF path: "head" (the tied head's codes) | 4 | 8 (tables) | 16 | 32
                                    # (dense); auto: head when tied and the head is quantized, else
                                    # 8 with a quantized head, else 32

    def validate(self) -> "QuantConfig":
        from .passes.methods import METHODS

        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {sorted(METHODS)}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"unsupported bits {self.bits}: quipc quantizes to {SUPPORTED_BITS} bits")
        if self.incoherence not in KINDS or self.incoherence == "identity":
            raise ValueError(f"unknown incoherence {self.incoherence!r}; expected hadamard or kron")
        if not 0 <= self.damp < 10:
            raise ValueError(f"damp must be in [0, 10), got {self.damp}")
        if self.greedy_passes < 0:
            raise ValueError("greedy passes must be >= 0")
        if self.grid not in ("mse", "minmax"):
            raise ValueError(f"unknown grid {self.grid!r}; expected mse or minmax")
        from quipc_runtime.formats import get_format

        from .passes.encoders import AUTO, AUTO_ORDER

        for fmt in AUTO_ORDER if self.format == AUTO else (self.format,):
            get_format(fmt).check_bits(self.bits)  # raises for an unknown format or width
        self.finetune_config().validate()
        if self.finetune != "none" and self.method == "rtn":
            raise ValueError("fine-tuning trains on the calibration text, which method rtn does not use")
        if self.head_bits not in SUPPORTED_BITS + (DENSE_BITS,):
            raise ValueError(f"unsupported head bits {self.head_bits}: expected one of "
                             f"{SUPPORTED_BITS + (DENSE_BITS,)} (32 keeps lm_head dense)")
        if self.head_bits != DENSE_BITS:
            for fmt in AUTO_ORDER if self.head_format == AUTO else (self.head_format,):
                get_format(fmt).check_bits(self.head_bits)
        if self.head_int8_rows < 0:
            raise ValueError(f"head int8 rows must be >= 0, got {self.head_int8_rows}")
        if self.head_int8_rows and self.head_bits == DENSE_BITS:
            raise ValueError("head int8 rows keep rows of a quantized lm_head at 8 bits: use --head-bits 2, 3 or 4")
        if self.head_refit_damp:
            if not 0 < self.head_refit_damp < 10:
                raise ValueError(f"head refit damp must be in (0, 10), or 0 for no refit; got {self.head_refit_damp}")
            if self.head_bits == DENSE_BITS:
                raise ValueError("a head refit quantizes lm_head again: it needs --head-bits 2, 3 or 4")
            if not self.finetune_config().e2e:
                raise ValueError("a head refit runs on the e2e fine-tuned model: it needs --finetune e2e or all")
        if str(self.embed_bits) not in EMBED_CHOICES:
            raise ValueError(f"unsupported embed bits {self.embed_bits!r}: expected one of "
                             f"{', '.join(EMBED_CHOICES)}")
        return self

    def finetune_config(self):
        from .passes.finetune import FinetuneConfig

        return FinetuneConfig(mode=self.finetune, epochs=self.finetune_epochs, seed=self.seed,
                              step_windows=self.finetune_step_windows, lr=self.finetune_lr,
                              tie_inputs=self.finetune_tie_inputs)

    def to_dict(self) -> dict:
        return asdict(self)

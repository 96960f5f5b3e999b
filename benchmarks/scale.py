"""Scale of `quipc compile`: peak memory against depth, and time over ranks (issue 14).

    python benchmarks/scale.py --json benchmarks/results/scale.json                  # every part
    python benchmarks/scale.py --json OUT --parts rss --blocks 4,16                  # memory only
    python benchmarks/scale.py --json OUT --parts timing --timing-windows 16          # time only

rss: random Llama-shaped models (hidden 4096, intermediate 11008, fp16 safetensors, one shard
per block, written block by block and deleted afterwards) compiled at 2 bits with a short text
calibration, and SmolLM2-135M beside them; for each, the compiling process's peak resident
memory (VmHWM from /proc/self/status) and its wall time; from the two depths, the seconds per
4096-wide block. e2e fine-tuning is off here (it holds the quantized student whole).
timing: `quipc compile smollm2-135m --bits 2` (the defaults: data-free calibration, e8p, e2e
fine-tuning, here 2 windows per step in every run: --workers' default) with 1 rank x 1 thread,
2 ranks x 1 thread (--workers 2) and 1 rank x 2 threads,
wall time of each, and whether 2 ranks wrote the bytes of 1. Run it on an idle machine.
Records already in OUT are kept; a part's records are replaced when it is rerun.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

WORDS = 250   # calibration vocabulary of the random models: w0 .. w249 (+ 3 specials)


# --- random models -----------------------------------------------------------------------
def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def write_random_llama(folder: Path, blocks: int, hidden: int, intermediate: int, heads: int) -> int:
    """A random LlamaForCausalLM as fp16 safetensors, one shard per block, never held whole
    in memory; returns the bytes written."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=blocks,
                num_attention_heads=heads, num_key_value_heads=heads, vocab_size=WORDS + 3,
                max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                torch_dtype="float16").save_pretrained(folder)
    write_tokenizer(folder)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).half()

    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
              "mlp.down_proj": (hidden, intermediate)}
    weight_map = {}
    files = [("model-outer.safetensors", {"model.embed_tokens.weight": rand(WORDS + 3, hidden),
                                          "model.norm.weight": torch.ones(hidden).half()})]
    for i in range(blocks):
        files.append((f"model-block-{i:03d}.safetensors", None))
    for name, tensors in files:
        if tensors is None:
            i = int(name.split("-")[-1].split(".")[0])
            p = f"model.layers.{i}."
            tensors = {p + f"{n}.weight": rand(*s) for n, s in shapes.items()}
            tensors.update({p + "input_layernorm.weight": torch.ones(hidden).half(),
                            p + "post_attention_layernorm.weight": torch.ones(hidden).half()})
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(f.stat().st_size for f in folder.iterdir())


def write_text(path: Path, words: int = 20000) -> Path:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, WORDS, (words,), generator=g).tolist()
    path.write_text("\n".join(" ".join(f"w{i}" for i in ids[j:j + 16]) for j in range(0, words, 16)) + "\n")
    return path


# --- one compile in a fresh process --------------------------------------------------------
def child(report: str, argv: list[str]) -> int:
    """Run `quipc ARGV` in this process and write its peak RSS and time to `report`."""
    from quipc.cli import main

    t0 = time.time()
    rc = main(argv)
    status = Path("/proc/self/status").read_text()
    hwm = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM:"))
    Path(report).write_text(json.dumps({"rc": rc, "peak_rss_mb": hwm / 1024, "seconds": time.time() - t0}))
    return rc


def measured_compile(argv: list[str], work: Path) -> dict:
    report = work / "report.json"
    report.unlink(missing_ok=True)
    subprocess.run([sys.executable, __file__, "--child", str(report), "--", *argv], check=True)
    return json.loads(report.read_text())


def digest(folder: Path) -> str:
    """The artifact's data files and its manifest less the timings."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.safetensors")):
        h.update(f.relative_to(folder).as_posix().encode() + f.read_bytes())
    man = json.loads((folder / "manifest.json").read_text())
    for key in ("compile_seconds",):
        man.pop(key, None)
    (man.get("finetune") or {}).pop("seconds", None)
    for key in ("total_bytes", "bits_per_param", "pad"):
        man["summary"].pop(key, None)
    return h.update(json.dumps(man, sort_keys=True).encode()) or h.hexdigest()


# --- parts -----------------------------------------------------------------------------------
def part_rss(args, work: Path, keep) -> list[dict]:
    text = write_text(work / "calib.txt")
    common = ["--bits", "2", "--format", args.format, "--calib", str(text), "--calib-windows", str(args.windows),
              "--calib-len", str(args.calib_len), "--finetune", "none", "--no-progress"]
    records = []
    for blocks in args.blocks:
        model = work / f"llama-{args.hidden}x{blocks}"
        shutil.rmtree(model, ignore_errors=True)
        size = write_random_llama(model, blocks, args.hidden, args.intermediate, args.heads)
        out = work / f"out-{blocks}"
        shutil.rmtree(out, ignore_errors=True)
        try:
            r = measured_compile(["--threads", str(args.threads), "compile", str(model), "-o", str(out), *common], work)
        finally:
            shutil.rmtree(model, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
        records.append({"part": "rss", "model": f"random llama {args.hidden}/{args.intermediate} x {blocks} blocks",
                        "blocks": blocks, "format": args.format, "windows": args.windows,
                        "calib_len": args.calib_len, "fp16_bytes_on_disk": size, **r})
        keep(records)
    if args.smollm2:
        out = work / "out-smollm2"
        shutil.rmtree(out, ignore_errors=True)
        r = measured_compile(["--threads", str(args.threads), "compile", "smollm2-135m", "-o", str(out), *common], work)
        shutil.rmtree(out, ignore_errors=True)
        records.append({"part": "rss", "model": "smollm2-135m (GGUF)", "format": args.format, **r})
        keep(records)
    deep = [r for r in records if r.get("blocks")]
    if len(deep) >= 2:
        lo, hi = min(deep, key=lambda r: r["blocks"]), max(deep, key=lambda r: r["blocks"])
        per_block = (hi["seconds"] - lo["seconds"]) / (hi["blocks"] - lo["blocks"])
        records.append({"part": "rss", "summary": True, "rss_ratio": hi["peak_rss_mb"] / lo["peak_rss_mb"],
                        "seconds_per_block": per_block, "blocks": [lo["blocks"], hi["blocks"]],
                        "threads": args.threads,
                        "targets_met": hi["peak_rss_mb"] <= 1.3 * lo["peak_rss_mb"]
                        and hi["peak_rss_mb"] * 2**20 <= 3e9})      # 3 GB (decimal), 2861 MiB
        keep(records)
    return records


def part_timing(args, work: Path, keep) -> list[dict]:
    # every run the same configuration (one process's default is 1 window per e2e step, --workers' 2)
    calib = ["--calib-windows", str(args.timing_windows), "--calib-len", str(args.timing_len),
             "--finetune-step-windows", str(args.timing_step_windows)]
    runs = {"1x1": ["--threads", "1"], "2x1": ["--threads", "1", "--workers", "2"], "1x2": ["--threads", "2"]}
    records, outs = [], {}
    for name, extra in runs.items():
        out = outs[name] = work / f"smollm2-w2-{name}"
        shutil.rmtree(out, ignore_errors=True)
        argv = [extra[0], extra[1], "compile", "smollm2-135m", "--bits", "2", "-o", str(out), "--no-progress",
                *calib, *extra[2:]]
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "quipc", *argv], check=True)
        records.append({"part": "timing", "run": name, "ranks": 2 if "--workers" in extra else 1,
                        "threads_per_rank": int(extra[1]), "wall_seconds": time.time() - t0,
                        "calib_windows": args.timing_windows, "calib_len": args.timing_len,
                        "finetune_step_windows": args.timing_step_windows})
        keep(records)
    t = {r["run"]: r["wall_seconds"] for r in records}
    records.append({"part": "timing", "summary": True, "speedup_2x1_over_1x1": t["1x1"] / t["2x1"],
                    "speedup_1x2_over_1x1": t["1x1"] / t["1x2"],
                    "identical_2x1_1x1": digest(outs["2x1"]) == digest(outs["1x1"])})
    keep(records)
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    return records


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[4:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--parts", default="rss,timing", help="rss, timing or both (comma separated)")
    p.add_argument("--workdir", default="/tmp", help="where the random models and outputs go (deleted after)")
    p.add_argument("--blocks", default="4,16", help="depths of the random models (\"\" for none)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--windows", type=int, default=4, help="rss part: calibration windows")
    p.add_argument("--calib-len", type=int, default=64, help="rss part: tokens per window")
    p.add_argument("--threads", type=int, default=2, help="rss part: threads of the compile")
    p.add_argument("--format", default="e8p", help="rss part: code format (e8p, the default, or grid: "
                                                   "its rounding is much faster on 4096-wide blocks)")
    p.add_argument("--no-smollm2", dest="smollm2", action="store_false", help="rss part: skip SmolLM2")
    p.add_argument("--timing-windows", type=int, default=64, help="timing part: calibration windows")
    p.add_argument("--timing-len", type=int, default=512, help="timing part: tokens per window")
    p.add_argument("--timing-step-windows", type=int, default=2,
                   help="timing part: e2e windows per Adam step, for every run (--workers' default)")
    args = p.parse_args()
    args.blocks = [int(b) for b in args.blocks.split(",") if b]
    parts = args.parts.split(",")
    if unknown := set(parts) - {"rss", "timing"}:
        p.error(f"unknown parts {sorted(unknown)}")
    work = Path(args.workdir) / f"quipc-scale-{os.getpid()}"
    work.mkdir(parents=True)
    out = Path(args.json)
    earlier = json.loads(out.read_text()) if out.exists() else []

    def keep_part(part):
        def keep(records):   # written after every measurement
            print(json.dumps(records[-1]), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps([r for r in earlier if r.get("part") != part] + records, indent=1))
        return keep

    try:
        for part in parts:
            records = (part_rss if part == "rss" else part_timing)(args, work, keep_part(part))
            earlier = [r for r in earlier if r.get("part") != part] + records
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

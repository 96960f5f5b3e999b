"""An artifact on the CUDA kernels against the same artifact on the CPU kernels, whole model.

    python benchmarks/gpu_model.py ART --text wiki.test.raw [--windows 4] [--ctx 2048]
        [--fp32-answers benchmarks/results/agreement_..._fp32_answers.json] [--json F]

On a machine with a GPU and the extension built with QUIPC_CUDA=ON (scripts/gpu_check.sh):
- logits of the first window through the CUDA kernels and through the CPU kernels (both exact
  fp32 paths), the relative error max|a - b| / max|b| and the share of positions whose top token
  agrees;
- perplexity over the first `--windows` PROTOCOL windows on each (same windows, so the two
  figures compare; PROTOCOL's full figure uses 16);
- greedy decode on the GPU (KV cache, batch 1): ms per token over 128 new tokens after a warm-up,
  and the answer to "What is the capital of France?"; the same for the artifact's dense twin
  (every quantized linear as an nn.Linear of the weights it computes) in fp32 and fp16, the
  baseline without quipc's kernels;
- with --fp32-answers (the fp32 model's answers that benchmarks/agreement.py cached), the answer
  agreement of the GPU run (ROUGE-L F1, PROTOCOL "Answer agreement"); the fp32 model itself need
  not be on the machine.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

PROMPT = "What is the capital of France?"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def dense_twin(artifact: str, dtype: torch.dtype):
    """The artifact's model with every quantized linear replaced by an nn.Linear holding the
    weights it computes (read off by feeding it the identity), on the GPU in `dtype`: the
    same network as a dense model, the baseline a GPU user would otherwise run."""
    import quipc_runtime
    from quipc_runtime.modules import QuipLinearRef

    model = quipc_runtime.load(artifact, backend="reference")
    with torch.no_grad():   # (not inference_mode: the new parameters must serve generate() too)
        for name, mod in list(model.named_modules()):
            if isinstance(mod, QuipLinearRef):
                b = mod(torch.zeros(1, mod.in_features))[0]
                w = (mod(torch.eye(mod.in_features)) - b).t()
                dense = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
                dense.weight.data.copy_(w)
                if mod.bias is not None:
                    dense.bias.data.copy_(b)
                model.set_submodule(name, dense)
    return model.to("cuda", dtype)


def decode_ms_per_token(model, tok, new_tokens: int) -> tuple[float, str]:
    from quipc.eval.chat import answer_ids, prompt_ids

    ids = prompt_ids(tok, PROMPT).cuda()
    answer = tok.decode(answer_ids(model, tok, PROMPT, 64))   # also the warm-up
    with torch.inference_mode():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens
    return 1e3 * seconds / new_tokens, answer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact")
    p.add_argument("--text", required=True)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--fp32-answers", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import quipc_runtime
    from quipc.eval.perplexity import eval_windows, perplexity, torch_logits_fn
    from quipc_runtime import kernels
    from quipc_runtime.loader import load_tokenizer

    if not kernels.cuda_available():
        raise SystemExit("no CUDA kernels: build with QUIPC_CUDA=ON and run where a GPU is visible")
    tok = load_tokenizer(args.artifact)
    cpu = quipc_runtime.load(args.artifact, backend="kernels", trellis_as_int8="none")
    gpu = quipc_runtime.load(args.artifact, device="cuda", backend="kernels")
    windows = eval_windows(tok, args.text, args.ctx, args.windows)
    rec = {"artifact": args.artifact, "device": torch.cuda.get_device_name(0), "cpu_threads": torch.get_num_threads()}
    with torch.inference_mode():
        a = cpu(windows[:1]).logits[0]
        b = gpu(windows[:1].cuda()).logits[0].cpu()
    rec["logits_rel_err"] = rel_err(b, a)
    rec["top1_agree"] = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    rec["ppl_cpu"] = perplexity(torch_logits_fn(cpu), windows, progress=False)
    rec["ppl_gpu"] = perplexity(torch_logits_fn(gpu), windows, progress=False)
    rec["ppl_rel_diff"] = rec["ppl_gpu"]["ppl"] / rec["ppl_cpu"]["ppl"] - 1
    rec["decode_ms_per_token_gpu"], rec["answer_gpu"] = decode_ms_per_token(gpu, tok, args.new_tokens)
    for dtype in (torch.float32, torch.float16):
        twin = dense_twin(args.artifact, dtype)
        key = f"dense_{str(dtype).split('.')[-1]}"
        if dtype == torch.float32:   # the twin computes what the artifact computes
            with torch.inference_mode():
                rec["dense_float32_logits_rel_err"] = rel_err(twin(windows[:1].cuda()).logits[0].cpu(), a)
        rec[f"decode_ms_per_token_{key}"], rec[f"answer_{key}"] = decode_ms_per_token(twin, tok, args.new_tokens)
        del twin
    if args.fp32_answers:
        from quipc.eval.agreement import PROMPTS, agreement, chat_answers

        ref = json.loads(Path(args.fp32_answers).read_text())
        if ref["prompts"] != PROMPTS:
            raise SystemExit(f"{args.fp32_answers} answers other prompts than quipc.eval.agreement.PROMPTS")
        t0 = time.perf_counter()
        rec["agreement_gpu"] = agreement(chat_answers(gpu, tok), ref["answers"])
        rec["agreement_gpu"]["seconds"] = time.perf_counter() - t0
    print(json.dumps(rec, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Are a quantized model's chat answers lost in its lm_head / embedding, or in its blocks?

Loads an artifact whose head (and tied embedding) are quantized and scores its greedy chat
answers against the fp32 model's (ROUGE-L, quipc.eval.agreement) four ways: as stored; with the
fp32 lm_head swapped in; with the fp32 embedding swapped in; with only the tokenizer's special
tokens exact in both (their rows of the fp32 table). If none of the swaps brings the answers
back, the blocks lost them. Torch reference path, greedy, deterministic. With --text, each way's
WikiText perplexity (PROTOCOL windows) as well: how much of the whole-model cost is the head's,
how much the embedding's.

    python benchmarks/head_attribution.py ART [--prompts 8] [--text wiki.test.raw --windows 16]
        [--threads 2] [--json F]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn


class RowsExactHead(nn.Module):
    """The quantized head, with the logits of `rows` from the fp32 table."""

    def __init__(self, head: nn.Module, table: torch.Tensor, rows: list[int]):
        super().__init__()
        self.head, self.rows, self.exact = head, torch.tensor(rows), table[rows].clone()

    def forward(self, x):
        y = self.head(x).clone()
        y[..., self.rows] = x @ self.exact.T.to(x.dtype)
        return y


class RowsExactEmbedding(nn.Module):
    """The quantized embedding, with the rows of `rows` from the fp32 table."""

    def __init__(self, embedding: nn.Module, table: torch.Tensor, rows: list[int]):
        super().__init__()
        self.embedding, self.table, self.rows = embedding, table, torch.tensor(rows)

    def forward(self, ids):
        y = self.embedding(ids).clone()
        mask = torch.isin(ids, self.rows)
        y[mask] = self.table[ids[mask]].to(y.dtype)
        return y


def variants(art: Path, table: torch.Tensor, special: list[int], head_name: str, emb_name: str):
    import quipc_runtime

    def fp32_head(m):
        lin = nn.Linear(table.shape[1], table.shape[0], bias=False)
        lin.weight.data = table.clone()
        m.set_submodule(head_name, lin)

    def fp32_embedding(m):
        m.set_submodule(emb_name, nn.Embedding.from_pretrained(table.clone()))

    def special_rows(m):
        m.set_submodule(head_name, RowsExactHead(m.get_submodule(head_name), table, special))
        m.set_submodule(emb_name, RowsExactEmbedding(m.get_submodule(emb_name), table, special))

    for name, patch in (("as stored", None), ("fp32 lm_head", fp32_head), ("fp32 embedding", fp32_embedding),
                        ("special tokens' rows exact", special_rows)):
        model = quipc_runtime.load(art)
        if patch is not None:
            patch(model)
        yield name, model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--prompts", type=int, default=8, help="the first N of quipc.eval.agreement.PROMPTS")
    ap.add_argument("--text", help="also each way's perplexity on this text (PROTOCOL windows)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="append the records to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from quipc.eval.agreement import PROMPTS, agreement, chat_answers
    from quipc.eval.perplexity import eval_windows, perplexity, torch_logits_fn
    from quipc.frontend.hf import load_model
    from quipc.frontend.models import resolve
    from quipc_runtime.loader import load_tokenizer

    art = Path(args.artifact)
    manifest = json.loads((art / "manifest.json").read_text())
    head, emb = manifest.get("head"), manifest.get("embedding")
    if not head or not emb or emb.get("kind") == "dense":
        raise SystemExit(f"{art}: its lm_head and embedding are not both quantized; nothing to attribute")
    ref, _ = load_model(resolve(manifest["source"]["spec"]))
    ref.config.use_cache = True
    table = ref.get_input_embeddings().weight.detach().float().clone()
    if not manifest["model_config"].get("tie_word_embeddings"):
        raise SystemExit(f"{art}: an untied model (this benchmark swaps in one table for both)")
    tok = load_tokenizer(art)
    prompts = PROMPTS[: args.prompts]
    reference = chat_answers(ref, tok, prompts)
    windows = eval_windows(tok, args.text, windows=args.windows) if args.text else None
    special = sorted(set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {}))
    records = []
    for name, model in variants(art, table, special, head["module"], emb["module"]):
        answers = chat_answers(model, tok, prompts)
        score = agreement(answers, reference)
        rec = {"artifact": str(art), "variant": name, "rouge_l": score["rouge_l"], "identical": score["identical"],
               "prompts": len(prompts), "first_answer": tok.decode(answers[0]), "special_rows": len(special)}
        if windows is not None:
            rec.update(ppl=perplexity(torch_logits_fn(model), windows, progress=False)["ppl"],
                       windows=int(windows.shape[0]))
        print(json.dumps(rec), flush=True)
        records.append(rec)
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(old + records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

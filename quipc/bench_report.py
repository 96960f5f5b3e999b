"""The report of `quipc bench`: the text table and the chart of its records."""
from __future__ import annotations

from pathlib import Path


def format_table(records: list[dict], meta: dict) -> str:
    w = max([14] + [len(r["backend"]) for r in records])   # the backend column fits every name
    lines = [f"threads={meta['threads']}  reps={meta['reps']} (median, [min-max])  "
             f"prompt={meta['prompt_len']} tokens  decode={meta['new_tokens']} tokens",
             f"{'backend':<{w}} {'bits':>4} {'prefill ms':>22} {'decode ms/token':>22} {'tok/s':>7} {'peak MiB':>9}"]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"{r['backend']:<{w}} {r['status']}: {r['reason']}")
            continue
        p, d = r["spread"]["prefill_ms"], r["spread"]["decode_ms"]
        lines.append(f"{r['backend']:<{w}} {str(r['bits'] or 'fp32'):>4} "
                     f"{r['prefill_ms']:>8.1f} [{p[0]:.1f}-{p[1]:.1f}]".ljust(w + 29)
                     + f"{r['decode_ms']:>8.2f} [{d[0]:.2f}-{d[1]:.2f}]".rjust(23)
                     + f" {r['tok_s']:>7.1f} {r['peak_mb']:>9.0f}")
    return "\n".join(lines)


def write_chart(records: list[dict], meta: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return "no backend ran"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "decode_ms", "decode, ms per token"),
                           (axes[1], "prefill_ms", f"prefill of {meta['prompt_len']} tokens, ms")):
        names = [r["backend"] for r in ok]
        vals = [r[key] for r in ok]
        lo = [r[key] - r["spread"][key][0] for r in ok]
        hi = [r["spread"][key][1] - r[key] for r in ok]
        colors = ["#999999" if n.startswith("fp32") else "#cc7733" if n.startswith("llamacpp") else "#3366aa"
                  for n in names]
        ax.bar(names, vals, yerr=[lo, hi], capsize=4, color=colors)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{Path(meta['artifact']).name}: {meta['threads']} threads, median of {meta['reps']} "
                 "interleaved reps, bars = min-max")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None

"""Where a TVM build's decode time goes: per-function times of one decode step.

    python benchmarks/tvm_profile.py TVM_BUILD [--cache 256] [--pos 64] [--threads 2] [--json F]

TVM 0.27's Relax VM has no profiler, so this uses its instrument hook (called before and after
every VM call): before each call the function is run once to warm it, then `--repeat` times
under a timer, and the VM then runs it as usual. The table lists, per function (PrimFuncs and
VM builtins), the milliseconds it takes per decoded token, its calls per token and the time per
call. Repeated calls read their weights from a warm cache, so the sum is a lower bound of the
work; "plain" is the time of `--steps` decode steps just before, without the hook (Python's
per-call cost of the timer is in the builtins' figures, not in plain's). A prompt of `--pos`
tokens first, in a cache of `--cache` positions.
"""
from __future__ import annotations

import argparse
import collections
import json
import time

import numpy as np


def profile(build: str, cache_positions: int, pos: int, threads: int, steps: int, repeat: int) -> dict:
    from quipc_runtime.tvm_runtime import TvmLM

    lm = TvmLM(build, threads=threads)
    if pos + 2 * steps > cache_positions:
        raise SystemExit(f"--cache {cache_positions} is too small for --pos {pos} and {2 * steps} steps")
    cache = lm.new_cache(cache_positions)
    logits = lm.prefill(np.arange(100, 100 + pos) % lm.vocab, cache)
    at = pos
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = lm.decode(int(np.argmax(logits)), at, cache)
        at += 1
    plain_ms = (time.perf_counter() - t0) / steps * 1e3

    seconds = collections.defaultdict(float)
    calls = collections.Counter()

    def instrument(func, symbol, before, _ret, *args):
        if before:
            func(*args)
            t = time.perf_counter()
            for _ in range(repeat):
                func(*args)
            seconds[symbol] += (time.perf_counter() - t) / repeat
            calls[symbol] += 1
        return 0   # let the VM run the call as usual

    lm.vm.set_instrument(instrument)
    for _ in range(steps):
        logits = lm.decode(int(np.argmax(logits)), at, cache)
        at += 1
    rows = sorted(({"function": s, "ms_per_token": seconds[s] / steps * 1e3, "calls_per_token": calls[s] / steps,
                    "us_per_call": seconds[s] / calls[s] * 1e6} for s in seconds),
                  key=lambda r: -r["ms_per_token"])
    return {"build": build, "cache": cache_positions, "pos": pos, "threads": threads, "steps": steps,
            "plain_ms_per_token": plain_ms, "sum_ms_per_token": sum(r["ms_per_token"] for r in rows),
            "functions": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build", help="a TVM build folder (quipc compile ... --target tvm)")
    ap.add_argument("--cache", type=int, default=256, help="cache positions (default 256)")
    ap.add_argument("--pos", type=int, default=64, help="prompt tokens before the profiled steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="decode steps timed (plain, then profiled)")
    ap.add_argument("--repeat", type=int, default=20, help="timed runs of each call")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--json", help="write the profile here")
    a = ap.parse_args()
    res = profile(a.build, a.cache, a.pos, a.threads, a.steps, a.repeat)
    print(f"{a.build}: cache {a.cache}, pos {a.pos}, {a.threads} threads: plain decode "
          f"{res['plain_ms_per_token']:.2f} ms/token, sum of the profiled calls {res['sum_ms_per_token']:.2f}")
    for r in res["functions"][:a.top]:
        print(f"{r['ms_per_token']:8.3f} ms  {r['calls_per_token']:6.0f} calls x {r['us_per_call']:8.1f} us  "
              f"{r['function']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

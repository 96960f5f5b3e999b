"""Run a traced TVM build (`quipc compile ... --target tvm --graph traced`) with the TVM runtime
alone, through TvmLM's interface (`logits`, `new_cache`, `prefill`, `decode`, `generate`), so
`quipc eval` and `quipc bench` run it unchanged; `tvm_runtime.TvmLM(folder)` returns one of
these for a traced build.

The build's functions (tvm_config.json, "graph": "traced"), with "cache": "capacity":
    forward(input_ids (1, seq) int64, span (S,) int64, caches...) -> (logits (1, seq, vocab), caches...)
    prefill(input_ids (1, seq) int64, span, caches..., last (1,) int64)
        -> (logits (1, 1, vocab) of row `last`, caches...)
    decode(input_ids (1, 1) int64, span, caches...)    -> (logits (1, 1, vocab), caches...)
caches: per layer its key then its value, (1, kv_heads, capacity, head_dim) float32, written in
place at positions [S - seq, S) (S = the span's length). Prompts (forward, prefill) are padded
at the end to a multiple of the config's row_multiple R and passed as (1, seq / R, R): the
padding's positions are written too, and overwritten by the next call (held counts the real
positions only).
Builds made before it (no "cache" in the config) take the cache concatenated:
    forward / prefill / decode(input_ids, past...) -> (logits, present...)
past / present (1, kv_heads, positions, head_dim), present one call longer, replaced on each
call; builds older still have no `prefill` (the last row of `forward` stands in).
A cache here is a TracedCache: the list of those arrays and the positions it holds.
This module imports neither quipc nor torch.

Memory (concatenated builds): each call's present arrays are one position longer than any
before, and TVM's pooled allocator keeps every freed block for a later request of the same
(page-rounded) size, which never comes: measured on SmolLM2, 400 decode steps held 2.7 GB (0.6
GB after 32) and the held memory grows with the square of the steps. So every CLEAR_EVERY calls
the pool's free blocks are released (`vm.builtin.memory_manager.clear`; blocks in use stay):
400 steps then hold 0.68 GB. A capacity cache allocates nothing that grows.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .tvm_runtime import CONFIG, greedy, import_tvm

CLEAR_EVERY = 16   # calls between releases of the allocator's free blocks (concatenated builds)


class TracedCache(list):
    """The cache arrays (per layer: key, value) and `held`, the positions written so far;
    `capacity` the positions it may hold (None: a concatenated cache, which grows); the arrays
    of a capacity cache have room for a padded prompt's tail beyond it."""

    def __init__(self, arrays, capacity: int | None):
        super().__init__(arrays)
        self.held, self.capacity = 0, capacity


class TracedTvmLM:
    def __init__(self, folder, threads: int | None = None):
        folder = Path(folder)
        self.cfg = json.loads((folder / CONFIG).read_text())
        if self.cfg.get("graph") != "traced":
            raise ValueError(f"{folder} is not a traced TVM build")
        tvm = import_tvm(threads)
        from tvm.runtime import vm as tvm_vm

        self.tvm, self.dev = tvm, tvm.cpu(0)
        self.vm = tvm_vm.VirtualMachine(tvm.runtime.load_module(str(folder / "model.so")), self.dev)
        m = self.cfg["model"]
        self.layers, self.vocab, self.max_pos = m["layers"], m["vocab"], m["max_pos"]
        self.kv_heads, self.head_dims = m["kv_heads"], m["head_dims"]
        self.eos_token_id = self.cfg.get("eos_token_id")
        self._forward, self._decode = self.vm["forward"], self.vm["decode"]
        self._prefill = self.vm["prefill"] if "prefill" in self.cfg.get("functions", ()) else None
        self.capacity_cache = self.cfg.get("cache") == "capacity"
        self.row_multiple = int(self.cfg.get("row_multiple", 1))
        self._release = tvm.get_global_func("vm.builtin.memory_manager.clear", allow_missing=True)
        self._token = self._t(np.zeros((1, 1), np.int64))
        self.calls = 0

    def _t(self, arr: np.ndarray):
        return self.tvm.runtime.tensor(np.ascontiguousarray(arr), self.dev)

    def new_cache(self, capacity: int = 0) -> TracedCache:
        """An empty cache for `capacity` positions (a concatenated build's grows: capacity unused).
        A capacity cache holds row_multiple - 1 positions more, rounded up to a multiple of it,
        for the padding of a prompt that ends near the capacity."""
        if not self.capacity_cache:
            return TracedCache([self._t(np.zeros((1, self.kv_heads[i // 2], 0, self.head_dims[i // 2]), np.float32))
                                for i in range(2 * self.layers)], None)
        if capacity > self.max_pos:
            raise ValueError(f"a cache of {capacity} positions exceeds the model's {self.max_pos}")
        r = self.row_multiple
        cap = max(-(-(int(capacity) + r - 1) // r) * r, 2)   # the build's capacity dimension starts at 2
        return TracedCache([self._t(np.zeros((1, self.kv_heads[i // 2], cap, self.head_dims[i // 2]), np.float32))
                            for i in range(2 * self.layers)], max(int(capacity), 1))

    def _run(self, fn, ids: np.ndarray, cache: TracedCache, prompt: bool = False, last: bool = False) -> np.ndarray:
        """prompt: fn takes rows padded to row_multiple (capacity builds); last: fn takes the
        last real row's index and returns its logits only."""
        n = ids.shape[1]
        if cache.capacity is None:
            out = fn(self._t(ids.astype(np.int64)), *cache)
        else:
            if cache.held + n > cache.capacity:
                raise ValueError(f"{n} tokens after {cache.held} do not fit a cache of {cache.capacity} positions")
            if prompt:
                rows = -(-n // self.row_multiple) * self.row_multiple
                padded = np.zeros((1, rows), np.int64)
                padded[:, :n] = ids
                if self.row_multiple > 1:   # the prompt functions take (1, tiles, row_multiple)
                    padded = padded.reshape(1, -1, self.row_multiple)
                tokens = self._t(padded)
            else:   # decode: one token, into the (1, 1) input kept for it
                rows, tokens = n, self._token
                tokens.copyfrom(ids.astype(np.int64))
            extra = [self._t(np.array([n - 1], np.int64))] if last else []
            out = fn(tokens, self._t(np.zeros(cache.held + rows, np.int64)), *cache, *extra)
        if cache.capacity is None:   # a capacity cache's arrays come back as they went in, written
            cache[:] = [out[1 + i] for i in range(2 * self.layers)]   # in place
        cache.held += n
        logits = np.from_dlpack(out[0])[0].copy()   # Tensor.numpy() took 5x as long (0.18 ms)
        del out
        self.calls += 1
        if cache.capacity is None and self._release is not None and self.calls % CLEAR_EVERY == 0:
            self._release()
        return logits if last else logits[:n]

    @staticmethod
    def _ids(ids) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        if arr.shape[1] == 0:
            raise ValueError("empty prompt")
        return arr

    def logits(self, ids) -> np.ndarray:
        """(L, vocab) logits of one sequence."""
        ids = self._ids(ids)
        return self._run(self._forward, ids, self.new_cache(ids.shape[1]), prompt=True)

    def prefill(self, ids, cache: list) -> np.ndarray:
        """Run the prompt into `cache`; returns the last row's logits (V,)."""
        if self._prefill is None:
            return self.prefill_all(ids, cache)[-1]
        return self._run(self._prefill, self._ids(ids), cache, prompt=True, last=self.capacity_cache)[-1]

    def prefill_all(self, ids, cache: list) -> np.ndarray:
        return self._run(self._forward, self._ids(ids), cache, prompt=True)

    def decode(self, token: int, pos: int, cache: TracedCache) -> np.ndarray:
        """One token at position `pos` (the cache holds [0, pos)); returns its logits (V,)."""
        if cache.held != pos:
            raise ValueError(f"decode at position {pos}, but the cache holds {cache.held} positions")
        return self._run(self._decode, np.array([[token]], np.int64), cache)[0]

    def generate(self, ids, max_new_tokens: int, eos_token_id: int | None = None,
                 stop_at_eos: bool = True) -> np.ndarray:
        """Greedy generation: prompt + new tokens as an int64 array (1, L + n)."""
        prompt = self._ids(ids)[0]
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        cache = self.new_cache(prompt.size + max(max_new_tokens - 1, 0))
        return greedy(self, prompt, cache, max_new_tokens, eos if stop_at_eos else None)

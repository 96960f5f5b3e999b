// Software prefetch for the decode GEMVs' weight streams (x86 SIMD translation units only).
// A GEMV reads each weight once, in row order within a thread's rows, and a decode step calls
// some 200 small layers one after another: at each layer's start the hardware prefetchers have
// no stream to follow yet, and a thread's share (50-450 KB at SmolLM2's shapes) ends before
// they run far ahead. Asking for the line kPrefetchBytes ahead of every weight line read keeps
// the stream in flight. On the 2-core Xeon host (stop 51, into L1), SmolLM2's 210 decoder shapes one after another
// as in a decode step (batch 1, 2 threads): int8 rows on int8 activations (106 MB) 3.2-3.5 ms
// instead of 6.2-6.8 (4 KiB ahead: 3.7, 16 KiB: 3.4-3.5); the 4-bit grid GEMV on fp32
// activations 4.2-4.4 ms instead of 5.0-5.3, on int8 ones 2.4 instead of 2.5-2.6. The kernels
// whose time is arithmetic (the 2/3-bit grid table lookups, the trellis code gather) gained
// nothing and do not prefetch. The line goes to L2 (prefetcht1), not L1: on the 2-core AMD EPYC
// host (stop 60), 30 SmolLM2 layers of linears alone in onnxruntime with the custom-op library
// (a scratch graph, 2 threads, weights streamed from memory) took 3.3 ms instead of 4.1 as 4-bit
// grid codes on int8 activations and 4.8 instead of 7.9 as int8 rows (into L1 at 2-16 KiB ahead
// 4.2-4.5 / 7.4-7.7, no prefetch 4.8 / 9.4, non-temporal 3.7 / 7.5); the whole model's decode 9.9 instead
// of 10.8 ms a token (w4 grid), 9.2 instead of 13.2 (the w4 default) and 7.0 instead of 9.2
// (the w2 default). An L1 prefetch holds one of the core's few L1 miss buffers until its line
// arrives; L2's has many more. A prefetch never faults: the addresses past a matrix's end that
// the last rows ask for are harmless (computed as integers, not as pointers past the array).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace quipc {

constexpr uintptr_t kPrefetchBytes = 8192;

inline void prefetch_ahead(const void* p) {
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + kPrefetchBytes), _MM_HINT_T1);
}

}  // namespace quipc

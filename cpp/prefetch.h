// Software prefetch for the decode GEMVs' weight streams (x86 SIMD translation units only).
// A GEMV reads each weight once, in row order within a thread's rows, and a decode step calls
// some 200 small layers one after another: at each layer's start the hardware prefetchers have
// no stream to follow yet, and a thread's share (50-450 KB at SmolLM2's shapes) ends before
// they run far ahead. Asking for the line kPrefetchBytes ahead of every weight line read keeps
// the stream in flight. On the 2-core Xeon host, SmolLM2's 210 decoder shapes one after another
// as in a decode step (batch 1, 2 threads): int8 rows on int8 activations (106 MB) 3.2-3.5 ms
// instead of 6.2-6.8 (4 KiB ahead: 3.7, 16 KiB: 3.4-3.5); the 4-bit grid GEMV on fp32
// activations 4.2-4.4 ms instead of 5.0-5.3, on int8 ones 2.4 instead of 2.5-2.6. The kernels
// whose time is arithmetic (the 2/3-bit grid table lookups, the trellis code gather) gained
// nothing and do not prefetch. A prefetch never faults: the addresses past a matrix's end that
// the last rows ask for are harmless (computed as integers, not as pointers past the array).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace quipc {

constexpr uintptr_t kPrefetchBytes = 8192;

inline void prefetch_ahead(const void* p) {
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + kPrefetchBytes), _MM_HINT_T0);
}

}  // namespace quipc

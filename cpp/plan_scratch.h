// What the plan's translation units (quip_linear.cpp, quip_linear_group.cpp) share: their
// per-thread scratch and how many threads a piece of work is worth.
#pragma once
#include <cstddef>

namespace quipc {

// Per-thread scratch that only grows: a decode step calls hundreds of small layers, and five
// allocations per call cost as much as a small layer's transforms. 64-byte aligned. Slots keep
// the buffers alive at the same time apart: the calling thread owns 0-2 (a forward's z, zsum,
// t) and 4-6 (a GEMV's prepared input) for a whole call, pool threads use 3 only.
float* plan_scratch(int slot, size_t count);

// `threads` is an upper bound: a thread gets at least 65536 multiply-adds of total_work, since
// waking one costs a few microseconds (tiny layers and single rows run inline), and at most
// one of work_items.
int plan_threads(int threads, int work_items, double total_work);

}  // namespace quipc

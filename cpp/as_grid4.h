// e8p layers whose GEMV the plan runs by the 4-bit grid kernels: their W' rewritten once, at plan
// creation, as 4-bit grid planes (packing.pack's layout: a group's 8 nibbles little-endian,
// code j at bits 4j) whose grid GEMVs sum to W' z. Each plane p is the grid row
// scale_p[i] * codes_p[i, :] + zero_p[i], so t = sum_p (scale_p (codes_p . z) + zero_p sum(z)).
#pragma once
#include <cstdint>

#include "quip_linear.h"

namespace quipc {

// Stage `stage` of an e8p layer, exactly (LayerData::e8p_as_grid4).
Grid4Plane e8p_stage_as_grid4(const LayerData& d, int stage);

}  // namespace quipc

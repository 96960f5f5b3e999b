// Layers whose GEMV the plan runs by the 4-bit grid kernels: their W' rewritten once, at plan
// creation, as 4-bit grid planes (packing.pack's layout: a group's 8 nibbles little-endian,
// code j at bits 4j) whose grid GEMVs sum to W' z. Each plane p is the grid row
// scale_p[i] * codes_p[i, :] + zero_p[i], so t = sum_p (scale_p (codes_p . z) + zero_p sum(z)).
#pragma once
#include <cstdint>
#include <vector>

#include "quip_linear.h"

namespace quipc {

// Stage `stage` of an e8p layer, exactly (LayerData::e8p_as_grid4).
Grid4Plane e8p_stage_as_grid4(const LayerData& d, int stage);

// A trellis layer's W' rounded to 8 bits per row (LayerData::trellis_as_int8): q = round(W' /
// step) in [-127, 127] with step = max |W'_i,:| / 127, and q + 128 = 16 hi + lo split into the
// planes hi (scale 16 step, zero -128 step) and lo (scale step, zero 0).
std::vector<Grid4Plane> trellis_as_int8_planes(const LayerData& d);

}  // namespace quipc

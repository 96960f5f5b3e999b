// The code formats of W' that the kernels run (runtime/quipc_runtime/formats defines each).
#pragma once

namespace quipc {

// kTrellis and kTrellis256 share the trellis layout and kernels (trellis.h), each with its code table.
enum class CodeFormat { kGrid, kE8P, kTrellis, kTrellis256 };

inline bool is_trellis(CodeFormat f) { return f == CodeFormat::kTrellis || f == CodeFormat::kTrellis256; }

}  // namespace quipc

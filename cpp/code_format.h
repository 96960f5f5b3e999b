// The code formats of W' that the kernels run (runtime/quipc_runtime/formats defines each).
#pragma once

namespace quipc {

enum class CodeFormat { kGrid, kE8P, kTrellis };

}  // namespace quipc

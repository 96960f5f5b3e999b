// The pybind11 module quipc_runtime._kernels. The bindings take numpy arrays (any buffer
// numpy can view) and never link libtorch. This file defines the module and its free
// functions (kernel set, e8p tables, the standalone Kronecker transform); the layer plans
// register their classes from bindings_plan.cpp and bindings_cuda.cpp (see bindings.h).
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "bindings.h"
#include "e8p.h"
#include "kernels.h"

namespace py = pybind11;
using namespace quipc;
using namespace quipc::bindings;

PYBIND11_MODULE(_kernels, mod) {
  mod.doc() = "quipc fast kernels (CPU AVX2/scalar, optional CUDA)";
  mod.def("cpu_has_avx2_fma", &cpu_has_avx2_fma);
  mod.def("kernel_name", [](bool force_scalar) { return std::string(select_kernels(force_scalar).name); },
          py::arg("force_scalar") = false, "Name of the CPU kernel set that would run.");
  mod.def(
      "e8p_codebooks",
      [] {
        // The C++ decoder's tables, for the tests: E8P[a] for every 16-bit a, and E8_1bit.
        const E8PTables& T = e8p_tables();
        py::array_t<float> e8p({py::ssize_t(1) << 16, py::ssize_t(8)});
        py::array_t<float> one_bit({py::ssize_t(256), py::ssize_t(8)});
        for (uint32_t a = 0; a < (1u << 16); ++a) e8p_point(T, a, e8p.mutable_data() + size_t(a) * 8);
        std::memcpy(one_bit.mutable_data(), T.one_bit, sizeof(T.one_bit));
        return py::make_tuple(e8p, one_bit);
      },
      "(E8P table (65536, 8), E8_1bit table (256, 8)) as the C++ kernels decode them.");
  mod.def("cuda_built", [] {
#ifdef QUIPC_WITH_CUDA
    return true;
#else
    return false;
#endif
  });

  register_plan(mod);

  mod.def(
      "kron_apply",
      [](const py::object& x, const py::sequence& factors, bool force_scalar) {
        py::array xa = expect_array<float>(x, "x", {-1, -1});
        const int batch = int(xa.shape(0)), n = int(xa.shape(1));
        KronTransform tr = make_transform(n, factors);
        py::array_t<float> y = new_matrix(batch, n);
        std::memcpy(y.mutable_data(), xa.data(), sizeof(float) * size_t(batch) * n);
        {
          py::gil_scoped_release nogil;
          const KernelTable& k = select_kernels(force_scalar);
          std::vector<float> scratch(static_cast<size_t>(n));
          float* yp = y.mutable_data();
          for (int b = 0; b < batch; ++b) {
            tr.apply(k, yp + size_t(b) * n, scratch.data());
            for (int j = 0; j < n; ++j) yp[size_t(b) * n + j] *= tr.gain();
          }
        }
        return y;
      },
      py::arg("x"), py::arg("factors"), py::arg("force_scalar") = false,
      "(F_1 x ... x F_k) applied to each row of x; factors are (matrix, fwht) pairs.");

#ifdef QUIPC_WITH_CUDA
  register_cuda(mod);
#endif
}

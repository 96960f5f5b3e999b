// The pybind11 module quipc_runtime._kernels. The bindings take numpy arrays (any buffer
// numpy can view) and never link libtorch. This file defines the module and its free
// functions (kernel set, e8p tables, the standalone Kronecker transform); the layer plans
// register their classes from bindings_plan.cpp and bindings_cuda.cpp (see bindings.h).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "bindings.h"
#include "e8p.h"
#include "kernels.h"
#include "trellis.h"

namespace py = pybind11;
using namespace quipc;
using namespace quipc::bindings;

PYBIND11_MODULE(_kernels, mod) {
  mod.doc() = "quipc fast kernels (CPU AVX2/scalar, optional CUDA)";
  mod.def("cpu_has_avx2_fma", &cpu_has_avx2_fma);
  mod.def("cpu_has_avx512_vnni", &cpu_has_avx512_vnni);  // the row tiles' VNNI kernels
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
  register_decoder(mod);

  mod.def(
      "trellis_code_table",
      [](const std::string& format) {
        py::array_t<float> t(py::ssize_t(1) << kTrellisL);
        const CodeFormat f = parse_format(format);
        if (!is_trellis(f)) throw py::value_error("format '" + format + "' has no trellis code table");
        std::memcpy(t.mutable_data(), trellis_code_table(f), sizeof(float) << kTrellisL);
        return t;
      },
      py::arg("format") = "trellis",
      "A trellis format's code table (2^12 floats) as the C++ kernels decode it.");
  mod.def(
      "trellis_encode",
      [](const py::object& x, const py::object& table, int k, int threads, bool force_scalar) {
        py::array xa = expect_array<float>(x, "x", {-1, -1});
        py::array ta = expect_array<float>(table, "table", {-1});
        const int batch = int(xa.shape(0)), T = int(xa.shape(1));
        const py::ssize_t S = ta.shape(0);
        int L = 0;
        while ((py::ssize_t(1) << L) < S) ++L;
        if ((py::ssize_t(1) << L) != S || L < 2 * k || L > 16 || k < 2 || k > 4 || T < 2)
          throw py::value_error("trellis_encode: table must hold 2^L values with 2k <= L <= 16, "
                                "2 <= k <= 4, and sequences at least 2 long; got " +
                                std::to_string(S) + " values, k=" + std::to_string(k) +
                                ", T=" + std::to_string(T));
        py::array_t<int32_t> states({py::ssize_t(batch), py::ssize_t(T)});
        {
          py::gil_scoped_release nogil;
          trellis_encode(static_cast<const float*>(xa.data()), batch, T,
                         static_cast<const float*>(ta.data()), L, k, states.mutable_data(),
                         std::max(1, threads), force_scalar);
        }
        return states;
      },
      py::arg("x"), py::arg("table"), py::arg("k"), py::arg("threads") = 1,
      py::arg("force_scalar") = false,
      "Tail-biting Viterbi encoding of (batch, T) float32 sequences on the bitshift trellis "
      "with the 2^L code values `table` and k bits per step: (batch, T) int32 states.");

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

// pybind11 bindings. They take numpy arrays (any buffer numpy can view) and never link
// libtorch. Inputs are checked strictly (dtype, shape, contiguity, sizes): a mismatch
// raises TypeError / ValueError instead of being converted or read out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "e8p.h"
#include "kernels.h"
#include "quip_linear.h"
#include "transform.h"

#ifdef QUIPC_WITH_CUDA
#include "cuda/cuda_plan.h"
#endif

namespace py = pybind11;
using namespace quipc;

namespace {

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Checks that obj is a C-contiguous numpy array of dtype T with the given shape
// (-1: any extent); returns it.
template <class T>
py::array expect_array(const py::handle& obj, const char* name, std::vector<py::ssize_t> shape) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + " must be a numpy array, got " +
                         std::string(py::str(py::type::of(obj))));
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + " must have dtype " +
                         std::string(py::str(py::dtype::of<T>())) + ", got " +
                         std::string(py::str(a.dtype())));
  bool ok = a.ndim() == py::ssize_t(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || a.shape(i) == shape[i];
  if (!ok) {
    std::string want = "(";
    for (size_t i = 0; i < shape.size(); ++i)
      want += (i ? ", " : "") + (shape[i] < 0 ? std::string("*") : std::to_string(shape[i]));
    throw py::value_error(std::string(name) + " has shape " + shape_str(a) + ", expected " + want +
                          (shape.size() == 1 ? ",)" : ")"));
  }
  if (!(a.flags() & py::array::c_style) ||
      reinterpret_cast<uintptr_t>(a.data()) % alignof(T) != 0)
    throw py::value_error(std::string(name) + " must be C-contiguous and aligned");
  return a;
}

std::vector<float> to_vector(const py::handle& obj, const char* name, py::ssize_t len) {
  py::array a = expect_array<float>(obj, name, {len});
  const float* p = static_cast<const float*>(a.data());
  return std::vector<float>(p, p + len);
}

// factors: sequence of (matrix float32 (f, f), fwht: bool).
KronTransform make_transform(int n, const py::sequence& factors) {
  std::vector<Factor> out;
  for (const py::handle item : factors) {
    py::tuple pair = py::cast<py::tuple>(item);
    if (pair.size() != 2) throw py::value_error("a transform factor is a (matrix, fwht) pair");
    Factor f;
    f.fwht = py::cast<bool>(pair[1]);
    if (!py::isinstance<py::array>(pair[0]))
      throw py::type_error("transform factor must be a numpy array");
    py::array mat = py::reinterpret_borrow<py::array>(pair[0]);
    if (mat.ndim() != 2 || mat.shape(0) != mat.shape(1))
      throw py::value_error("transform factor must be a square matrix, got shape " + shape_str(mat));
    f.order = int(mat.shape(0));
    if (!f.fwht) {
      expect_array<float>(mat, "transform factor", {f.order, f.order});
      const float* p = static_cast<const float*>(mat.data());
      f.mat.assign(p, p + size_t(f.order) * f.order);
    }
    out.push_back(std::move(f));
  }
  try {
    return KronTransform(n, std::move(out));
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

// A plan plus the numpy array that owns its codes.
struct PyPlan {
  py::array codes;
  std::unique_ptr<QuipLinearPlan> plan;
};

CodeFormat parse_format(const std::string& format) {
  if (format == "grid") return CodeFormat::kGrid;
  if (format == "e8p") return CodeFormat::kE8P;
  throw py::value_error("the C++ kernels run the code formats grid, e8p; not '" + format + "'");
}

PyPlan make_plan(int m, int n, int bits, const py::object& codes, const py::object& scale,
                 const py::object& zero, const py::object& in_scale, const py::object& out_scale,
                 const py::object& bias, const py::sequence& in_factors,
                 const py::sequence& out_factors, const std::string& format) {
  if (bits < 2 || bits > 4) throw py::value_error("bits must be 2, 3 or 4, got " + std::to_string(bits));
  if (m < 1 || n < 1) throw py::value_error("layer shape must be positive");
  const CodeFormat fmt = parse_format(format);
  if (fmt == CodeFormat::kE8P && n % 8 != 0)
    throw py::value_error("format e8p codes groups of 8 weights; n = " + std::to_string(n) +
                          " is not a multiple of 8");
  const py::ssize_t row_bytes = py::ssize_t((n + 7) / 8) * bits;
  PyPlan p;
  p.codes = expect_array<uint8_t>(codes, "codes", {m, row_bytes});
  LayerData d;
  d.format = fmt;
  d.m = m;
  d.n = n;
  d.bits = bits;
  d.codes = static_cast<const uint8_t*>(p.codes.data());
  d.row_bytes = size_t(row_bytes);
  if (fmt == CodeFormat::kE8P) {
    const py::ssize_t stages = e8p_stages(bits);
    py::array sa = expect_array<float>(scale, "scale", {m, stages});
    const float* sp = static_cast<const float*>(sa.data());
    d.scale.assign(sp, sp + size_t(m) * stages);
    if (!zero.is_none()) throw py::value_error("format e8p has no zero points: zero must be None");
  } else {
    d.scale = to_vector(scale, "scale", m);
    d.zero = to_vector(zero, "zero", m);
  }
  d.in_scale = to_vector(in_scale, "in_scale", n);
  d.out_scale = to_vector(out_scale, "out_scale", m);
  if (!bias.is_none()) d.bias = to_vector(bias, "bias", m);
  KronTransform tin = make_transform(n, in_factors), tout = make_transform(m, out_factors);
  try {
    p.plan = std::make_unique<QuipLinearPlan>(std::move(d), std::move(tin), std::move(tout));
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  return p;
}

int check_threads(int threads) {
  if (threads < 1 || threads > 256) throw py::value_error("threads must be in [1, 256]");
  return threads;
}

py::array_t<float> new_matrix(py::ssize_t rows, py::ssize_t cols) {
  return py::array_t<float>({rows, cols});
}

// Rows of a (B, width) float32 input; B may be 0.
int batch_of(const py::handle& x, const char* name, int width) {
  py::array a = expect_array<float>(x, name, {-1, width});
  if (a.shape(0) > (1 << 30)) throw py::value_error("batch too large");
  return int(a.shape(0));
}

#ifdef QUIPC_WITH_CUDA
std::vector<cuda::HostFactor> host_factors(int n, const py::sequence& factors) {
  make_transform(n, factors);  // same checks as the CPU path
  std::vector<cuda::HostFactor> out;
  for (const py::handle item : factors) {
    py::tuple pair = py::cast<py::tuple>(item);
    cuda::HostFactor f;
    f.fwht = py::cast<bool>(pair[1]);
    py::array mat = py::reinterpret_borrow<py::array>(pair[0]);
    f.order = int(mat.shape(0));
    if (!f.fwht) {
      const float* p = static_cast<const float*>(mat.data());
      f.mat.assign(p, p + size_t(f.order) * f.order);
    }
    out.push_back(std::move(f));
  }
  return out;
}

std::unique_ptr<cuda::CudaPlan> make_cuda_plan(int device, int m, int n, int bits,
                                               const py::object& codes, const py::object& scale,
                                               const py::object& zero, const py::object& in_scale,
                                               const py::object& out_scale, const py::object& bias,
                                               const py::sequence& in_factors,
                                               const py::sequence& out_factors,
                                               const std::string& format) {
  PyPlan cpu = make_plan(m, n, bits, codes, scale, zero, in_scale, out_scale, bias, in_factors,
                         out_factors, format);  // validates everything (and the format name)
  cuda::HostLayer L;
  L.e8p = format == "e8p";
  L.m = m;
  L.n = n;
  L.bits = bits;
  L.codes = static_cast<const uint8_t*>(cpu.codes.data());
  L.row_bytes = size_t((n + 7) / 8) * bits;
  if (L.e8p) {
    py::array sa = expect_array<float>(scale, "scale", {m, e8p_stages(bits)});
    const float* sp = static_cast<const float*>(sa.data());
    L.scale.assign(sp, sp + size_t(m) * e8p_stages(bits));
  } else {
    L.scale = to_vector(scale, "scale", m);
    L.zero = to_vector(zero, "zero", m);
  }
  L.in_scale = to_vector(in_scale, "in_scale", n);
  L.out_scale = to_vector(out_scale, "out_scale", m);
  if (!bias.is_none()) L.bias = to_vector(bias, "bias", m);
  L.in_factors = host_factors(n, in_factors);
  L.out_factors = host_factors(m, out_factors);
  if (device < 0 || device >= cuda::device_count())
    throw py::value_error("no CUDA device " + std::to_string(device));
  return std::make_unique<cuda::CudaPlan>(device, L);
}

void check_batch(int batch) {
  if (batch < 0) throw py::value_error("batch must be >= 0");
}

void register_cuda(py::module_& mod) {
  mod.def("cuda_device_count", &cuda::device_count);
  mod.def("cuda_device_name", &cuda::device_name);
  // Pointer-level methods (_ptr): the caller (kernels.py) checks the arrays behind them.
  py::class_<cuda::CudaPlan>(mod, "CudaPlan")
      .def(py::init(&make_cuda_plan), py::arg("device"), py::arg("m"), py::arg("n"),
           py::arg("bits"), py::arg("codes"), py::arg("scale"), py::arg("zero"),
           py::arg("in_scale"), py::arg("out_scale"), py::arg("bias"), py::arg("in_factors"),
           py::arg("out_factors"), py::arg("format") = "grid")
      .def_property_readonly("m", &cuda::CudaPlan::m)
      .def_property_readonly("n", &cuda::CudaPlan::n)
      .def_property_readonly("padded_n", &cuda::CudaPlan::padded_n)
      .def_property_readonly("device", &cuda::CudaPlan::device)
      .def("forward_ptr", [](cuda::CudaPlan& p, uintptr_t x, uintptr_t y, int batch, uintptr_t stream) {
        check_batch(batch);
        py::gil_scoped_release nogil;
        p.forward(reinterpret_cast<const float*>(x), reinterpret_cast<float*>(y), batch, stream);
      })
      .def("transform_in_ptr", [](cuda::CudaPlan& p, uintptr_t x, uintptr_t z, int batch, uintptr_t stream) {
        check_batch(batch);
        py::gil_scoped_release nogil;
        p.transform_in(reinterpret_cast<const float*>(x), reinterpret_cast<float*>(z), batch, stream);
      })
      .def("matmul_ptr", [](cuda::CudaPlan& p, uintptr_t z, uintptr_t t, int batch, uintptr_t stream) {
        check_batch(batch);
        py::gil_scoped_release nogil;
        p.matmul(reinterpret_cast<const float*>(z), reinterpret_cast<float*>(t), batch, stream);
      })
      .def("transform_out_ptr", [](cuda::CudaPlan& p, uintptr_t t, uintptr_t y, int batch, uintptr_t stream) {
        check_batch(batch);
        py::gil_scoped_release nogil;
        p.transform_out(reinterpret_cast<const float*>(t), reinterpret_cast<float*>(y), batch, stream);
      })
      .def(
          "run_host",
          [](cuda::CudaPlan& p, const std::string& stage, const py::object& x) {
            int in_w, out_w;
            if (stage == "forward") in_w = p.n(), out_w = p.m();
            else if (stage == "transform_in") in_w = p.n(), out_w = p.padded_n();
            else if (stage == "matmul") in_w = p.padded_n(), out_w = p.m();
            else if (stage == "transform_out") in_w = p.m(), out_w = p.m();
            else throw py::value_error("stage must be forward, transform_in, matmul or transform_out");
            const int batch = batch_of(x, "x", in_w);
            py::array xa = py::reinterpret_borrow<py::array>(x);
            py::array_t<float> y = new_matrix(batch, out_w);
            {
              py::gil_scoped_release nogil;
              p.run_host(stage, static_cast<const float*>(xa.data()), y.mutable_data(), batch);
            }
            return y;
          },
          py::arg("stage"), py::arg("x"), "Runs one stage on host (numpy) data, for tests.")
      .def("benchmark", [](cuda::CudaPlan& p, const std::string& what, int batch, int iters) {
        py::gil_scoped_release nogil;
        return p.benchmark(what, batch, iters);
      }, py::arg("what"), py::arg("batch"), py::arg("iters") = 100);
}
#endif

}  // namespace

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

  py::class_<PyPlan>(mod, "Plan")
      .def(py::init(&make_plan), py::arg("m"), py::arg("n"), py::arg("bits"), py::arg("codes"),
           py::arg("scale"), py::arg("zero"), py::arg("in_scale"), py::arg("out_scale"),
           py::arg("bias"), py::arg("in_factors"), py::arg("out_factors"),
           py::arg("format") = "grid")
      .def_property_readonly("m", [](const PyPlan& p) { return p.plan->m(); })
      .def_property_readonly("n", [](const PyPlan& p) { return p.plan->n(); })
      .def(
          "forward",
          [](const PyPlan& p, const py::object& x, const py::object& out, int threads,
             bool force_scalar) {
            const int batch = batch_of(x, "x", p.plan->n());
            check_threads(threads);
            py::array y = out.is_none() ? py::array(new_matrix(batch, p.plan->m()))
                                        : expect_array<float>(out, "out", {batch, p.plan->m()});
            if (!y.writeable()) throw py::value_error("out must be writeable");
            py::array xa = py::reinterpret_borrow<py::array>(x);
            const float* xp = static_cast<const float*>(xa.data());
            float* yp = static_cast<float*>(y.mutable_data());
            {
              py::gil_scoped_release nogil;
              p.plan->forward(xp, batch, yp, threads, force_scalar);
            }
            return y;
          },
          py::arg("x"), py::arg("out") = py::none(), py::arg("threads") = 1,
          py::arg("force_scalar") = false, "y = quip_linear(x) for x of shape (B, n), float32.")
      .def(
          "transform_in",
          [](const PyPlan& p, const py::object& x, int threads, bool force_scalar) {
            const int batch = batch_of(x, "x", p.plan->n());
            check_threads(threads);
            const int npad = p.plan->padded_n();
            py::array_t<float> z = new_matrix(batch, npad);
            py::array_t<float> zsum(batch);
            py::array xa = py::reinterpret_borrow<py::array>(x);
            {
              py::gil_scoped_release nogil;
              p.plan->transform_in(select_kernels(force_scalar),
                                   static_cast<const float*>(xa.data()), batch, z.mutable_data(),
                                   zsum.mutable_data(), threads);
            }
            return py::make_tuple(z, zsum);
          },
          py::arg("x"), py::arg("threads") = 1, py::arg("force_scalar") = false,
          "(z, zsum): z = K_in(in_scale * x) padded to a multiple of 8 columns, zsum its row sums.")
      .def(
          "matmul",
          [](const PyPlan& p, const py::object& z, const py::object& zsum, int threads,
             bool force_scalar) {
            const int batch = batch_of(z, "z", p.plan->padded_n());
            py::array za = py::reinterpret_borrow<py::array>(z);
            py::array sa = expect_array<float>(zsum, "zsum", {batch});
            check_threads(threads);
            // The kernels rely on zero padding past n (the padded codes are zero).
            const float* zp = static_cast<const float*>(za.data());
            for (int b = 0; b < batch; ++b)
              for (int j = p.plan->n(); j < p.plan->padded_n(); ++j)
                if (zp[size_t(b) * p.plan->padded_n() + j] != 0.f)
                  throw py::value_error("z must be zero in its padding columns");
            py::array_t<float> t = new_matrix(batch, p.plan->m());
            {
              py::gil_scoped_release nogil;
              p.plan->matmul(select_kernels(force_scalar), zp,
                             static_cast<const float*>(sa.data()), batch, t.mutable_data(), threads);
            }
            return t;
          },
          py::arg("z"), py::arg("zsum"), py::arg("threads") = 1, py::arg("force_scalar") = false,
          "t = W' z (z of shape (B, padded_n), zsum its row sums).")
      .def(
          "transform_out",
          [](const PyPlan& p, const py::object& t, int threads, bool force_scalar) {
            const int batch = batch_of(t, "t", p.plan->m());
            check_threads(threads);
            py::array ta = py::reinterpret_borrow<py::array>(t);
            py::array_t<float> work = new_matrix(batch, p.plan->m());
            std::memcpy(work.mutable_data(), ta.data(), sizeof(float) * size_t(batch) * p.plan->m());
            py::array_t<float> y = new_matrix(batch, p.plan->m());
            {
              py::gil_scoped_release nogil;
              p.plan->transform_out(select_kernels(force_scalar), work.mutable_data(), batch,
                                    y.mutable_data(), threads);
            }
            return y;
          },
          py::arg("t"), py::arg("threads") = 1, py::arg("force_scalar") = false,
          "y = out_scale * K_out^T t + bias.");

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

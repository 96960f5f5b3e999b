// The CUDA path's bindings: device queries and class CudaPlan. Built only with the CUDA
// kernels (CMakeLists.txt adds this file and defines QUIPC_WITH_CUDA together).
#include <utility>

#include "bindings.h"
#include "cuda/cuda_plan.h"
#include "e8p.h"

namespace quipc {
namespace bindings {

namespace {

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
  L.format = parse_format(format);  // the CUDA kernels run every format the CPU plan runs
  L.m = m;
  L.n = n;
  L.bits = bits;
  L.codes = static_cast<const uint8_t*>(cpu.codes.data());
  L.row_bytes = size_t((n + 7) / 8) * bits;
  if (L.format != CodeFormat::kGrid) {
    const int stages = L.format == CodeFormat::kE8P ? e8p_stages(bits) : 1;
    py::array sa = expect_array<float>(scale, "scale", {m, stages});
    const float* sp = static_cast<const float*>(sa.data());
    L.scale.assign(sp, sp + size_t(m) * stages);
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

}  // namespace

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

}  // namespace bindings
}  // namespace quipc

// The CPU layer plan's bindings: class Plan (forward, and its three stages for tests).
#include <cstring>
#include <stdexcept>
#include <utility>

#include "bindings.h"
#include "trellis.h"
#include "e8p.h"
#include "kernels.h"

namespace quipc {
namespace bindings {

CodeFormat parse_format(const std::string& format) {
  if (format == "grid") return CodeFormat::kGrid;
  if (format == "e8p") return CodeFormat::kE8P;
  if (format == "trellis") return CodeFormat::kTrellis;
  if (format == "trellis256") return CodeFormat::kTrellis256;
  throw py::value_error("the C++ kernels run the code formats grid, e8p, trellis, trellis256; not '" + format + "'");
}

PyPlan make_plan(int m, int n, int bits, const py::object& codes, const py::object& scale,
                 const py::object& zero, const py::object& in_scale, const py::object& out_scale,
                 const py::object& bias, const py::sequence& in_factors,
                 const py::sequence& out_factors, const std::string& format, bool e8p_as_grid4,
                 bool int8_activations, bool trellis_as_int8, const std::string& row_tiles) {
  if (bits < 2 || bits > 4) throw py::value_error("bits must be 2, 3 or 4, got " + std::to_string(bits));
  if (m < 1 || n < 1) throw py::value_error("layer shape must be positive");
  const CodeFormat fmt = parse_format(format);
  if (fmt == CodeFormat::kE8P && n % 8 != 0)
    throw py::value_error("format e8p codes groups of 8 weights; n = " + std::to_string(n) +
                          " is not a multiple of 8");
  if (is_trellis(fmt) && (n % kTrellisTile != 0 || m % kTrellisTile != 0))
    throw py::value_error("format trellis codes tiles of 16x16 weights; the shape " + std::to_string(m) +
                          "x" + std::to_string(n) + " is not made of whole tiles");
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
  d.e8p_as_grid4 = e8p_as_grid4;
  d.int8_activations = int8_activations;
  d.trellis_as_int8 = trellis_as_int8;
  if (row_tiles == "auto")
    d.row_tiles = LayerData::RowTiles::kAuto;
  else if (row_tiles == "on")
    d.row_tiles = LayerData::RowTiles::kOn;
  else if (row_tiles == "off")
    d.row_tiles = LayerData::RowTiles::kOff;
  else
    throw py::value_error("row_tiles must be 'auto', 'on' or 'off', not '" + row_tiles + "'");
  if (fmt != CodeFormat::kGrid) {
    const py::ssize_t stages = fmt == CodeFormat::kE8P ? e8p_stages(bits) : 1;
    py::array sa = expect_array<float>(scale, "scale", {m, stages});
    const float* sp = static_cast<const float*>(sa.data());
    d.scale.assign(sp, sp + size_t(m) * stages);
    if (!zero.is_none())
      throw py::value_error("format " + format + " has no zero points: zero must be None");
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

void register_plan(py::module_& mod) {
  py::class_<PyPlan>(mod, "Plan")
      .def(py::init([](int m, int n, int bits, const py::object& codes, const py::object& scale,
                       const py::object& zero, const py::object& in_scale, const py::object& out_scale,
                       const py::object& bias, const py::sequence& in_factors, const py::sequence& out_factors,
                       const std::string& format, bool e8p_as_grid4, bool int8_activations,
                       bool trellis_as_int8, const std::string& row_tiles) {
             return make_plan(m, n, bits, codes, scale, zero, in_scale, out_scale, bias, in_factors,
                              out_factors, format, e8p_as_grid4, int8_activations, trellis_as_int8, row_tiles);
           }),
           py::arg("m"), py::arg("n"), py::arg("bits"), py::arg("codes"),
           py::arg("scale"), py::arg("zero"), py::arg("in_scale"), py::arg("out_scale"),
           py::arg("bias"), py::arg("in_factors"), py::arg("out_factors"),
           py::arg("format") = "grid", py::arg("e8p_as_grid4") = true,
           py::arg("int8_activations") = false, py::arg("trellis_as_int8") = false,
           py::arg("row_tiles") = "auto")
      .def_property_readonly("m", [](const PyPlan& p) { return p.plan->m(); })
      .def_property_readonly("n", [](const PyPlan& p) { return p.plan->n(); })
      .def_property_readonly("gemv_as_grid4",   // the GEMV on 4-bit grid planes (e8p_as_grid4 taken)
                             [](const PyPlan& p) { return p.plan->gemv_as_grid4(); })
      .def_property_readonly("gemv_on_int8_rows",   // the GEMV on an 8-bit copy of W' (trellis_as_int8 taken)
                             [](const PyPlan& p) { return p.plan->gemv_on_int8_rows(); })
      .def_property_readonly("gemv_on_row_tiles",   // the int8 GEMV on row tiles (row_tiles taken)
                             [](const PyPlan& p) { return p.plan->gemv_on_row_tiles(); })
      .def_property_readonly("gemv_int8",   // the 4-bit GEMV on int8 activations (int8_activations taken)
                             [](const PyPlan& p) { return p.plan->gemv_int8(); })
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
          "y = out_scale * K_out^T t + bias.")
      .def("shares_input_side",
           [](const PyPlan& p, const PyPlan& other) { return p.plan->shares_input_side(*other.plan); },
           py::arg("other"), "Whether other has this plan's input side (in_scale and K_in).");
  mod.def(
      "forward_group",
      [](const std::vector<const PyPlan*>& plans, const py::object& x, int threads, bool force_scalar) {
        if (plans.empty()) throw py::value_error("forward_group needs at least one plan");
        for (const PyPlan* p : plans)
          if (!p->plan->shares_input_side(*plans[0]->plan))
            throw py::value_error("forward_group: the plans do not share their input side");
        const int batch = batch_of(x, "x", plans[0]->plan->n());
        check_threads(threads);
        std::vector<py::array_t<float>> ys;
        std::vector<float*> yp;
        std::vector<const QuipLinearPlan*> ps;
        for (const PyPlan* p : plans) {
          ys.push_back(new_matrix(batch, p->plan->m()));
          yp.push_back(ys.back().mutable_data());
          ps.push_back(p->plan.get());
        }
        py::array xa = py::reinterpret_borrow<py::array>(x);
        const float* xp = static_cast<const float*>(xa.data());
        {
          py::gil_scoped_release nogil;
          QuipLinearPlan::forward_group(ps, xp, batch, yp, threads, force_scalar);
        }
        return ys;
      },
      py::arg("plans"), py::arg("x"), py::arg("threads") = 1, py::arg("force_scalar") = false,
      "[y_p = plans[p].forward(x)] for plans that share their input side, the input side computed once.");
}

}  // namespace bindings
}  // namespace quipc

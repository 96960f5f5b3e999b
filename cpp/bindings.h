// What the pybind11 binding files share: the checks that turn numpy arguments into C++
// values, the CPU plan (the CUDA plan validates through it), and one register function per
// binding file, each adding its part to the one module (_kernels, defined in bindings.cpp).
// Inputs are checked strictly (dtype, shape, contiguity, sizes): a mismatch raises
// TypeError / ValueError instead of being converted or read out of bounds.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // in every binding file alike (pybind11 wants one set of casters)

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "quip_linear.h"
#include "transform.h"

namespace quipc {
namespace bindings {

namespace py = pybind11;

// "(2, 3)" / "(4,)": an array's shape as numpy prints it.
std::string shape_str(const py::array& a);

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

// A float32 array of shape (len,), copied.
std::vector<float> to_vector(const py::handle& obj, const char* name, py::ssize_t len);

// factors: sequence of (matrix float32 (f, f), fwht: bool).
KronTransform make_transform(int n, const py::sequence& factors);

int check_threads(int threads);

// A new (rows, cols) float32 array.
py::array_t<float> new_matrix(py::ssize_t rows, py::ssize_t cols);

// Rows of a (B, width) float32 input; B may be 0.
int batch_of(const py::handle& x, const char* name, int width);

// A plan plus the numpy array that owns its codes.
struct PyPlan {
  py::array codes;
  std::unique_ptr<QuipLinearPlan> plan;
};

// "grid" | "e8p" | "trellis" (a ValueError naming the format otherwise).
CodeFormat parse_format(const std::string& format);

PyPlan make_plan(int m, int n, int bits, const py::object& codes, const py::object& scale,
                 const py::object& zero, const py::object& in_scale, const py::object& out_scale,
                 const py::object& bias, const py::sequence& in_factors,
                 const py::sequence& out_factors, const std::string& format,
                 bool e8p_as_grid4 = false,  // the Python Plan's default is true (bindings_plan.cpp)
                 bool int8_activations = false, bool trellis_as_int8 = false);

// The CPU plan class Plan (bindings_plan.cpp).
void register_plan(py::module_& mod);
// The decoder block class DecoderLayer (bindings_decoder.cpp).
void register_decoder(py::module_& mod);
// The CUDA functions and class CudaPlan (bindings_cuda.cpp, built with QUIPC_WITH_CUDA only).
void register_cuda(py::module_& mod);

}  // namespace bindings
}  // namespace quipc

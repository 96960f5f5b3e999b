// The numpy argument checks of the pybind11 bindings (declared in bindings.h).
#include <stdexcept>
#include <utility>

#include "bindings.h"

namespace quipc {
namespace bindings {

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

std::vector<float> to_vector(const py::handle& obj, const char* name, py::ssize_t len) {
  py::array a = expect_array<float>(obj, name, {len});
  const float* p = static_cast<const float*>(a.data());
  return std::vector<float>(p, p + len);
}

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

int check_threads(int threads) {
  if (threads < 1 || threads > 256) throw py::value_error("threads must be in [1, 256]");
  return threads;
}

py::array_t<float> new_matrix(py::ssize_t rows, py::ssize_t cols) {
  return py::array_t<float>({rows, cols});
}

int batch_of(const py::handle& x, const char* name, int width) {
  py::array a = expect_array<float>(x, name, {-1, width});
  if (a.shape(0) > (1 << 30)) throw py::value_error("batch too large");
  return int(a.shape(0));
}

}  // namespace bindings
}  // namespace quipc

// The decoder block's bindings: class DecoderLayer (decoder_layer.h), built on seven Plans (five
// for fused qkv / gate_up projections: k, v and gate None); the sliding window, the MLP's
// activation, Gemma's post norms and attention soft-capping as keyword arguments.
#include <stdexcept>
#include <string>
#include <utility>

#include "bindings.h"
#include "decoder_layer.h"

namespace quipc {
namespace bindings {

namespace {

// A DecoderLayer plus the Plans it points to (kept alive with it).
struct PyDecoderLayer {
  std::vector<py::object> plans;
  std::unique_ptr<DecoderLayer> layer;
};

const QuipLinearPlan* plan_of(const py::object& obj, const char* name) {
  if (!py::isinstance<PyPlan>(obj))
    throw py::type_error(std::string(name) + " must be a Plan, got " + std::string(py::str(py::type::of(obj))));
  return obj.cast<const PyPlan&>().plan.get();
}

// None: a fused projection (decoder_layer.h: k/v with qkv_proj, gate with gate_up_proj)
const QuipLinearPlan* optional_plan(const py::object& obj, const char* name) {
  return obj.is_none() ? nullptr : plan_of(obj, name);
}

}  // namespace

void register_decoder(py::module_& mod) {
  py::class_<PyDecoderLayer>(mod, "DecoderLayer")
      .def(py::init([](int hidden, int heads, int kv_heads, int head_dim, int inter, float eps1, float eps2,
                       float scaling, const py::object& ln1, const py::object& ln2, const py::object& q_norm,
                       const py::object& k_norm, float qk_eps, const py::object& q, const py::object& k,
                       const py::object& v, const py::object& o, const py::object& gate,
                       const py::object& up, const py::object& down, int window, const std::string& act,
                       const py::object& post_attn, const py::object& post_mlp, float post_eps,
                       float attn_softcap) {
             DecoderLayerShape s{hidden, heads, kv_heads, head_dim, inter, eps1, eps2, qk_eps, scaling};
             s.window = window;
             s.post_eps = post_eps;
             s.attn_softcap = attn_softcap;
             if (act == "gelu_tanh") {
               s.act = MlpActivation::kGeluTanh;
             } else if (act != "silu") {
               throw py::value_error("act must be 'silu' or 'gelu_tanh', got '" + act + "'");
             }
             DecoderLayerWeights w;
             w.ln1 = to_vector(ln1, "ln1", hidden);
             w.ln2 = to_vector(ln2, "ln2", hidden);
             if (q_norm.is_none() != k_norm.is_none())
               throw py::value_error("q_norm and k_norm must both be given or both be None");
             if (!q_norm.is_none()) {
               w.q_norm = to_vector(q_norm, "q_norm", head_dim);
               w.k_norm = to_vector(k_norm, "k_norm", head_dim);
             }
             if (post_attn.is_none() != post_mlp.is_none())
               throw py::value_error("post_attn and post_mlp must both be given or both be None");
             if (!post_attn.is_none()) {
               w.post_attn = to_vector(post_attn, "post_attn", hidden);
               w.post_mlp = to_vector(post_mlp, "post_mlp", hidden);
             }
             w.q = plan_of(q, "q"), w.o = plan_of(o, "o"), w.up = plan_of(up, "up"), w.down = plan_of(down, "down");
             w.k = optional_plan(k, "k"), w.v = optional_plan(v, "v"), w.gate = optional_plan(gate, "gate");
             PyDecoderLayer p;
             p.plans = {q, k, v, o, gate, up, down};
             try {
               p.layer = std::make_unique<DecoderLayer>(s, std::move(w));
             } catch (const std::invalid_argument& e) {
               throw py::value_error(e.what());
             }
             return p;
           }),
           py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("inter"),
           py::arg("eps1"), py::arg("eps2"), py::arg("scaling"), py::arg("ln1"), py::arg("ln2"),
           py::arg("q_norm"), py::arg("k_norm"), py::arg("qk_eps"), py::arg("q"), py::arg("k"),
           py::arg("v"), py::arg("o"), py::arg("gate"), py::arg("up"), py::arg("down"), py::kw_only(),
           py::arg("window") = 0, py::arg("act") = "silu", py::arg("post_attn") = py::none(),
           py::arg("post_mlp") = py::none(), py::arg("post_eps") = 0.f, py::arg("attn_softcap") = 0.f)
      .def_property_readonly("qkv_grouped", [](const PyDecoderLayer& p) { return p.layer->qkv_grouped(); })
      .def_property_readonly("gate_up_grouped", [](const PyDecoderLayer& p) { return p.layer->gate_up_grouped(); })
      .def(
          "step",
          [](PyDecoderLayer& p, const py::object& h, int pos, const py::object& k_cache,
             const py::object& v_cache, const py::object& cos, const py::object& sin, int threads,
             bool force_scalar) {
            const DecoderLayerShape& s = p.layer->shape();
            py::array ha = expect_array<float>(h, "h", {s.hidden});
            py::array ka = expect_array<float>(k_cache, "k_cache", {s.kv_heads, -1, s.head_dim});
            py::array va = expect_array<float>(v_cache, "v_cache", {s.kv_heads, ka.shape(1), s.head_dim});
            py::array ca = expect_array<float>(cos, "cos", {s.head_dim});
            py::array sa = expect_array<float>(sin, "sin", {s.head_dim});
            if (!ha.writeable() || !ka.writeable() || !va.writeable())
              throw py::value_error("h, k_cache and v_cache must be writeable");
            check_threads(threads);
            const int capacity = int(ka.shape(1));   // step() refuses a position outside it
            float* hp = static_cast<float*>(ha.mutable_data());
            float* kp = static_cast<float*>(ka.mutable_data());
            float* vp = static_cast<float*>(va.mutable_data());
            const float* cp = static_cast<const float*>(ca.data());
            const float* sp = static_cast<const float*>(sa.data());
            py::gil_scoped_release nogil;
            p.layer->step(hp, pos, kp, vp, capacity, cp, sp, threads, force_scalar);
          },
          py::arg("h"), py::arg("pos"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cos"),
          py::arg("sin"), py::arg("threads") = 1, py::arg("force_scalar") = false,
          "One token through the block: h (hidden,) in place; its key and value written at pos of "
          "the caches (kv_heads, capacity, head_dim); cos / sin the rotary rows at pos (sin's first "
          "half negated).");
}

}  // namespace bindings
}  // namespace quipc

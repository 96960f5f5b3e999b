#!/usr/bin/env bash
# GPU check for the quipc kernels, for any machine with an NVIDIA GPU (a few minutes):
# builds the extension and the onnxruntime custom-op library with QUIPC_CUDA=ON (cmake
# directly: no network needed; pybind11 from pip), runs the CUDA tests (kernels against the CPU
# kernels, a tiny model on the GPU against the CPU) beside the CPU kernel and custom-op tests,
# the GPU kernel benchmark, and, when ART names an artifact, the whole-model comparison
# (benchmarks/gpu_model.py: logits, perplexity, decode ms/token, answer agreement).
# Usage: [ART=artifact TEXT=wiki.test.raw FP32_ANSWERS=F.json] [BENCH_ARGS="--bits 2 --shapes 7b"] scripts/gpu_check.sh
# (from the repo root; results in $OUT, default ./gpu_out)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
PY=${PYTHON:-python3}
echo "== machine"; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
$PY -c "import sys, torch, onnxruntime as ort; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'onnxruntime', ort.__version__, ort.get_available_providers())" || true

echo "== build"
if ! command -v nvcc >/dev/null; then
  for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do [ -x "$d/nvcc" ] && export PATH="$d:$PATH" && break; done
fi
command -v nvcc && nvcc --version | tail -1
if ! command -v cmake >/dev/null; then $PY -m pip install -q cmake ninja || true; fi
GEN=""; command -v ninja >/dev/null && GEN="-G Ninja"
BUILD=build_gpu
rm -rf "$BUILD"
t0=$(date +%s)
cmake -S . -B "$BUILD" $GEN -DCMAKE_BUILD_TYPE=Release -DQUIPC_CUDA=ON -DQUIPC_CUDA_ARCHS=90 \
      -DPython_EXECUTABLE="$(command -v $PY)" > "$OUT/cmake.log" 2>&1 \
  && cmake --build "$BUILD" -j "$(nproc)" >> "$OUT/cmake.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/cmake.log"
[ $rc -eq 0 ] || { echo "BUILD FAILED"; tail -40 "$OUT/cmake.log"; exit 1; }
cp "$BUILD"/_kernels*.so "$BUILD"/libquipc_ort.so runtime/quipc_runtime/
export PYTHONPATH="$PWD:$PWD/runtime${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "from quipc_runtime import kernels as K, ort_custom_ops as O; print('cpu', K.kernel_name(), 'cuda', K.cuda_available(), K._ext.cuda_device_name(0) if K.cuda_available() else '', 'ort library', O.library_path())"

echo "== tests"
t0=$(date +%s)
XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
timeout ${TEST_TIMEOUT:-240} $PY -m pytest tests/test_kernels_cuda.py tests/test_kernels.py tests/test_kernels_e8p.py \
  tests/test_ort_custom_ops.py -q -rs -p no:cacheprovider -p no:warnings $XDIST --junitxml="$OUT/tests.xml" 2>&1 | tail -30
echo "tests done in $(( $(date +%s) - t0 )) s"

echo "== GPU kernel benchmark"
t0=$(date +%s)
timeout ${BENCH_TIMEOUT:-150} $PY benchmarks/kernel_speed.py --gpu ${BENCH_ARGS:---bits 2 4} --json "$OUT/kernels_gpu.json" 2>&1 \
  | $PY -c "import sys, json
for line in sys.stdin:
    try: r = json.loads(line)
    except ValueError: print(line, end=''); continue
    print(r['shape'], 'b', r['bits'], r['format'], 'batch', r['batch'], 'quipc %.4f ms' % r['quipc_ms'],
          'matmul %.4f' % r.get('gemv_ms', r.get('qmatmul_ms', 0)), 'fp16 %.4f' % r.get('fp16_ms', 0),
          'x fp16 %.2f' % r.get('speedup_vs_fp16', 0), 'per-factor %.4f' % r.get('quipc_per_factor_ms', 0),
          ' '.join('%s %.4f' % (k, v) for k, v in r.items() if k.startswith(('gemv_', 'qmatmul_c')) and k != 'gemv_ms'))"
echo "benchmark done in $(( $(date +%s) - t0 )) s"

if [ -n "${ART:-}" ]; then
  echo "== whole model: $ART"
  t0=$(date +%s)
  timeout ${MODEL_TIMEOUT:-200} $PY benchmarks/gpu_model.py "$ART" --text "${TEXT:?TEXT: the evaluation text}" \
    ${FP32_ANSWERS:+--fp32-answers "$FP32_ANSWERS"} --json "$OUT/gpu_model.json"
  echo "model done in $(( $(date +%s) - t0 )) s"
fi
ls -la "$OUT"

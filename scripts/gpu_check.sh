#!/usr/bin/env bash
# GPU check for the quipc kernels, for any machine with an NVIDIA GPU (a few minutes):
# builds the extension with QUIPC_CUDA=ON (cmake directly: no network needed; pybind11 from
# pip or torch's bundled copy), runs the CUDA + CPU kernel tests, then the GPU benchmark.
# Usage: scripts/gpu_check.sh   (from the repo root; results in $OUT, default ./gpu_out)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
PY=${PYTHON:-python3}
echo "== machine"; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
$PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" || true

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
echo "build rc=$rc in $(( $(date +%s) - t0 )) s"; tail -5 "$OUT/cmake.log"
[ $rc -eq 0 ] || { echo "BUILD FAILED"; tail -40 "$OUT/cmake.log"; exit 1; }
cp "$BUILD"/_kernels*.so runtime/quipc_runtime/
export PYTHONPATH="$PWD/runtime${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "from quipc_runtime import kernels as K; print('cpu', K.kernel_name(), 'cuda', K.cuda_available(), K._ext.cuda_device_name(0) if K.cuda_available() else '')"

echo "== tests"
t0=$(date +%s)
timeout 200 $PY -m pytest tests/test_kernels_cuda.py tests/test_kernels.py -q -rs --maxfail=10 -p no:cacheprovider -k "not model_level" \
  --junitxml="$OUT/tests.xml" 2>&1 | tail -25
echo "tests done in $(( $(date +%s) - t0 )) s"

echo "== GPU benchmark"
timeout 150 $PY benchmarks/kernels.py --gpu --json "$OUT/kernels_gpu.json" 2>&1 | tail -40
ls -la "$OUT"

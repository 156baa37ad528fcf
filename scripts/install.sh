#!/usr/bin/env bash
# Installs the pinned requirements and builds resnext_kernels in place (editable), logging the build.
# With nvcc on the machine the CUDA kernels are required (FORCE_CUDA=1): a build that silently drops
# CUDA fails here. The build log keeps nvcc's ptxas report, which scripts/check_ptxas.py checks.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p logs
python -m pip install -q -r requirements.txt
have_cuda_sources=$(compgen -G "csrc/cuda/*.cu" || true)
if [ -n "$have_cuda_sources" ] && { command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; }; then
  export FORCE_CUDA="${FORCE_CUDA:-1}"   # nvcc is here: a build without the CUDA kernels is an error
fi
export MAX_JOBS="${MAX_JOBS:-2}"
start=$(date +%s)
python -m pip install --no-build-isolation -v -e . > logs/build.log 2>&1 || { tail -n 60 logs/build.log; exit 1; }
echo "build: $(( $(date +%s) - start )) s (log: logs/build.log)"
python -m resnext_kernels.info
if python -c "import resnext_kernels._build_info as b, sys; sys.exit(0 if b.WITH_CUDA else 1)"; then
  python scripts/check_ptxas.py logs/build.log
  # The SASS instruction mix of every kernel (logs/sass.txt), checked against what the kernels must compile to:
  # tensor cores, async copies, 16-byte accesses, no local memory (scripts/check_sass.py PROJECT_REQUIRE).
  python scripts/check_sass.py --project-rules > logs/sass.txt || { tail -n 20 logs/sass.txt; exit 1; }
  tail -n 1 logs/sass.txt
fi

#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run: builds the C++ CPU kernels and the emulated CUDA kernels
# with -fsanitize=address,undefined (-fno-sanitize-recover=all: every report aborts the process) into
# build/sanitize/, next to a copy of the Python package, and runs a focused test subset against that build
# with the ASan runtime preloaded into Python. Any sanitizer report fails the run.
#
# Usage: bash scripts/sanitize.sh [extra pytest args]     (after scripts/install.sh installed the requirements)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${RESNEXT_KERNELS_SANITIZE_DIR:-$PWD/build/sanitize}"
lib="$out/lib"
mkdir -p "$lib/resnext_kernels" logs
start=$(date +%s)
RESNEXT_KERNELS_SANITIZE=1 MAX_JOBS="${MAX_JOBS:-2}" \
  python setup.py build_ext --build-lib "$lib" --build-temp "$out/temp" > logs/sanitize_build.log 2>&1 \
  || { tail -n 60 logs/sanitize_build.log; exit 1; }
cp resnext_kernels/*.py "$lib/resnext_kernels/"
cat > "$lib/resnext_kernels/_build_info.py" <<EOF
# Written by scripts/sanitize.sh: the ASan + UBSan build of the C++ code (no nvcc, so no CUDA kernels).
WITH_CUDA = False
CUDA_ARCH_LIST = ''
NVCC_VERSION = ''
TORCH_VERSION = '$(python -c "import torch; print(torch.__version__)")'
SANITIZED = True
EOF
echo "sanitizer build: $(( $(date +%s) - start )) s (log: logs/sanitize_build.log)"

# The ASan runtime must be the first library loaded into the (uninstrumented) Python process.
runtime="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)"
# Leaks: CPython and torch keep allocations alive at exit by design; leak checking would only report them.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
export RESNEXT_KERNELS_EXPECT_SANITIZED=1
export RESNEXT_KERNELS_FUZZ_EXAMPLES="${RESNEXT_KERNELS_FUZZ_EXAMPLES:-60}"
start=$(date +%s)
# -P: do not put the checkout (with its regular build) on sys.path ahead of the sanitizer build.
LD_PRELOAD="$runtime" PYTHONPATH="$lib${PYTHONPATH:+:$PYTHONPATH}" python -P -m pytest -q -p no:cacheprovider \
  tests/test_conv_bn_relu.py tests/test_training.py tests/test_properties.py tests/test_cuda_emulated.py \
  tests/test_models.py -k "not torch_compile and not compile" "$@"
echo "sanitized tests: $(( $(date +%s) - start )) s"

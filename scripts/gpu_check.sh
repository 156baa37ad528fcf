#!/usr/bin/env bash
# The checks that need a GPU, in one command for the day one is lent (about 8 minutes on one H100, from a fresh
# clone; the machine's own PyTorch, nvcc, ncu and compute-sanitizer; nothing is installed):
#   1. build for sm_90 only (--no-deps), then the ptxas spill check and the SASS instruction mix;
#   2. tests/test_cuda.py on the device;
#   3. Nsight Compute's counters for every kernel at ResNeXt-50 stage 3 (N=32, float16) beside the emulator's
#      (scripts/compare_ncu.py): the table "emulator vs ncu", measured time against the model's prediction;
#   4. compute-sanitizer memcheck and racecheck over every kernel on small layers (scripts/gpu_kernel_cases.py);
#   5. a short CUDA benchmark: the 7 ResNeXt-50 grouped layers, N=32, float16/bfloat16/float32, inference and
#      training, ours against cuDNN conv -> BN -> ReLU (eager) and torch.compile (float16), last: the longest.
# Everything lands in one folder (default benchmarks/results/gpu-<date>-<commit>/) with summary.md listing each
# step's status. A failing step does not stop the others; the exit status says whether all passed.
#
# usage: bash scripts/gpu_check.sh [--dry-run] [--out DIR]
#   --dry-run: no GPU needed. Checks this script's own logic: the GPU steps are printed, not run; the emulator side
#   of step 5 runs for real on a small batch, and the comparison is made against an ncu-format file written from
#   the emulator's own counts. CI runs it.
# Environment: GPU_CHECK_BUDGET_S (default 470): steps that would start after this many seconds are skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --out) out="$2"; shift ;;
    *) echo "usage: bash scripts/gpu_check.sh [--dry-run] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -z "$out" ]; then
  if [ "$dry_run" = 1 ]; then out=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_dry_run.XXXXXX")
  else out="benchmarks/results/gpu-$(date +%Y%m%d)-$commit"; fi
fi
mkdir -p "$out"
budget="${GPU_CHECK_BUDGET_S:-470}"
start=$(date +%s)
summary="$out/summary.md"
{
  echo "# GPU check: commit $commit, $(date -u +%Y-%m-%dT%H:%M:%SZ)$([ "$dry_run" = 1 ] && echo ' (dry run)')"
  echo
  echo "| step | status | seconds | output |"
  echo "|---|---|---|---|"
} > "$summary"
failed=0

# step NAME OUTPUT_FILE GPU(0/1) COMMAND...: runs (or, in a dry run, prints) one step and records it.
step() {
  local name="$1" log="$2" needs_gpu="$3"
  shift 3
  local t0 status elapsed
  t0=$(date +%s)
  if [ $(( t0 - start )) -gt "$budget" ]; then
    echo "| $name | skipped (budget of ${budget} s spent) | 0 | - |" >> "$summary"
    return
  fi
  echo "== $name: $*"
  if [ "$dry_run" = 1 ] && [ "$needs_gpu" = 1 ]; then
    echo "would run: $*" > "$out/$log"
    status="dry run: not run"
  elif "$@" > "$out/$log" 2>&1; then
    status="passed"
  else
    status="FAILED (exit $?)"
    failed=1
    tail -n 20 "$out/$log"
  fi
  elapsed=$(( $(date +%s) - t0 ))
  echo "| $name | $status | $elapsed | $log |" >> "$summary"
}

have() { command -v "$1" >/dev/null 2>&1; }

# 0. What this machine is.
step "environment" env.txt 0 bash -c '
  nvidia-smi 2>/dev/null || echo "nvidia-smi: not found"
  (nvcc --version || /usr/local/cuda/bin/nvcc --version) 2>/dev/null | tail -n 2
  for t in ncu compute-sanitizer cuobjdump; do printf "%s: " "$t"; command -v "$t" || echo "not found"; done
  python -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"device\",
    torch.cuda.get_device_name() if torch.cuda.is_available() else None)"'

# 1. Build for sm_90 only, then what nvcc made of the kernels.
export TORCH_CUDA_ARCH_LIST="9.0" FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" NVCC_THREADS=1
step "build (sm_90)" build.log 1 python -m pip install --no-deps --no-build-isolation -v -e .
step "ptxas: no spills" ptxas.txt 1 python scripts/check_ptxas.py "$out/build.log" --require sm_90
step "SASS instruction mix" sass.txt 1 python scripts/check_sass.py --arch sm_90 --project-rules --json "$out/sass.json"

# 2. The fused op on the device.
step "tests/test_cuda.py" tests.txt 1 python -m pytest -q -ra tests/test_cuda.py --junitxml "$out/tests.xml"

# 3. The emulator's counters against Nsight Compute's at ResNeXt-50 stage 3, N=32, float16.
emu_batch=32
[ "$dry_run" = 1 ] && emu_batch=2
step "emulator counters (x50.stage3, N=$emu_batch)" emulator.txt 0 python -m resnext_kernels.emulator profile \
  --models x50 --shapes stage3 --dtypes float16 --batch "$emu_batch" --ptxas-log "$out/build.log" \
  --json "$out/emulator.json"
metrics=$(python -c "import sys; sys.path.insert(0, 'scripts'); import compare_ncu
print(','.join(compare_ncu.METRICS))")
if [ "$dry_run" = 1 ]; then
  step "ncu (dry run: counts written from the emulator's)" ncu_log.txt 0 \
    python scripts/compare_ncu.py --emu "$out/emulator.json" --fake-ncu "$out/ncu.csv"
else
  # Metrics this ncu does not know are dropped rather than failing the run.
  known=$(ncu --query-metrics 2>/dev/null | awk '{print $1}' | tr '\n' ' ')
  wanted=""
  for m in ${metrics//,/ }; do
    base="${m%.sum}"
    case " $known " in *" $base "*) wanted="$wanted,$m" ;; esac
  done
  step "ncu (every kernel, x50.stage3 N=32 float16)" ncu.csv 1 ncu --csv --page raw --print-kernel-base demangled \
    --kernel-name-base demangled --kernel-name "regex:rk::cuda_kernels::" --metrics "${wanted#,}" \
    python scripts/gpu_kernel_cases.py --shape x50.stage3 --batch 32 --dtype float16
fi
step "emulator vs ncu" compare.md 0 python scripts/compare_ncu.py --emu "$out/emulator.json" --ncu "$out/ncu.csv"

# 4. Memory errors and shared-memory races, every kernel on small layers.
for tool in memcheck racecheck; do
  step "compute-sanitizer $tool" "sanitizer_$tool.txt" 1 compute-sanitizer --tool "$tool" --error-exitcode 1 \
    python scripts/gpu_kernel_cases.py --small
done

# 5. Ours against cuDNN (eager) and torch.compile.
step "benchmark float16 (+ torch.compile)" bench_f16.txt 1 python benchmarks/bench_kernels.py --mode all \
  --shapes x50 --batches 32 --dtypes float16 --layouts channels_last --compile --out "$out/bench"
step "benchmark bfloat16, float32" bench_bf16_f32.txt 1 python benchmarks/bench_kernels.py --mode all \
  --shapes x50 --batches 32 --dtypes bfloat16,float32 --layouts channels_last --no-compile --out "$out/bench"

{
  echo
  echo "Total: $(( $(date +%s) - start )) s. The comparison is compare.md; the benchmark's rows are in bench/."
} >> "$summary"
cat "$summary"
[ "$dry_run" = 1 ] && echo "dry run: results in $out"
exit $failed

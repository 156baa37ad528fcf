"""The CUDA-on-CPU emulator's own tests: tests/emu/emu_selftest.cpp, built with g++ (and once with
AddressSanitizer), run case by case under several schedules. Each broken kernel there must be caught."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from resnext_kernels.emulator import SCHEDULES

ROOT = os.path.join(os.path.dirname(__file__), "..")
KERNELS = os.path.join(ROOT, "tests", "emu", "emu_selftest.cpp")  # the kernel code: instrumented for the counters
RUNTIME = [os.path.join(ROOT, "csrc", "emu", f) for f in ("emu_scheduler.cpp", "emu_ptx.cpp", "emu_counters.cpp")]
HEADERS = [os.path.join(ROOT, "csrc", "emu", "emu_runtime.h"), os.path.join(ROOT, "csrc", "emu", "emu_internal.h"),
           os.path.join(ROOT, "csrc", "cuda", "kernels", "rk_launch.cuh"),
           os.path.join(ROOT, "csrc", "cuda", "kernels", "ptx.cuh"), os.path.join(ROOT, "tests", "emu", "ptx_kernels.cuh")]
# How setup.py compiles the emulated kernels (csrc/emu/emu_flags.py): the memory-access hooks of -fsanitize=thread,
# without its runtime, and no transformation that would merge or split a thread's accesses.
sys.path.insert(0, os.path.join(ROOT, "csrc", "emu"))
from emu_flags import INSTRUMENT_FLAGS  # noqa: E402


def _cuda_include():
    for d in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        if d and os.path.exists(os.path.join(d, "include", "cuda_fp16.h")):
            return os.path.join(d, "include")
    try:
        import nvidia
        for base in nvidia.__path__:
            for sub in sorted(os.listdir(base)):
                inc = os.path.join(base, sub, "include")
                if os.path.exists(os.path.join(inc, "cuda_fp16.h")):
                    return inc
    except ImportError:
        pass
    reason = "no CUDA headers (cuda_fp16.h) to build the emulator self-tests"
    if os.environ.get("CI"):  # CI has the toolkit: a missing header is a broken setup, not a skip
        pytest.fail(reason)
    pytest.skip(reason)


def _build(flags, instrument=True):
    """The self-test binary: the runtime compiled plainly, the kernels with the counters' hooks (not together with
    AddressSanitizer, which instruments the same accesses)."""
    digest = hashlib.sha256()
    for path in [KERNELS] + RUNTIME + HEADERS:
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(" ".join(flags + (INSTRUMENT_FLAGS if instrument else [])).encode())
    out_dir = os.path.join(tempfile.gettempdir(), "resnext_kernels_emu_selftest")
    os.makedirs(out_dir, exist_ok=True)
    binary = os.path.join(out_dir, "emu_selftest_" + digest.hexdigest()[:16])
    if not os.path.exists(binary):
        gxx = shutil.which("g++") or "g++"
        common = [gxx, "-std=c++20", "-g", "-DRK_EMULATOR", "-I", os.path.join(ROOT, "csrc"), "-I", _cuda_include(),
                  *flags]
        objects = []
        for src in RUNTIME + [KERNELS]:
            obj = f"{binary}.{os.path.basename(src)}.o"
            extra = INSTRUMENT_FLAGS if (instrument and src == KERNELS) else []
            subprocess.run(common + extra + ["-c", src, "-o", obj], check=True, capture_output=True, text=True)
            objects.append(obj)
        subprocess.run(common + objects + ["-o", binary + ".tmp"], check=True, capture_output=True, text=True)
        os.replace(binary + ".tmp", binary)
    return binary


@pytest.fixture(scope="module")
def selftest():
    return _build(["-O1"])


def _run(binary, case, order="forward", seed=0, env=None):
    return subprocess.run([binary, case, order, str(seed)], capture_output=True, text=True, timeout=120, env=env)


# Broken kernel -> (what the emulator must say, the kernel source file its error names, or None).
BROKEN = {
    "missing_barrier": ("poisoned", None),
    "divergent_barrier": ("divergent __syncthreads", "emu_selftest.cpp:"),
    "exited_barrier": ("have exited", "emu_selftest.cpp:"),
    "shuffle_outside_mask": ("outside the mask", "emu_selftest.cpp:"),
    "exited_lane_in_mask": ("lane that has exited", "emu_selftest.cpp:"),
    "mismatched_masks": ("lanes disagree", "emu_selftest.cpp:"),
    "kernel_throws": ("the kernel threw", None),
    "smem_limit_not_raised": ("above the kernel's limit of 49152", None),
    # tensor-core and asynchronous-copy instructions (csrc/cuda/kernels/ptx.cuh)
    "mma_exited_lane": ("lane 3 of the warp has exited", "ptx_kernels.cuh:"),
    "mma_diverged": ("the warp has diverged", "ptx_kernels.cuh:"),
    "ldmatrix_lane_missing": ("lane 31 of the warp has exited", "ptx_kernels.cuh:"),
    "ldmatrix_misaligned": ("not 16-byte aligned", "ptx_kernels.cuh:"),
    "ldmatrix_from_global": ("not in shared memory", "ptx_kernels.cuh:"),
    "cp_async_missing_wait": ("poisoned values", None),
    "cp_async_never_waited": ("was never waited for", "ptx_kernels.cuh:"),
    "cp_async_to_global": ("the destination is not in shared memory", "ptx_kernels.cuh:"),
}

CORRECT = ["block_sum", "reverse", "ballot_atomics", "half", "intrinsics", "smem_limit_raised",
           # each instruction's lane-by-lane layout against a reference computed on the host
           "mma_f16", "mma_bf16", "mma_tf32", "tf32_round", "ldmatrix_x1", "ldmatrix_x2", "ldmatrix_x4",
           "ldmatrix_x1_trans", "ldmatrix_x2_trans", "ldmatrix_x4_trans", "mma_ldmatrix", "cp_async_zero_fill",
           "cp_async_groups"]


@pytest.mark.parametrize("order,seed", SCHEDULES)
@pytest.mark.parametrize("case", CORRECT)
def test_correct_kernels_exact_under_every_schedule(selftest, case, order, seed):
    result = _run(selftest, case, order, seed)
    assert result.returncode == 0 and result.stdout.startswith("OK"), result.stdout + result.stderr


@pytest.mark.parametrize("order,seed", SCHEDULES)
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_kernels_are_caught(selftest, case, order, seed):
    result = _run(selftest, case, order, seed)
    assert result.returncode == 0, result.stdout + result.stderr
    message, source = BROKEN[case]
    assert message in result.stdout
    if source:  # errors name the kernel source line
        assert source in result.stdout


def _profile(binary, case, order="forward", seed=0):
    result = _run(binary, case, order, seed)
    assert result.returncode == 0 and result.stdout.startswith("OK "), result.stdout + result.stderr
    return json.loads(result.stdout[3:])


@pytest.mark.parametrize("order,seed", SCHEDULES)
def test_counters_exact_for_known_access_patterns(selftest, order, seed):
    """tests/emu/ptx_kernels.cuh counter_patterns: every count follows from the kernel's addresses by hand."""
    [r] = _profile(selftest, "profile_patterns", order, seed)
    assert r["kernel"] == "ptx_selftest::counter_patterns"
    assert (r["blocks"], r["threads"], r["barriers"]) == (1, 32, 1)
    # loads: 4-byte consecutive (4 sectors), 4-byte 128 B apart (32), 16-byte consecutive (16), and the first
    # pattern twice more (4 + 4 sectors, none new)
    assert (r["gld_requests"], r["gld_bytes"], r["gld_sectors"]) == (5, 1024, 60)
    assert r["gld_requests_by_width"] == {"4": 4, "16": 1}
    assert r["dram_read_bytes_min"] == (4 + 32 + 16) * 32
    # stores: 4-byte and 16-byte consecutive
    assert (r["gst_requests"], r["gst_bytes"], r["gst_sectors"]) == (2, 640, 20)
    assert r["gst_requests_by_width"] == {"4": 1, "16": 1}
    assert r["dram_write_bytes_min"] == 640
    # shared stores: conflict-free (1 wavefront), 2 lanes a bank (2), all lanes in one bank (32)
    assert (r["smem_st_requests"], r["smem_st_wavefronts"], r["smem_st_ideal_wavefronts"]) == (3, 35, 3)
    # shared loads: a broadcast (1), 64-bit (2 half-warp phases), 128-bit (4 quarter-warp phases): no conflicts
    assert (r["smem_ld_requests"], r["smem_ld_wavefronts"], r["smem_ld_ideal_wavefronts"]) == (3, 7, 7)
    assert r["diverged_requests"] == 0 and r["local_ld_bytes"] == 0


def test_counters_flag_diverged_warp_instructions(selftest):
    [r] = _profile(selftest, "profile_diverged")
    # all 32 lanes load once, the 16 odd lanes a second time: 128 + 64 bytes, both instructions flagged
    assert (r["gld_requests"], r["gld_bytes"]) == (2, 192)
    assert r["diverged_requests"] == 2


def test_counters_of_tensor_core_and_async_copy_instructions(selftest):
    mma, ld16, ld64, cp = _profile(selftest, "profile_ptx")
    assert mma["mma_m16n8k16_f16"] == 1 and mma["mma_m16n8k16_bf16"] == mma["mma_m16n8k8_tf32"] == 0
    # ldmatrix.x4: rows 16 bytes apart cover all 32 banks (1 wavefront a matrix); 64 bytes apart, 4 rows share
    # each bank (4 wavefronts a matrix)
    assert (ld16["ldmatrix_requests"], ld16["ldmatrix_bytes"], ld16["ldmatrix_wavefronts"]) == (1, 512, 4)
    assert (ld64["ldmatrix_wavefronts"], ld64["ldmatrix_ideal_wavefronts"]) == (16, 4)
    # 32 lanes x 16-byte cp.async.cg: one request, 512 bytes in 16 sectors, 4 shared-store wavefronts
    assert (cp["cp_async_requests"], cp["cp_async_bytes"], cp["cp_async_src_bytes"], cp["cp_async_sectors"]) == (
        1, 512, 512, 16)
    assert (cp["cp_async_smem_wavefronts"], cp["cp_async_smem_ideal_wavefronts"]) == (4, 4)
    assert cp["dram_read_bytes_min"] == 512


def test_out_of_bounds_shared_memory_caught_by_asan():
    binary = _build(["-O1", "-fsanitize=address", "-fno-omit-frame-pointer"], instrument=False)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    result = _run(binary, "oob_shared", env=env)
    assert result.returncode != 0
    assert "heap-buffer-overflow" in result.stderr and "out_of_bounds_shared" in result.stderr
    for case in ("block_sum", "mma_ldmatrix", "cp_async_zero_fill", "cp_async_groups"):  # correct kernels stay clean
        clean = _run(binary, case, "random", 7, env=env)
        assert clean.returncode == 0 and "ERROR: AddressSanitizer" not in clean.stderr, clean.stdout + clean.stderr

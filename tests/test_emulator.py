"""The CUDA-on-CPU emulator's own tests: tests/emu/emu_selftest.cpp, built with g++ (and once with
AddressSanitizer), run case by case under several schedules. Each broken kernel there must be caught."""

import hashlib
import os
import shutil
import subprocess
import tempfile

import pytest

from resnext_kernels.emulator import SCHEDULES

ROOT = os.path.join(os.path.dirname(__file__), "..")
SOURCES = [os.path.join(ROOT, "tests", "emu", "emu_selftest.cpp"), os.path.join(ROOT, "csrc", "emu", "emu_scheduler.cpp")]
HEADERS = [os.path.join(ROOT, "csrc", "emu", "emu_runtime.h"), os.path.join(ROOT, "csrc", "cuda", "kernels", "rk_launch.cuh")]


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


def _build(flags):
    digest = hashlib.sha256()
    for path in SOURCES + HEADERS:
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(" ".join(flags).encode())
    out_dir = os.path.join(tempfile.gettempdir(), "resnext_kernels_emu_selftest")
    os.makedirs(out_dir, exist_ok=True)
    binary = os.path.join(out_dir, "emu_selftest_" + digest.hexdigest()[:16])
    if not os.path.exists(binary):
        cmd = [shutil.which("g++") or "g++", "-std=c++20", "-g", "-DRK_EMULATOR", "-I", os.path.join(ROOT, "csrc"),
               "-I", _cuda_include(), *flags, *SOURCES, "-o", binary + ".tmp"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(binary + ".tmp", binary)
    return binary


@pytest.fixture(scope="module")
def selftest():
    return _build(["-O1"])


def _run(binary, case, order="forward", seed=0, env=None):
    return subprocess.run([binary, case, order, str(seed)], capture_output=True, text=True, timeout=120, env=env)


BROKEN = {
    "missing_barrier": "poisoned",
    "divergent_barrier": "divergent __syncthreads",
    "exited_barrier": "have exited",
    "shuffle_outside_mask": "outside the mask",
    "exited_lane_in_mask": "lane that has exited",
    "mismatched_masks": "lanes disagree",
    "kernel_throws": "the kernel threw",
}


@pytest.mark.parametrize("order,seed", SCHEDULES)
@pytest.mark.parametrize("case", ["block_sum", "reverse", "ballot_atomics", "half", "intrinsics"])
def test_correct_kernels_exact_under_every_schedule(selftest, case, order, seed):
    result = _run(selftest, case, order, seed)
    assert result.returncode == 0 and result.stdout.startswith("OK"), result.stdout + result.stderr


@pytest.mark.parametrize("order,seed", SCHEDULES)
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_kernels_are_caught(selftest, case, order, seed):
    result = _run(selftest, case, order, seed)
    assert result.returncode == 0, result.stdout + result.stderr
    assert BROKEN[case] in result.stdout
    if case not in ("missing_barrier", "kernel_throws"):  # errors name the kernel source line
        assert "emu_selftest.cpp:" in result.stdout


def test_out_of_bounds_shared_memory_caught_by_asan():
    binary = _build(["-O1", "-fsanitize=address", "-fno-omit-frame-pointer"])
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    result = _run(binary, "oob_shared", env=env)
    assert result.returncode != 0
    assert "heap-buffer-overflow" in result.stderr and "out_of_bounds_shared" in result.stderr
    clean = _run(binary, "block_sum", "random", 7, env=env)  # and a correct kernel stays clean under ASan
    assert clean.returncode == 0 and "ERROR: AddressSanitizer" not in clean.stderr, clean.stderr

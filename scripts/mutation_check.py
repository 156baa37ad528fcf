#!/usr/bin/env python
"""Mutation check: plants small bugs in a scratch copy of the tree and checks that the test suite catches each.

Each mutant is one textual change (a numeric slip of 1e-4 relative in float32 code, 3% in bfloat16/float16 code, or a
logic slip) in the Python layer, a CPU kernel path (forward and gradients) or a CUDA kernel (run by the emulator). The
tree is copied once to a scratch directory and built there (RESNEXT_KERNELS_NO_CUDA=1: no nvcc, the emulated CUDA
kernels are still built); each mutant is applied, rebuilt incrementally (ninja recompiles what the changed file
reaches; ccache, when installed, makes the reverted files' recompiles hits) and tested with the test subset that
should catch it, then reverted. Prints "killed K of M"; the exit status is nonzero unless every mutant is killed.

With --workers 2 (the default on a machine with 2 or more cores) two scratch trees take mutants in turn, each
building with one job: a mutant's rebuild is mostly one translation unit, which one job compiles no slower, so two
trees halve the wall time. The second tree's first build takes the first's objects from ccache.

--suite-from REV measures an older test suite instead: the scratch trees take tests/ from git revision REV, and each
mutant runs that whole suite (stopping at the first failure), after the suite passed once on the unmutated tree.

Usage: python scripts/mutation_check.py [--list] [--only NAME,...] [--scratch DIR] [--keep] [--no-baseline]
                                        [--workers N] [--suite-from REV]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the tree
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: the subset that must fail

    @property
    def compiled(self) -> bool:
        return not self.path.endswith(".py")


def _fuzz(family: str) -> tuple[str, ...]:
    """The property fuzz's inference and training properties of one shape family."""
    return ("tests/test_properties.py", "-k", f"(test_inference_matches_reference or "
            f"test_training_forward_backward_match_reference) and {family}")


# The path matrix under the native CPU configuration: every CPU path, forward and gradients.
_MATRIX_CPU = ("tests/test_path_matrix.py", "-k", "native")

MUTANTS = [
    # Python layer: running statistics, autocast, BatchNorm folding.
    Mutant("py_running_stats_momentum_swapped", "resnext_kernels/ops.py",
           "running_mean.copy_(momentum * mean + (1 - momentum) * running_mean)",
           "running_mean.copy_((1 - momentum) * mean + momentum * running_mean)",
           ("tests/test_training.py", "-k", "running_stats_after")),
    Mutant("py_running_var_biased", "resnext_kernels/ops.py",
           "unbiased = var * (count / (count - 1))", "unbiased = var",
           ("tests/test_training.py", "-k", "running_stats_after")),
    Mutant("py_autocast_weight_scaled", "resnext_kernels/_common.py",
           "                 else t for t in tensors)",
           "                 else t for t in tensors)[:1] + tuple(t.to(dtype) * 1.03 for t in tensors[1:])",
           ("tests/test_conv_bn_relu.py", "tests/test_training.py", "tests/test_models.py", "-k", "autocast")),
    Mutant("py_fold_without_eps", "resnext_kernels/_common.py",
           "inv_std = torch.rsqrt(running_var.to(dtype) + eps)", "inv_std = torch.rsqrt(running_var.to(dtype))",
           ("tests/test_conv_bn_relu.py", "-k", "fold_batch_norm or matches_reference")),
    Mutant("py_prepared_weights_scaled", "resnext_kernels/_prepacked.py",
           "(conv.weight.detach().float() * scale.view(-1, 1, 1, 1))",
           "(conv.weight.detach().float() * scale.view(-1, 1, 1, 1) * 1.0001)",
           ("tests/test_models.py", "-k", "prepared")),
    Mutant("py_prepared_weights_stale", "resnext_kernels/_prepacked.py",
           "(t.data_ptr(), t._version)", "(t.data_ptr(),)", ("tests/test_models.py", "-k", "prepared")),
    Mutant("py_model_overwrites_hooked_outputs", "resnext_kernels/models.py",
           "        return not any(m._forward_hooks", "        return True or not any(m._forward_hooks",
           ("tests/test_models.py", "-k", "overwrites_only")),
    # CPU forward paths: 1e-4 relative in float32.
    Mutant("cpu_winograd_f2x2", "csrc/cpu/conv_winograd.h",
           "y[1] = 0.5f * (x0 + x1 + x2);", "y[1] = 0.5001f * (x0 + x1 + x2);", _fuzz("winograd_small")),
    Mutant("cpu_winograd_f4x4", "csrc/cpu/conv_winograd.h",
           "y[4] = fifteenth * (x0 - 2 * x1 + 4 * x2);", "y[4] = 1.0002f * fifteenth * (x0 - 2 * x1 + 4 * x2);",
           _fuzz("winograd and not small")),
    Mutant("cpu_lanes", "csrc/cpu/conv_lanes.h",
           "for (int j = 0; j < C; ++j) acc[p][j] += x * wv[j];",
           "for (int j = 0; j < C; ++j) acc[p][j] += x * wv[j] * 1.0001f;", _fuzz("lanes")),
    Mutant("cpu_broadcast", "csrc/cpu/conv_microkernel.h",
           "for (int v = 0; v < NV; ++v) acc[p][v] += x * wv[v];",
           "for (int v = 0; v < NV; ++v) acc[p][v] += x * wv[v] * 1.0001f;", _fuzz("broadcast")),
    Mutant("cpu_expand", "csrc/cpu/conv_microkernel.h",
           "acc[p][v] += vload<V>(e + v * L) * wv[v];", "acc[p][v] += vload<V>(e + v * L) * (wv[v] * 1.0001f);",
           _fuzz("expand")),
    Mutant("cpu_generic", "csrc/cpu/conv_generic.cpp",
           "for (int64_t i = 0; i < n; ++i) acc[i] += a * w[i];",
           "for (int64_t i = 0; i < n; ++i) acc[i] += a * w[i] * acc_t(1.0001);", _fuzz("generic")),
    Mutant("cpu_onednn_epilogue", "csrc/cpu/conv_onednn.cpp",
           "float z = static_cast<float>(y[c]) * scale[c] + shift[c];",
           "float z = static_cast<float>(y[c]) * (scale[c] * 1.0001f) + shift[c];", _fuzz("pointwise")),
    Mutant("cpu_training_statistics", "csrc/cpu/row_stats.cpp",
           "var[c] = m2[c - c0] / double(M);", "var[c] = m2[c - c0] / double(M) * 1.0002;",
           ("tests/test_properties.py", "-k", "test_training_forward_backward_match_reference and winograd")),
    # CPU gradients.
    Mutant("cpu_bn_backward_input", "csrc/cpu/conv_bn_relu_train.cpp",
           "out[c] = static_cast<scalar_t>(k1[c] * gi - k2[c]",
           "out[c] = static_cast<scalar_t>(k1[c] * gi * acc_t(1.0001) - k2[c]",
           ("tests/test_training.py", "-k", "stage_shapes")),
    Mutant("cpu_data_grad_float32", "csrc/cpu/conv_bn_relu_train.cpp",
           "                             .contiguous();\n  return conv_affine_nhwc_cpu(plan.data_plan",
           "                             .contiguous().mul(1.0001);\n  return conv_affine_nhwc_cpu(plan.data_plan",
           ("tests/test_training.py", "-k", "data_gradient_against")),
    Mutant("cpu_weight_grad_bfloat16", "csrc/cpu/conv_wgrad.cpp",
           "= static_cast<scalar_t>(total[idx]);",
           "= static_cast<scalar_t>(total[idx] * (std::is_same_v<scalar_t, c10::BFloat16> ? 1.03 : 1.0));",
           ("tests/test_training.py", "-k", "weight_gradient_kernel_against and bfloat16")),
    Mutant("cpu_weight_grad_lanes", "csrc/cpu/conv_wgrad.cpp",
           "for (int kw = 0; kw < 3; ++kw) acc[j][kw] += xv[kw] * gs;",
           "for (int kw = 0; kw < 3; ++kw) acc[j][kw] += xv[kw] * gs * 1.0001f;",
           ("tests/test_training.py", "-k", "weight_gradient_kernel_against and float32")),
    Mutant("cpu_weight_grad_broadcast", "csrc/cpu/conv_wgrad.cpp",
           "for (int v = 0; v < NV; ++v) acc[r][v] += G[v] * xs;",
           "for (int v = 0; v < NV; ++v) acc[r][v] += G[v] * (xs * 1.0001f);", _MATRIX_CPU),
    Mutant("cpu_weight_grad_expand", "csrc/cpu/conv_wgrad.cpp",
           "for (int v = 0; v < NV; ++v) acc[r][v] += G[v] * vload<V>(s + v * L);",
           "for (int v = 0; v < NV; ++v) acc[r][v] += G[v] * (vload<V>(s + v * L) * 1.0001f);", _MATRIX_CPU),
    Mutant("cpu_weight_grad_generic", "csrc/cpu/conv_wgrad.cpp",
           "d[l] += static_cast<acc_t>(gp[l]) * sp[l];", "d[l] += static_cast<acc_t>(gp[l]) * sp[l] * acc_t(1.0001);",
           _MATRIX_CPU),
    Mutant("cpu_data_grad_kernel_not_flipped", "csrc/cpu/conv_bn_relu_train.cpp",
           ".flip({3, 4})", ".flip({3})", _MATRIX_CPU),
    # CUDA kernels, run by the emulator.
    Mutant("cuda_direct_forward", "csrc/cuda/kernels/conv_bn_relu_fwd.cuh",
           "for (int c = c_begin; c < c_end; ++c) sum += x[c * in_plane] * wk[c];",
           "for (int c = c_begin; c < c_end; ++c) sum += x[c * in_plane] * wk[c] * Acc(1.0001);",
           ("tests/test_cuda_emulated.py", "-k", "test_emulated_cuda_kernel_matches_reference and float32")),
    Mutant("cuda_bn_backward", "csrc/cuda/kernels/bn_train.cuh",
           "k1[c] = Acc(s);", "k1[c] = Acc(s * 1.0001);",
           ("tests/test_cuda_emulated.py", "-k", "test_emulated_cuda_training_forward_backward and float32")),
    Mutant("cuda_tensor_core_epilogue", "csrc/cuda/kernels/conv_tc.cuh",
           "v0 = v0 * sc[j].x + sf[j].x;", "v0 = v0 * sc[j].x * 1.03f + sf[j].x;",
           ("tests/test_cuda_tensor_core.py", "-k", "test_inference_matches_float64 and float16 and forward")),
    Mutant("cuda_tensor_core_weight_grad", "csrc/cuda/kernels/conv_wgrad_tc.cuh",
           "const float v = stage[co * row_len + wt_stage_skew(co, p.cw) + rest];",
           "const float v = stage[co * row_len + wt_stage_skew(co, p.cw) + rest] * 1.03f;",
           ("tests/test_path_matrix.py", "-k", "cuda")),
]


def _run(cmd, cwd, env, log, timeout):
    with open(log, "w") as f:
        try:
            return subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return None


def _copy_tree(dest: str) -> None:
    """The tracked and untracked-but-not-ignored files of the checkout (no build outputs)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def _tests_from(tree: str, rev: str) -> None:
    """Replaces the tree's tests/ with revision `rev`'s."""
    shutil.rmtree(os.path.join(tree, "tests"))
    archive = subprocess.run(["git", "archive", rev, "tests"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)


def _env(tree: str, jobs: int) -> dict:
    env = dict(os.environ, RESNEXT_KERNELS_NO_CUDA="1", MAX_JOBS=str(jobs), PYTHONPATH=tree,
               CCACHE_BASEDIR=tree, CCACHE_NOHASHDIR="1")
    if os.path.isdir("/usr/lib/ccache"):
        env["PATH"] = "/usr/lib/ccache" + os.pathsep + env.get("PATH", "")
    env.pop("RESNEXT_KERNELS_EXPECT_SANITIZED", None)
    return env


def _build(tree, env, log) -> float | None:
    """Seconds the (incremental) build took; None when it failed."""
    start = time.time()
    rc = _run([sys.executable, "setup.py", "build_ext", "--inplace"], tree, env, log, 3600)
    return time.time() - start if rc == 0 else None


def _pytest(tree, env, args, log, timeout=900, stop_first=True):
    return _run([sys.executable, "-m", "pytest", "-q", *(["-x"] if stop_first else []), "-p", "no:cacheprovider",
                 *args], tree, env, log, timeout)


def _failures(log) -> list[str]:
    with open(log) as f:
        return [m.group(1) for m in (re.match(r"(?:FAILED|ERROR) (\S+)", line) for line in f) if m]


def _first_failure(log) -> str:
    return (_failures(log) or ["?"])[0]


def _apply(tree: str, m: Mutant) -> str:
    path = os.path.join(tree, m.path)
    with open(path) as f:
        original = f.read()
    count = original.count(m.old)
    if count != 1:
        sys.exit(f"mutation_check: {m.name}: the text to change occurs {count} times in {m.path} (must be once)")
    with open(path, "w") as f:
        f.write(original.replace(m.old, m.new))
    return original


def _run_mutant(tree: str, env: dict, logs: str, m: Mutant) -> tuple[bool, str]:
    """Applies one mutant to `tree`, rebuilds, runs its subset, reverts. Returns (killed, report line)."""
    t0 = time.time()
    original = _apply(tree, m)
    rc = None
    try:
        log = os.path.join(logs, f"{m.name}-build.log")
        # Always rebuild: the build may still hold the previous compiled mutant (reverted in the sources only), which
        # would then kill a Python mutant in its place. Unchanged, that is a no-op; after a revert, ccache hits.
        build_s = _build(tree, env, log)
        if build_s is not None:
            log = os.path.join(logs, f"{m.name}.log")
            rc = _pytest(tree, env, list(m.tests), log)
    finally:
        with open(os.path.join(tree, m.path), "w") as f:
            f.write(original)
    if build_s is None:
        verdict, build_s = f"ERROR (the mutant does not build; log {log})", 0.0
    elif rc == 1:
        verdict = f"killed by {_first_failure(log)}"
    elif rc == 0:
        verdict = "SURVIVED"
    else:
        verdict = f"ERROR (pytest exit {rc}; log {log})"
    return rc == 1, f"{m.name:36s} {time.time() - t0:5.0f} s (build {build_s:3.0f} s)  {verdict}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--only", help="comma-separated mutant names")
    ap.add_argument("--scratch", help="scratch directory (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip running the subsets on the unmutated tree (when the full suite just passed on it)")
    ap.add_argument("--suite-from", metavar="REV", help="test with revision REV's whole test suite instead")
    ap.add_argument("--suite-failing", metavar="FILE",
                    help="with --suite-from: the tests that fail unmutated, one per line (skips finding them)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="scratch trees testing mutants in parallel, each building with one job (default: 2 where "
                         "there are 2 cores)")
    args = ap.parse_args()
    mutants = MUTANTS
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {m.name for m in MUTANTS}
        if unknown:
            sys.exit(f"mutation_check: unknown mutants {sorted(unknown)}")
        mutants = [m for m in MUTANTS if m.name in names]
    if args.list:
        for m in mutants:
            print(f"{m.name:36s} {m.path}: {' '.join(m.tests)}")
        return 0
    workers = max(1, min(args.workers, len(mutants)))
    jobs = int(os.environ.get("MAX_JOBS", "2")) if workers == 1 else 1
    scratch = args.scratch or tempfile.mkdtemp(prefix="rk-mutants-")
    logs = os.path.join(scratch, "logs")
    os.makedirs(logs, exist_ok=True)
    start = time.time()
    trees = []
    for i in range(workers):
        tree = os.path.join(scratch, f"tree{i}")
        if os.path.exists(tree):
            shutil.rmtree(tree)
        _copy_tree(tree)
        if args.suite_from:
            _tests_from(tree, args.suite_from)
        env = _env(tree, int(os.environ.get("MAX_JOBS", "2")))  # the first builds use every core
        build_s = _build(tree, env, os.path.join(logs, f"build{i}.log"))
        if build_s is None:
            sys.exit(f"mutation_check: the unmutated tree does not build (log: {os.path.join(logs, f'build{i}.log')})")
        print(f"scratch tree {tree}: build {build_s:.0f} s", flush=True)
        trees.append((tree, _env(tree, jobs)))
    if args.suite_from:
        # The older suite's tests that fail on the unmutated tree (they test what has changed since) are left out.
        log = os.path.join(logs, "baseline-suite.log")
        t0 = time.time()
        if args.suite_failing:
            with open(args.suite_failing) as f:
                failing = f.read().split()
        else:
            _pytest(trees[0][0], trees[0][1], ["tests"], log, timeout=3600, stop_first=False)
            failing = _failures(log)
        print(f"suite of {args.suite_from}: {len(failing)} tests fail unmutated and are left out "
              f"({time.time() - t0:.0f} s): {' '.join(failing)}", flush=True)
        tests = ("tests", *(arg for t in failing for arg in ("--deselect", t)))
        mutants = [Mutant(m.name, m.path, m.old, m.new, tests) for m in mutants]
        args.no_baseline = True
    # The subsets must pass on the unmutated tree, or a "kill" would mean nothing.
    subsets = [] if args.no_baseline else sorted({m.tests for m in mutants})
    t0 = time.time()
    for i, tests in enumerate(subsets):
        log = os.path.join(logs, f"baseline-{i}.log")
        if _pytest(trees[0][0], trees[0][1], list(tests), log) != 0:
            sys.exit(f"mutation_check: a test subset fails without a mutant: {' '.join(tests)} (log: {log})")
    if subsets:
        print(f"baseline: {len(subsets)} test subsets pass unmutated ({time.time() - t0:.0f} s)", flush=True)
    # Every mutant's text must occur once, checked here: a worker thread's exit would only end that thread.
    for m in mutants:
        with open(os.path.join(ROOT, m.path)) as f:
            count = f.read().count(m.old)
        if count != 1:
            sys.exit(f"mutation_check: {m.name}: the text to change occurs {count} times in {m.path} (must be once)")
    # Compiled mutants first, longest rebuilds first, so the workers finish together; Python ones fill in at the end.
    queue = sorted(mutants, key=lambda m: not m.compiled)
    lock, results = threading.Lock(), {}

    def worker(tree: str, env: dict) -> None:
        while True:
            with lock:
                if not queue:
                    return
                m = queue.pop(0)
            results[m.name] = _run_mutant(tree, env, logs, m)
            print(results[m.name][1], flush=True)

    threads = [threading.Thread(target=worker, args=tree) for tree in trees]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    killed = sum(results[m.name][0] for m in mutants)
    print(f"killed {killed} of {len(mutants)} ({time.time() - start:.0f} s in all, {workers} workers)")
    if not args.keep and not args.scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if killed == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The path matrix (tests/path_matrix_cases.py): every CPU kernel path and every emulated CUDA kernel, in each dtype,
NCHW and channels_last, N=1 and N>1, inference and the training forward and backward, against float64 PyTorch, with
the path that ran observed by its profiler scope. The CPU matrix runs under each CPU configuration: native, each ISA
cap, the Intel routes, and the oneDNN routes off."""

from __future__ import annotations

import collections
import itertools
import json
import os
import subprocess
import sys

import pytest
from paths_cases import DATA_GRAD_PATH
from reference import PATH_MATRIX
from test_paths import CONFIGS

import resnext_kernels as rk
from resnext_kernels import emulator

HERE = os.path.dirname(__file__)
LAYOUTS, SIZES = ("nchw", "channels_last"), ("n1", "n2")
ONEDNN = {"onednn_1x1", "onednn_large_block", "onednn_intel"}
CPU_CONFIGS = dict(CONFIGS, aten_routes_off=(
    dict(RESNEXT_KERNELS_CPU_VENDOR="amd", RESNEXT_KERNELS_CPU_ATEN_ROUTES="off"),
    CONFIGS["native"][1] - ONEDNN, CONFIGS["native"][2]))


def _report(*args, **env) -> dict:
    package_root = os.path.dirname(os.path.dirname(rk.__file__))  # the build this process tests, not another install
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=package_root, **env)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "path_matrix_cases.py"), *args], cwd=HERE,
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _check_cells(report: dict, device: str) -> dict[str, set]:
    """Asserts every cell: the path explain() named is the one whose scope opened, forward and backward, and every
    output, gradient and running statistic is within its bound. Returns, per kernel or gradient source, the cells
    (dtype, layout, size, form) it ran in."""
    seen, failures = collections.defaultdict(set), []
    for key, c in report["results"].items():
        case, size, dtype, layout, form = key.split("/")
        assert c["path"] == device, (key, c)
        forward = [c["kernel"]] if device == "cpu" or form == "inference" else sorted([c["kernel"], "cuda_bn_stats"])
        assert c["forward"] == forward, (key, c)
        seen[c["kernel"]].add((dtype, layout, size, form))
        if form == "training":
            grads = {c["data_grad"], c["weight_grad"]}
            expected = grads | ({DATA_GRAD_PATH[c["data_grad"]]} if c["data_grad"] in DATA_GRAD_PATH else set())
            if device == "cuda":
                expected = grads | {"cuda_bn_backward"}
            assert set(c["backward"]) == expected, (key, c)
            for g in grads:
                seen[g].add((dtype, layout, size, form))
        failures += [f"{key} {name}: rel_err {err:.3g} > {bound:.3g}" for name, (err, bound) in c["errors"].items()
                     if not err <= bound]
    assert not failures, "\n".join(failures)
    return seen


def _cells(dtypes, forms=("inference", "training")) -> set:
    return set(itertools.product(dtypes, LAYOUTS, SIZES, forms))


def _missing(seen: dict, path: str, dtypes, forms) -> list:
    return sorted(_cells(dtypes, forms) - seen.get(path, set()))


@pytest.mark.parametrize("config", CPU_CONFIGS)
def test_cpu_path_matrix(config):
    env, must_kernels, must_grads = CPU_CONFIGS[config]
    report = _report(**env)
    seen = _check_cells(report, "cpu")
    native_bf16 = report["config"]["native_bf16"]
    missing = {}
    for path in must_kernels:  # bfloat16 takes oneDNN only where the CPU multiplies it natively
        dtypes = ("float32", "bfloat16") if path not in ONEDNN or native_bf16 else ("float32",)
        missing[path] = _missing(seen, path, dtypes, ("inference", "training"))
    for path in must_grads:
        missing[path] = _missing(seen, path, ("float32", "bfloat16"), ("training",))
    PATH_MATRIX[f"cpu {config}"] = {path: len(cells) for path, cells in sorted(seen.items())}
    assert not {p: m for p, m in missing.items() if m}, (report["config"], missing)
    if config == "baseline":
        assert {p for p in seen if not p.startswith(("dgrad", "wgrad"))} == {"generic", "onednn_1x1"}


@pytest.mark.skipif(not emulator.available(), reason="resnext_kernels._emu (emulated CUDA) not built")
def test_emulated_cuda_path_matrix():
    """float16, bfloat16 and float32 (TF32 on the tensor cores, PyTorch's default for convolutions)."""
    report = _report("--cuda")
    seen = _check_cells(report, "cuda")
    all_dtypes = ("float16", "bfloat16", "float32")
    missing = {path: _missing(seen, path, all_dtypes, ("inference", "training")) for path in ("cuda_direct",
                                                                                                "cuda_tc")}
    missing["dgrad_cuda_tc"] = _missing(seen, "dgrad_cuda_tc", all_dtypes, ("training",))
    missing["wgrad_cuda"] = _missing(seen, "wgrad_cuda", all_dtypes, ("training",))
    # TF32 weight gradients go to cuDNN: the tensor-core weight gradient takes the 16-bit types.
    missing["wgrad_cuda_tc"] = _missing(seen, "wgrad_cuda_tc", ("float16", "bfloat16"), ("training",))
    PATH_MATRIX["emulated cuda"] = {path: len(cells) for path, cells in sorted(seen.items())}
    assert not {p: m for p, m in missing.items() if m}, missing


"""explain() names the path that runs: for every CPU path (forward, and the training backward's gradient sources) and
for the emulated CUDA path, the profiler scope a call opens (resnext_kernels::<path>) is the one the C++ planner
reports. The planner is the kernels' own dispatch, so this checks the plan against what the dispatch ran, not against
a second copy of the rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from paths_cases import DATA_GRAD_PATH
from reference import cuda_plan
from torch.profiler import ProfilerActivity, profile

import resnext_kernels as rk
from resnext_kernels import emulator

HERE = os.path.dirname(__file__)
VECTOR_PATHS = {"winograd_f4x4", "winograd_f2x2", "lanes", "broadcast", "expand", "generic", "onednn_1x1"}
VECTOR_GRADS = {"dgrad_aten", "dgrad_lanes", "dgrad_winograd_f4x4", "wgrad_aten", "wgrad_lanes", "wgrad_broadcast",
                "wgrad_expand", "wgrad_generic"}
SUPPORTED = rk.ops.cpu_config().supported_isa


def _run(**env) -> dict:
    """paths_cases.py's report in a process with this CPU configuration."""
    package_root = os.path.dirname(os.path.dirname(rk.__file__))  # the build this process tests, not another install
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=package_root, **env)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "paths_cases.py")], cwd=HERE, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _check(report: dict) -> tuple[set[str], set[str]]:
    """Asserts that every case ran what explain() named; returns the kernels and gradient sources seen."""
    kernels, grads = set(), set()
    for name, r in report["results"].items():
        assert r["path"] == "cpu", (name, r)
        assert r["forward"] == [r["kernel"]], (name, r)
        kernels.add(r["kernel"])
        if "backward" in r:
            expected = {r["data_grad"], r["weight_grad"]}
            if r["data_grad"] in DATA_GRAD_PATH:  # the forward kernel run on grad_y, inside the gradient's scope
                expected.add(DATA_GRAD_PATH[r["data_grad"]])
            assert set(r["backward"]) == expected, (name, r)
            grads |= {r["data_grad"], r["weight_grad"]}
        if name.endswith("/autograd"):  # the inference form's backward: ATen's convolution_backward
            assert (r["data_grad"], r["weight_grad"]) == ("dgrad_aten", "wgrad_aten"), (name, r)
    return kernels, grads


# (environment, kernels that must be seen, gradient sources that must be seen), by what this CPU supports.
CONFIGS = {
    "native": (dict(RESNEXT_KERNELS_CPU_VENDOR="amd"), VECTOR_PATHS if SUPPORTED != "baseline" else set(),
               VECTOR_GRADS if SUPPORTED != "baseline" else set()),
    "avx2": (dict(RESNEXT_KERNELS_CPU_ISA="avx2", RESNEXT_KERNELS_CPU_VENDOR="amd"),
             VECTOR_PATHS | {"onednn_large_block"} if SUPPORTED != "baseline" else set(), set()),
    "intel": (dict(RESNEXT_KERNELS_CPU_VENDOR="intel"), {"onednn_intel"} if SUPPORTED == "avx512" else set(), set()),
    "baseline": (dict(RESNEXT_KERNELS_CPU_ISA="baseline"), {"generic", "onednn_1x1"},
                 {"dgrad_aten", "wgrad_aten", "wgrad_generic"}),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_cpu_paths_run_what_explain_names(config):
    env, must_kernels, must_grads = CONFIGS[config]
    report = _run(**env)
    kernels, grads = _check(report)
    assert must_kernels <= kernels, (report["config"], kernels)
    assert must_grads <= grads, (report["config"], grads)
    if config == "baseline":
        assert kernels == {"generic", "onednn_1x1"}


def test_unknown_vendor_value_is_a_clear_error():
    env = dict(os.environ, RESNEXT_KERNELS_CPU_VENDOR="via")
    proc = subprocess.run([sys.executable, "-c", "import resnext_kernels"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "RESNEXT_KERNELS_CPU_VENDOR must be one of" in proc.stderr


# ----------------------------------------------------------------------------------------------------
# The emulated CUDA path: the CUDA launchers run on CPU tensors through the emulator, against the CUDA planner op
# ----------------------------------------------------------------------------------------------------

CUDA_SCOPES = {"cuda_direct", "cuda_tc", "cuda_bn_stats", "cuda_bn_backward", "wgrad_cuda", "wgrad_cuda_tc",
               "dgrad_cuda_tc", "dgrad_aten", "wgrad_aten"}


def _cuda_scopes(fn) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name.split("::", 1)[1] for e in prof.events()
                   if e.name.startswith("resnext_kernels::") and e.name.split("::", 1)[1] in CUDA_SCOPES})


def _assert_emulated_scopes(x, wt, args, path, data_grad, weight_grad):
    """The emulated inference, training forward and backward open the scopes the planner named."""
    E = torch.ops.resnext_kernels_emu
    c = wt.shape[0]
    scale, shift = torch.rand(c) + 0.5, torch.randn(c)
    assert _cuda_scopes(lambda: E.conv_bn_relu_infer(x, wt, scale, shift, *args, True)) == [path]
    out = []
    assert _cuda_scopes(lambda: out.append(E.conv_bn_relu_train(x, wt, None, None, 1e-5, *args, True))) == sorted(
        [path, "cuda_bn_stats"])
    _, conv_out, mean, var = out[0]
    g = torch.randn_like(conv_out)
    seen = _cuda_scopes(lambda: E.conv_bn_relu_train_backward(g, x, wt, conv_out, mean, var, None, None, 1e-5, *args,
                                                               True, [True, True, True]))
    assert seen == sorted(["cuda_bn_backward", data_grad, weight_grad])


@pytest.mark.skipif(not emulator.available(), reason="resnext_kernels._emu (emulated CUDA) not built")
@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("kernel,dilation", [(3, 1), (1, 1), (15, 8)], ids=["3x3", "1x1", "uncovered"])
def test_emulated_cuda_path_runs_what_the_planner_names(kernel, dilation, deterministic):
    E = torch.ops.resnext_kernels_emu
    x = torch.randn(1, 8, 4 + (kernel - 1) * dilation, 5 + (kernel - 1) * dilation)
    wt = torch.randn(8, 2, kernel, kernel)
    args = ([1, 1], [0, 0], [dilation] * 2, 4)
    torch.use_deterministic_algorithms(deterministic)
    try:
        r = torch.ops.resnext_kernels._plan_cuda_conv(list(x.shape), list(wt.shape), *args, x.dtype, True)
        path, data_grad, weight_grad = r[0], r[4], r[5]
        if path == "aten":
            assert cuda_plan(x, wt, *args)[0] == "aten"
            with pytest.raises(RuntimeError, match="not covered"):
                E.conv_bn_relu_train(x, wt, None, None, 1e-5, *args, True)
            return
        assert path == "cuda_direct"
        assert weight_grad == ("wgrad_cuda" if deterministic else "wgrad_aten") and data_grad == "dgrad_aten"
        _assert_emulated_scopes(x, wt, args, path, data_grad, weight_grad)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.skipif(not emulator.available(), reason="resnext_kernels._emu (emulated CUDA) not built")
@pytest.mark.parametrize("tf32", [True, False], ids=["tf32", "no-tf32"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_emulated_tensor_core_path_runs_what_the_planner_names(dtype, stride, tf32):
    """Groups of 4 over 64-channel blocks: the tensor cores for 16-bit types, and for float32 where TF32 is allowed
    (else the direct kernel); the stride-1 data gradient on them too, and the weight gradient for 16-bit types."""
    x = torch.randn(2, 128, 9, 8).to(dtype)
    wt = torch.randn(128, 4, 3, 3).to(dtype)
    args = ([stride] * 2, [1, 1], [1, 1], 32)
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        r = torch.ops.resnext_kernels._plan_cuda_conv(list(x.shape), list(wt.shape), *args, x.dtype, True)
        path, data_grad, weight_grad = r[0], r[4], r[5]
        tensor_cores = dtype != torch.float32 or tf32
        assert path == ("cuda_tc" if tensor_cores else "cuda_direct")
        assert data_grad == ("dgrad_cuda_tc" if tensor_cores and stride == 1 else "dgrad_aten")
        assert weight_grad == ("wgrad_cuda_tc" if dtype != torch.float32 else "wgrad_aten")
        _assert_emulated_scopes(x, wt, args, path, data_grad, weight_grad)
    finally:
        torch.backends.cudnn.allow_tf32 = allowed

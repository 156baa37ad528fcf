"""Runs one small convolution per CPU path under torch.profiler and reports, per case, what explain() names and which
path scopes (resnext_kernels::<path>) the profiler saw, as JSON.

tests/test_paths.py runs it in this process and, since the CPU configuration is read once per process, in
subprocesses under RESNEXT_KERNELS_CPU_ISA=avx2 / =baseline and RESNEXT_KERNELS_CPU_VENDOR=intel, which reach the
AVX2-only and Intel-only oneDNN routes and the portable kernel.
"""

from __future__ import annotations

import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import resnext_kernels as rk

CPU_PATHS = {"onednn_1x1", "onednn_large_block", "onednn_intel", "winograd_f4x4", "winograd_f2x2", "lanes",
             "broadcast", "expand", "generic"}
DATA_GRADS = {"dgrad_aten", "dgrad_lanes", "dgrad_winograd_f4x4"}
WEIGHT_GRADS = {"wgrad_aten", "wgrad_lanes", "wgrad_broadcast", "wgrad_expand", "wgrad_generic"}
# The forward path a data-gradient source runs on grad_y (nested in its scope).
DATA_GRAD_PATH = {"dgrad_lanes": "lanes", "dgrad_winograd_f4x4": "winograd_f4x4"}

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
# name: (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups, dtype, deterministic). The comment is the
# path on an AVX-512 AMD CPU (forward; training data and weight gradient sources).
CASES = {
    "winograd_f4x4": (2, 32, 8, 8, 32, 3, 1, 1, 1, 4, F32, False),  # 8 tiles; dgrad_winograd_f4x4, wgrad_lanes
    "winograd_f2x2": (1, 32, 6, 6, 32, 3, 1, 1, 1, 4, F32, False),  # 4 tiles
    "winograd_bf16": (2, 48, 8, 7, 48, 3, 1, 1, 1, 3, BF16, False),  # 16 per group, odd group count
    "lanes": (2, 32, 6, 7, 32, 3, 1, 1, 1, 8, F32, False),  # 4 per group; dgrad_lanes, wgrad_lanes
    "lanes_stride2_bf16": (2, 32, 7, 7, 32, 3, 2, 1, 1, 16, BF16, False),  # 2 per group; dgrad_aten
    "broadcast": (2, 32, 7, 6, 32, 3, 2, 1, 1, 2, F32, False),  # 16 per group; dgrad_aten, wgrad_aten
    "broadcast_dense_64": (1, 64, 6, 6, 64, 3, 2, 1, 1, 1, F32, False),  # onednn_large_block on AVX2
    "expand": (2, 32, 6, 6, 32, 3, 1, 1, 1, 32, F32, False),  # depthwise
    "expand_deterministic": (2, 32, 6, 6, 32, 3, 1, 1, 1, 32, F32, True),  # wgrad_expand
    "broadcast_deterministic": (2, 16, 6, 6, 16, 3, 2, 1, 1, 1, F32, True),  # wgrad_broadcast
    "generic_width": (2, 24, 5, 5, 24, 3, 2, 1, 1, 8, F32, False),  # 24 outputs: not a multiple of 16
    "generic_f64": (2, 16, 5, 5, 16, 3, 1, 1, 1, 4, F64, True),  # wgrad_generic
    "onednn_1x1": (2, 128, 4, 4, 128, 1, 1, 0, 1, 1, F32, False),  # 64 KB of weights
}


def _seen(prof) -> set[str]:
    """The path scopes the profile holds (names without the namespace)."""
    known = CPU_PATHS | DATA_GRADS | WEIGHT_GRADS
    return {e.name.split("::", 1)[1] for e in prof.events()
            if e.name.startswith("resnext_kernels::") and e.name.split("::", 1)[1] in known}


def _profiled(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return _seen(prof)


def run_case(case, form: str) -> dict:
    """form: "inference" (no autograd), "autograd" (inference form, gradients through autograd) or "training"."""
    n, c_in, h, w, c_out, k, stride, padding, dilation, groups, dtype, deterministic = case
    torch.use_deterministic_algorithms(deterministic)
    try:
        x = torch.randn(n, c_in, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
        wt = (torch.randn(c_out, c_in // groups, k, k) / (c_in // groups * k * k) ** 0.5).to(dtype)
        mean, var = torch.randn(c_out) * 0.1, torch.rand(c_out) + 0.5
        gamma, beta = torch.rand(c_out) + 0.5, torch.randn(c_out)
        grad_on = form != "inference"
        x.requires_grad_(grad_on)
        wt.requires_grad_(grad_on)
        kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        training = form == "training"
        decision = rk.explain(x, wt, training=training, **kwargs)
        result = {"path": decision.path, "kernel": decision.kernel, "data_grad": decision.data_grad,
                  "weight_grad": decision.weight_grad}
        out = []
        result["forward"] = sorted(_profiled(lambda: out.append(rk.conv_bn_relu(
            x, wt, None if training else mean, None if training else var, gamma, beta, training=training,
            **kwargs))))
        if grad_on:
            grad = torch.randn_like(out[0])
            result["backward"] = sorted(_profiled(lambda: out[0].backward(grad)))
        return result
    finally:
        torch.use_deterministic_algorithms(False)


def main() -> None:
    torch.manual_seed(0)
    results = {f"{name}/{form}": run_case(case, form) for name, case in CASES.items()
               for form in ("inference", "autograd", "training")}
    json.dump({"config": rk.ops.cpu_config()._asdict(), "results": results}, sys.stdout)


if __name__ == "__main__":
    main()

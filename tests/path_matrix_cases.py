"""The path matrix: every CPU kernel path (or, with --cuda, every emulated CUDA kernel) in each dtype, NCHW and
channels_last, N=1 and N>1, inference and the training forward and backward, against float64 PyTorch computed
independently (F.conv2d -> F.batch_norm -> F.relu by autograd, tests/reference.py), with the tolerance rule of
tests/reference.py. Prints one JSON report: per cell, the path explain() named, the path scopes the profiler saw
(resnext_kernels::<path>), and each output's error and bound.

tests/test_path_matrix.py runs it in subprocesses, one per CPU configuration (the CPU configuration is read once per
process): native, RESNEXT_KERNELS_CPU_ISA=avx2 / =baseline, RESNEXT_KERNELS_CPU_VENDOR=intel and
RESNEXT_KERNELS_CPU_ATEN_ROUTES=off.
"""

from __future__ import annotations

import json
import sys
import zlib

import torch
import torch.nn.functional as F
from reference import reference_conv_bn_relu, reference_train, rel_err, round_to_tf32, tolerance
from torch.profiler import ProfilerActivity, profile

import resnext_kernels as rk

CPU_KERNELS = {"onednn_1x1", "onednn_large_block", "onednn_intel", "winograd_f4x4", "winograd_f2x2", "lanes",
               "broadcast", "expand", "generic"}
CPU_GRADS = {"dgrad_aten", "dgrad_lanes", "dgrad_winograd_f4x4", "wgrad_aten", "wgrad_lanes", "wgrad_broadcast",
             "wgrad_expand", "wgrad_generic"}
CUDA_KERNELS = {"cuda_direct", "cuda_tc"}
CUDA_GRADS = {"cuda_bn_stats", "cuda_bn_backward", "wgrad_cuda", "wgrad_cuda_tc", "dgrad_cuda_tc", "dgrad_aten",
              "wgrad_aten"}

# name: (N, C_in, H, W, C_out, kernel, stride, padding, groups, deterministic). Each path has an N=1 and an N=2
# case; the comment is the forward path (training data/weight gradient sources) on an AVX-512 AMD CPU.
CPU_CASES = {
    "winograd_f4x4/n2": (2, 32, 8, 8, 32, 3, 1, 1, 4, False),  # dgrad_winograd_f4x4, wgrad_lanes
    "winograd_f4x4/n1": (1, 32, 12, 12, 32, 3, 1, 1, 4, False),
    "winograd_f2x2/n1": (1, 32, 6, 6, 32, 3, 1, 1, 4, False),
    "winograd_f2x2/n2": (2, 48, 4, 4, 48, 3, 1, 1, 3, False),  # 16 per group, odd group count
    "lanes/n2": (2, 32, 6, 7, 32, 3, 1, 1, 8, False),  # dgrad_lanes, wgrad_lanes
    "lanes/n1": (1, 32, 9, 7, 32, 3, 1, 1, 8, False),
    "lanes_stride2/n2": (2, 32, 7, 7, 32, 3, 2, 1, 16, False),  # dgrad_aten
    "broadcast/n2": (2, 32, 7, 6, 32, 3, 2, 1, 2, False),  # dgrad_aten, wgrad_aten
    "broadcast/n1": (1, 32, 9, 8, 32, 3, 2, 1, 2, False),
    "broadcast_dense/n1": (1, 64, 6, 6, 64, 3, 2, 1, 1, False),  # onednn_large_block under AVX2
    "broadcast_dense/n2": (2, 64, 6, 6, 64, 3, 2, 1, 1, False),
    "broadcast_deterministic/n2": (2, 16, 6, 6, 16, 3, 2, 1, 1, True),  # wgrad_broadcast
    "broadcast_deterministic/n1": (1, 16, 8, 8, 16, 3, 2, 1, 1, True),
    "expand/n2": (2, 32, 6, 6, 32, 3, 1, 1, 32, False),  # depthwise
    "expand/n1": (1, 32, 7, 6, 32, 3, 1, 1, 32, False),
    "expand_deterministic/n2": (2, 32, 6, 6, 32, 3, 1, 1, 32, True),  # wgrad_expand
    "expand_deterministic/n1": (1, 32, 7, 6, 32, 3, 1, 1, 32, True),
    "generic/n2": (2, 20, 5, 5, 20, 3, 2, 1, 4, False),  # 20 outputs: not a multiple of 8 or 16
    "generic/n1": (1, 20, 7, 7, 20, 3, 2, 1, 4, False),
    "generic_deterministic/n2": (2, 20, 6, 6, 20, 3, 1, 1, 4, True),  # wgrad_generic
    "generic_deterministic/n1": (1, 20, 7, 7, 20, 3, 1, 1, 4, True),
    "onednn_1x1/n2": (2, 128, 4, 4, 128, 1, 1, 0, 1, False),  # 64 KB of weights
    "onednn_1x1/n1": (1, 128, 5, 5, 128, 1, 1, 0, 1, False),
}
# The tensor cores need 64-channel blocks: groups of 4 over 128 channels (ResNeXt's stage 1 width per group).
CUDA_CASES = {
    "tensor_core/n2": (2, 128, 6, 5, 128, 3, 1, 1, 32, False),  # dgrad_cuda_tc, wgrad_cuda_tc (16-bit types)
    "tensor_core/n1": (1, 128, 7, 6, 128, 3, 1, 1, 32, False),
    "tensor_core_stride2/n2": (2, 128, 7, 6, 128, 3, 2, 1, 32, False),  # dgrad_aten
    "direct/n2": (2, 24, 6, 5, 24, 3, 1, 1, 8, False),  # wgrad_aten
    "direct/n1": (1, 24, 7, 6, 24, 3, 1, 1, 8, False),
    "direct_deterministic/n2": (2, 24, 6, 5, 24, 3, 2, 1, 8, True),  # wgrad_cuda
    "direct_deterministic/n1": (1, 24, 7, 6, 24, 3, 2, 1, 8, True),
}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
MOMENTUM = 0.3  # asymmetric: swapping the running-statistics update's two terms changes the result


def _seen(prof, known) -> list[str]:
    return sorted({e.name.split("::", 1)[1] for e in prof.events()
                   if e.name.startswith("resnext_kernels::") and e.name.split("::", 1)[1] in known})


def _profiled(fn, known) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return _seen(prof, known)


def _check(errors: dict, name: str, out: torch.Tensor, ref: torch.Tensor, own: torch.Tensor | None, dtype,
           tf32: bool) -> None:
    """errors[name] = [rel_err, bound]: PyTorch's own same-dtype error sets the low-precision bound (and a float32
    floor where the problem is ill-conditioned: few values per channel)."""
    own_err = None if own is None else rel_err(own, ref)
    errors[name] = [rel_err(out, ref), tolerance(dtype, own_err, tf32)]


def run_cell(case, dtype, layout, form, known) -> dict:
    n, c_in, h, w, c_out, k, stride, padding, groups, deterministic = case
    g = torch.Generator().manual_seed(zlib.crc32(repr((case, dtype, layout, form)).encode()))
    torch.use_deterministic_algorithms(deterministic)
    try:
        x = torch.randn(n, c_in, h, w, generator=g).to(dtype).contiguous(memory_format=LAYOUTS[layout])
        wt = (torch.randn(c_out, c_in // groups, k, k, generator=g) / (c_in // groups * k * k) ** 0.5).to(dtype)
        gamma, beta = torch.rand(c_out, generator=g) + 0.5, torch.randn(c_out, generator=g) * 0.5
        mean, var = torch.randn(c_out, generator=g) * 0.2, torch.rand(c_out, generator=g) + 0.5
        conv = dict(stride=stride, padding=padding, groups=groups)
        training = form == "training"
        decision = rk.explain(x, wt, training=training, requires_grad=training, **conv)
        cell = {"path": decision.path, "kernel": decision.kernel, "data_grad": decision.data_grad,
                "weight_grad": decision.weight_grad, "errors": {}}
        errors = cell["errors"]
        # float32 on the CUDA tensor cores is TF32 (PyTorch's default for convolutions): held to PyTorch's own error
        # with the convolution's inputs rounded to TF32, as cuDNN takes them, like the 16-bit types.
        tf32 = decision.kernel == "cuda_tc" and dtype == torch.float32
        low = dtype not in (torch.float32, torch.float64) or tf32
        x_own, wt_own = (round_to_tf32(x), round_to_tf32(wt)) if tf32 else (x, wt)
        if not training:
            out = []
            cell["forward"] = _profiled(lambda: out.append(rk.conv_bn_relu(x, wt, mean, var, gamma, beta, **conv)),
                                        known)
            ref = reference_conv_bn_relu(x, wt, mean, var, gamma, beta, 1e-5, stride, padding, 1, groups)
            own = None
            if low:  # PyTorch's own in this dtype: the convolution, then BN and ReLU in it
                own = F.relu(F.batch_norm(F.conv2d(x_own, wt_own, None, stride, padding, 1, groups), mean.to(dtype),
                                          var.to(dtype), gamma.to(dtype), beta.to(dtype), False, 0.0, 1e-5))
            _check(errors, "output", out[0], ref, own, dtype, tf32)
            return cell
        # Low-precision training runs without the ReLU: a rounding that flips one ReLU mask element moves a gradient
        # by ~10%, in PyTorch's own result as in ours (tests/test_training.py); float32 runs with it.
        conv["relu"] = relu = not low
        xr, wr = x.detach().clone().requires_grad_(), wt.detach().clone().requires_grad_()
        gr, br = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
        run_mean, run_var = mean.clone(), var.clone()
        out = []
        cell["forward"] = _profiled(lambda: out.append(rk.conv_bn_relu(
            xr, wr, run_mean, run_var, gr, br, training=True, momentum=MOMENTUM, **conv)), known)
        grad = torch.randn(out[0].shape, generator=g).to(dtype)
        cell["backward"] = _profiled(lambda: out[0].backward(grad), known)
        conv_args = (stride, padding, 1, groups, relu)
        ref_out, ref_mean, ref_var, ref_grads = reference_train(x, wt, gamma, beta, grad, *conv_args)
        own_out, own_mean, own_var, own_grads = reference_train(x_own, wt_own, gamma, beta, grad, *conv_args,
                                                                dtype=dtype)
        count = out[0].numel() // c_out
        _check(errors, "output", out[0], ref_out, own_out, dtype, tf32)
        for name, got, ref, own in zip(("grad_input", "grad_weight", "grad_gamma", "grad_beta"),
                                       (xr.grad, wr.grad, gr.grad, br.grad), ref_grads, own_grads):
            _check(errors, name, got, ref, own, dtype, tf32)
        # Running statistics: nn.BatchNorm2d's update from the batch statistics; PyTorch's own from its same-dtype
        # convolution's statistics through the same update.
        unbias = count / (count - 1)
        for name, old, ref_stat, own_stat, factor, got in (("running_mean", mean, ref_mean, own_mean, 1.0, run_mean),
                                                           ("running_var", var, ref_var, own_var, unbias, run_var)):
            ref, own = (MOMENTUM * stat * factor + (1 - MOMENTUM) * old.double() for stat in (ref_stat, own_stat))
            _check(errors, name, got, ref, own if low else None, dtype, tf32)
        return cell
    finally:
        torch.use_deterministic_algorithms(False)


def main() -> None:
    cuda = "--cuda" in sys.argv
    if cuda:
        from resnext_kernels import emulator
        cases, known, dtypes = CUDA_CASES, CUDA_KERNELS | CUDA_GRADS, (torch.float16, torch.bfloat16, torch.float32)
        context = emulator.cuda_on_cpu()
    else:
        import contextlib
        cases, known, dtypes = CPU_CASES, CPU_KERNELS | CPU_GRADS, (torch.float32, torch.bfloat16)
        context = contextlib.nullcontext()
    results = {}
    with context:
        for name, case in cases.items():
            for dtype in dtypes:
                for layout in LAYOUTS:
                    for form in ("inference", "training"):
                        results[f"{name}/{str(dtype)[6:]}/{layout}/{form}"] = run_cell(case, dtype, layout, form,
                                                                                       known)
    json.dump({"config": rk.ops.cpu_config()._asdict(), "results": results}, sys.stdout)


if __name__ == "__main__":
    main()

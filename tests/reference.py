"""Independent references and tolerances shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The grouped 3x3 convolutions of ResNeXt-50 32x4d: (channels, spatial size) per stage, 32 groups.
RESNEXT50_STAGES = [(128, 56), (256, 28), (512, 14), (1024, 7)]


def reference_conv_bn_relu(x, w, mean, var, gamma, beta, eps, stride, padding, dilation, groups, relu=True):
    """conv2d -> batch_norm (inference) -> relu evaluated in float64."""
    d = torch.float64
    y = F.conv2d(x.to(d), w.to(d), None, stride, padding, dilation, groups)
    y = F.batch_norm(y, mean.to(d), var.to(d), None if gamma is None else gamma.to(d),
                     None if beta is None else beta.to(d), False, 0.0, eps)
    return F.relu(y) if relu else y


def reference_conv_affine_relu(x, w, scale, shift, stride, padding, dilation, groups, relu=True):
    """conv2d * scale + shift -> relu in float64 (the raw op's contract)."""
    d = torch.float64
    y = F.conv2d(x.to(d), w.to(d), None, stride, padding, dilation, groups)
    y = y * scale.to(d).view(1, -1, 1, 1) + shift.to(d).view(1, -1, 1, 1)
    return F.relu(y) if relu else y


def vector_cpu() -> bool:
    """Whether the CPU kernels run their vector paths here (AVX2 or AVX-512, after RESNEXT_KERNELS_CPU_ISA's cap)."""
    import resnext_kernels as rk
    return rk.ops.cpu_config().isa != "baseline"


def cuda_plan(x, wt, stride, padding, dilation, groups=1, training=False):
    """The CUDA planner's (path, reason) for these arguments: "cuda_direct", or "aten" with why not."""
    pair = (lambda v: [v, v] if isinstance(v, int) else list(v))
    r = torch.ops.resnext_kernels._plan_cuda_conv(list(x.shape), list(wt.shape), pair(stride), pair(padding),
                                                  pair(dilation), groups, x.dtype, training)
    return r[0], r[1]


def random_bn(c, dtype=torch.float32, generator=None):
    """Non-trivial BatchNorm parameters: (running_mean, running_var, weight, bias)."""
    g = generator
    mean = torch.randn(c, generator=g, dtype=dtype) * 0.5
    var = torch.rand(c, generator=g, dtype=dtype) + 0.5
    gamma = torch.rand(c, generator=g, dtype=dtype) + 0.5
    beta = torch.randn(c, generator=g, dtype=dtype) * 0.2
    return mean, var, gamma, beta


def rel_err(out, ref):
    """Max absolute error relative to the reference's scale (max |ref|)."""
    if ref.numel() == 0:
        return 0.0
    return ((out.to(torch.float64) - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def assert_dtype_tolerance(err, dtype, low_precision_bound):
    """The suite's accuracy bar: float64 to 1e-12, float32 to 1e-5 (relative to the output scale), and
    float16/bfloat16 within `low_precision_bound` (derived from PyTorch's own same-precision error)."""
    if dtype == torch.float64:
        assert err <= 1e-12, err
    elif dtype == torch.float32:
        assert err <= 1e-5, err
    else:
        assert err <= low_precision_bound, (err, low_precision_bound)

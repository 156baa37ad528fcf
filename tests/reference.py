"""Independent references and tolerances shared by the tests."""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F

# Examples per CPU path of the property tests in this run, by form ("inference", "training"): printed at the end of
# the run (conftest.py) and asserted by test_properties.py.
FUZZ_PATHS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
# Cells (dtype x layout x batch size x form) per path of the path matrix (test_path_matrix.py), by configuration:
# printed at the end of the run.
PATH_MATRIX: dict[str, dict[str, int]] = {}

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


def round_to_tf32(t):
    """t rounded to TF32 as cvt.rna.tf32.f32 rounds (nearest, ties away from zero; 10 mantissa bits): how cuDNN and
    the tensor-core kernels take float32 convolution inputs where TF32 is allowed (PyTorch's default)."""
    bits = t.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


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


def reference_train(x, w, gamma, beta, grad, stride=1, padding=1, dilation=1, groups=1, relu=True, eps=1e-5,
                    dtype=torch.float64):
    """F.conv2d -> F.batch_norm (batch statistics) -> F.relu by autograd in `dtype`, from the op's inputs only:
    float64 gives the reference, the tested dtype gives PyTorch's own error. Returns (output, batch mean, biased
    batch variance, [grad of x, w, gamma, beta]) with None for an absent gamma/beta."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (x, w, gamma, beta)]
    y = F.conv2d(leaves[0], leaves[1], None, stride, padding, dilation, groups)
    out = F.batch_norm(y, None, None, leaves[2], leaves[3], True, 0.0, eps)
    out = F.relu(out) if relu else out
    out.backward(grad.to(dtype))
    yd = y.detach().double()
    return (out.detach(), yd.mean((0, 2, 3)), yd.var((0, 2, 3), unbiased=False),
            [None if t is None else t.grad for t in leaves])


# The suite's accuracy rule, relative to the reference's scale (rel_err) against an independent float64 reference.
# float32: FP32_TOL. Measured fp32 errors of the CPU kernels at the suite's sizes (3x3, up to 128 channels, N 2):
# output 1.2e-7 to 1.4e-6, input gradient 8.6e-8 to 2.0e-6, weight gradient 1.5e-7 to 8.3e-7, BN weight/bias
# gradients under 9e-7, running statistics under 1.3e-6, whole-model logits (every ImageNet constructor, 64x64
# input) 4.8e-7 to 1.0e-6. 1e-5 is 5x the largest, and a bug of 1e-4 relative fails it.
FP32_TOL = 1e-5
# float16/bfloat16: LOW_PRECISION_FACTOR times PyTorch's own error in the same dtype against the same float64
# reference (computed in the test), and never below that factor times one rounding (half an ulp of 1), since
# PyTorch's own error on a vector as short as a BN bias gradient can be a single rounding. Measured in bfloat16:
# PyTorch's own 0.2-1.2% (outputs, ReLU-free gradients), the kernels' 0.15-0.8%, so bounds of 1.2-3.6% that a
# 3% bug exceeds on all but the noisiest outputs.
LOW_PRECISION_FACTOR = 3


def tolerance(dtype, torch_own_err=None, tf32=False, fp32_own_err=None):
    """The bound on rel_err for an output of `dtype`; `torch_own_err` is PyTorch's own same-dtype rel_err against
    the same float64 reference: required for float16/bfloat16 and TF32, optional for float32 (the fuzz passes it:
    with 2-9 values per channel the BN backward cancels most of a gradient, and PyTorch's own float32 error there can
    pass 1e-5). `tf32`: float32 computed by the tensor cores as TF32, held like a 16-bit type with TF32's epsilon.
    `fp32_own_err`: PyTorch's own float32 error, for where its low-precision one is no estimate (below)."""
    if dtype == torch.float64:
        return 1e-12
    if dtype == torch.float32 and not tf32:  # PyTorch's own where given: an ill-conditioned problem may need more
        return FP32_TOL if torch_own_err is None else max(FP32_TOL, LOW_PRECISION_FACTOR * torch_own_err)
    assert torch_own_err is not None, "a low-precision bound needs PyTorch's own same-dtype error"
    eps = 2.0 ** -10 if tf32 else torch.finfo(dtype).eps
    if not torch_own_err <= 0.5:
        # PyTorch's own is no estimate here: NaN or garbage from an ATen bug (test_training.py, the 1-pixel-wide bf16
        # weight gradient), or an ill-conditioned problem (a BN backward that cancels nearly all of a gradient). Its
        # float32 error scaled by the epsilons' ratio tells the two apart (the conditioning shows in float32 too);
        # without it, the rounding of x, w and grad alone.
        torch_own_err = 1.5 * eps
        if fp32_own_err is not None:
            torch_own_err = max(torch_own_err, fp32_own_err * eps / torch.finfo(torch.float32).eps)
    return LOW_PRECISION_FACTOR * max(torch_own_err, eps / 2)


def assert_close_to_reference(out, ref, torch_own=None, what="", dtype=None, fp32_own=None):
    """rel_err(out, ref) within tolerance(dtype of out): `ref` is the float64 reference, `torch_own` PyTorch's
    result in the same low-precision dtype (a tensor, or its rel_err as a float), `fp32_own` PyTorch's float32 one
    (a tensor, or a function returning it: asked for only where the low-precision one is no estimate)."""
    dtype = out.dtype if dtype is None else dtype
    own = torch_own if torch_own is None or isinstance(torch_own, float) else rel_err(torch_own, ref)
    fp32_err = None
    if fp32_own is not None and own is not None and not own <= 0.5:
        fp32_err = rel_err(fp32_own() if callable(fp32_own) else fp32_own, ref)
    err, bound = rel_err(out, ref), tolerance(dtype, own, fp32_own_err=fp32_err)
    assert err <= bound, f"{what}: rel_err {err:.3g} > {bound:.3g} ({dtype}, PyTorch's own {own})"
    return err


def assert_dtype_tolerance(err, dtype, low_precision_bound):
    """float64 and float32 by tolerance(); float16/bfloat16 within `low_precision_bound` (a caller-derived
    multiple of PyTorch's own same-precision error)."""
    bound = tolerance(dtype) if dtype in (torch.float64, torch.float32) else low_precision_bound
    assert err <= bound, (err, bound)

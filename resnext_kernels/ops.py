"""Functional API of resnext_kernels: argument checking, the dispatch decision, fake kernels, autocast.

The fused operation is ``relu?(batch_norm(conv2d(input, weight, stride, padding, dilation, groups)))``
with no convolution bias. Every call goes to one of three paths:

* ``"cpu"``:  the project's C++ kernel (``torch.ops.resnext_kernels.conv_bn_relu_infer`` on CPU),
* ``"cuda"``: the project's CUDA kernel (same op on CUDA tensors),
* ``"aten"``: PyTorch's own ``conv2d -> batch_norm -> relu`` (cuDNN on GPU, oneDNN on CPU) for every case
  the kernels do not cover, or when the reference path is forced.

:func:`explain` returns the path a call takes and why; :func:`force_reference` (or the environment
variable ``RESNEXT_KERNELS_FORCE_ATEN=1``) forces the ATen path for A/B comparisons.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _build_info

__all__ = [
    "Decision",
    "bottleneck_inference",
    "conv_bn_relu",
    "explain",
    "force_reference",
    "fold_batch_norm",
]

FORCE_ATEN_ENV = "RESNEXT_KERNELS_FORCE_ATEN"
_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_force = threading.local()


class CpuConfig(NamedTuple):
    """The CPU as the kernels see it (csrc/cpu/isa.h): the ISA they run (``"avx512"``, ``"avx2"`` or
    ``"baseline"``, capped by ``RESNEXT_KERNELS_CPU_ISA``), the best the CPU has, its vendor, whether it multiplies
    bfloat16 natively, and whether the oneDNN routes are on (``RESNEXT_KERNELS_CPU_ATEN_ROUTES``)."""

    isa: str
    supported_isa: str
    vendor: str
    native_bf16: bool
    aten_routes: bool


@functools.lru_cache(maxsize=None)
def cpu_config() -> CpuConfig:
    return CpuConfig(*torch.ops.resnext_kernels._cpu_config())


cpu_config()  # at import: an unknown RESNEXT_KERNELS_CPU_* value is an error now, not at the first call

IntPair = int | Sequence[int]


@dataclasses.dataclass(frozen=True)
class Decision:
    """Which implementation a call runs (``"cpu"``, ``"cuda"`` or ``"aten"``) and why.

    For the fused paths, :func:`explain` also names the kernel (``kernel``, e.g. ``"winograd_f4x4"``; the profiler
    shows its scope ``resnext_kernels::<kernel>``), its parameters, and where the convolution's gradients come from
    when autograd records the call (``data_grad``, ``weight_grad``, e.g. ``"dgrad_lanes"``, ``"wgrad_aten"``).
    """

    path: str
    reason: str
    kernel: str | None = None
    params: Mapping[str, int] = dataclasses.field(default_factory=dict, hash=False)
    data_grad: str | None = None
    weight_grad: str | None = None

    @property
    def fused(self) -> bool:
        return self.path != "aten"


@contextlib.contextmanager
def force_reference(enabled: bool = True) -> Iterator[None]:
    """Within the block (in this thread), every fused op runs the ATen reference sequence instead."""
    previous = getattr(_force, "enabled", False)
    _force.enabled = enabled
    try:
        yield
    finally:
        _force.enabled = previous


def _reference_forced() -> str | None:
    if getattr(_force, "enabled", False):
        return "forced by resnext_kernels.ops.force_reference()"
    if os.environ.get(FORCE_ATEN_ENV, "0") not in ("", "0"):
        return f"forced by the environment variable {FORCE_ATEN_ENV}"
    return None


# ----------------------------------------------------------------------------------------------------
# Argument checking (Python exceptions that name the argument; the C++ kernels re-check with TORCH_CHECK)
# ----------------------------------------------------------------------------------------------------

def _pair(value: IntPair, name: str, minimum: int) -> tuple[int, int]:
    # Fast path for plain ints and pairs of them (this runs several times per call of the op; the general checks
    # below, with their abstract Sequence test, took about 40 us of a module call's Python time).
    if type(value) is int:
        if value >= minimum:
            return value, value
    elif type(value) in (tuple, list) and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        if value[0] >= minimum and value[1] >= minimum:
            return value[0], value[1]
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, Sequence) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def _check_tensor(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_conv_args(input: Tensor, weight: Tensor, stride: IntPair, padding: IntPair, dilation: IntPair,
                     groups: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    _check_tensor(input, "input")
    _check_tensor(weight, "weight")
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (C_out, C_in/groups, KH, KW), got shape {tuple(weight.shape)}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {input.dtype}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match input dtype {input.dtype}")
    if weight.device != input.device:
        raise ValueError(f"weight is on {weight.device} but input is on {input.device}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    stride_p = _pair(stride, "stride", 1)
    padding_p = _pair(padding, "padding", 0)
    dilation_p = _pair(dilation, "dilation", 1)
    c_in, c_out = input.shape[1], weight.shape[0]
    if c_in % groups:
        raise ValueError(f"input channels ({c_in}) must be divisible by groups ({groups})")
    if c_out % groups:
        raise ValueError(f"weight.shape[0] (output channels, {c_out}) must be divisible by groups ({groups})")
    if weight.shape[1] * groups != c_in:
        raise ValueError(f"weight.shape[1] must be input channels / groups = {c_in // groups}, "
                         f"got weight of shape {tuple(weight.shape)}")
    for dim, (size, k) in enumerate(zip(input.shape[2:], weight.shape[2:])):
        if size + 2 * padding_p[dim] < dilation_p[dim] * (k - 1) + 1:
            raise ValueError(f"input spatial size {tuple(input.shape[2:])} (padded by {padding_p}) is smaller "
                             f"than the dilated kernel {tuple(weight.shape[2:])} (dilation {dilation_p})")
    return stride_p, padding_p, dilation_p


def _check_bn_args(input: Tensor, c_out: int, running_mean: Tensor | None, running_var: Tensor | None,
                   bn_weight: Tensor | None, bn_bias: Tensor | None, training: bool, eps: float) -> None:
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        if t is None:
            continue
        _check_tensor(t, name)
        if t.dim() != 1 or t.shape[0] != c_out:
            raise ValueError(f"{name} must be 1-D with {c_out} elements (the output channels), "
                             f"got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
        if name.startswith("running_") and t.requires_grad:
            raise ValueError(f"{name} must not require grad: BatchNorm's running statistics are buffers, not "
                             "differentiable inputs (PyTorch's batch_norm refuses them too)")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")


# ----------------------------------------------------------------------------------------------------
# The dispatch decision
# ----------------------------------------------------------------------------------------------------

def explain(input: Tensor, weight: Tensor, *, stride: IntPair = 1, padding: IntPair = 1, dilation: IntPair = 1,
            groups: int = 1, training: bool = False, requires_grad: bool | None = None) -> Decision:
    """Tells which path :func:`conv_bn_relu` takes for these arguments, and why.

    ``requires_grad`` defaults to whether autograd would record the call (grad mode on and input or
    weight requiring grad).
    """
    stride, padding, dilation = _check_conv_args(input, weight, stride, padding, dilation, groups)
    return _decide(input, weight, stride, padding, dilation, groups, training, requires_grad, detail=True)


class _Plan(NamedTuple):
    """A planner op's answer (torch.ops.resnext_kernels._plan_conv / _plan_cuda_conv)."""

    path: str
    reason: str
    params: tuple[tuple[str, int], ...]
    data_grad: str
    weight_grad: str
    grads_reason: str


@functools.lru_cache(maxsize=4096)
def _plan_cached(device: str, input_size: tuple[int, ...], weight_size: tuple[int, ...], stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], groups: int, dtype: torch.dtype, training: bool,
                 deterministic: bool) -> _Plan:
    args = (list(input_size), list(weight_size), list(stride), list(padding), list(dilation), groups, dtype)
    if device == "cpu":
        r = torch.ops.resnext_kernels._plan_conv(*args, "training" if training else "inference")
    else:
        r = torch.ops.resnext_kernels._plan_cuda_conv(*args, training)
    return _Plan(r[0], r[1], tuple(zip(r[2], r[3])), r[4], r[5], r[6])


@torch.compiler.assume_constant_result
def _plan(device: str, input_size: tuple[int, ...], weight_size: tuple[int, ...], stride: tuple[int, int],
          padding: tuple[int, int], dilation: tuple[int, int], groups: int, dtype: torch.dtype,
          training: bool) -> _Plan:
    """The C++ planner's plan (cached per arguments); under torch.compile a constant of the trace."""
    return _plan_cached(device, input_size, weight_size, stride, padding, dilation, groups, dtype, training,
                        torch.are_deterministic_algorithms_enabled())


def _plan_sizes(input: Tensor, weight: Tensor, exact: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The sizes to plan with. Under torch.compile the weight's are specialized (a layer's weight does not change
    shape), and the input's too where ``exact``; otherwise the batch and image sizes are left unknown (-1), which
    the CUDA planner treats as the smallest valid ones: its size-dependent limits (2^31 output tiles) are beyond any
    GPU's memory, and the launcher still checks them."""
    if not torch.compiler.is_compiling():
        return tuple(input.shape), tuple(weight.shape)
    from torch.fx.experimental.symbolic_shapes import guard_scalar
    weight_size = tuple(guard_scalar(s) for s in weight.shape)
    if exact:
        return tuple(guard_scalar(s) for s in input.shape), weight_size
    return (-1, guard_scalar(input.shape[1]), -1, -1), weight_size


def _device_plan(input: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int], groups: int, training: bool, exact: bool) -> _Plan:
    input_size, weight_size = _plan_sizes(input, weight, exact)
    return _plan(input.device.type, input_size, weight_size, stride, padding, dilation, groups, input.dtype, training)


def _decide(input: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int],
            dilation: tuple[int, int], groups: int, training: bool, requires_grad: bool | None,
            detail: bool) -> Decision:
    """:func:`explain` for checked arguments; without ``detail`` only the path and the reason's first part (what the
    op itself needs: on CPU no planner call, on CUDA the planner's coverage rule)."""
    forced = _reference_forced()
    if forced:
        return Decision("aten", forced)
    device = input.device.type
    plan = None
    if device == "cpu":
        if input.dtype not in _CPU_DTYPES:
            return Decision("aten", f"the CPU kernels cover float32, float64 and bfloat16, not {input.dtype}")
    elif device == "cuda":
        if not _build_info.WITH_CUDA:
            return Decision("aten", "resnext_kernels was built without CUDA kernels "
                                    "(see `python -m resnext_kernels.info`)")
        if input.dtype not in _CUDA_DTYPES:
            return Decision("aten", f"the CUDA kernels cover float16, bfloat16, float32 and float64, "
                                    f"not {input.dtype}")
        plan = _device_plan(input, weight, stride, padding, dilation, groups, training, exact=detail)
        if plan.path == "aten":
            return Decision("aten", f"the CUDA kernel does not cover this convolution: {plan.reason}")
    else:
        return Decision("aten", f"no fused kernel for device type {device!r}")
    if training:
        pixels = input.shape[0] * _out_hw(input, weight, stride, padding, dilation)
        if pixels <= 1:
            return Decision("aten", f"batch statistics need more than 1 value per channel, got {pixels}; "
                                    "PyTorch's batch_norm handles (and reports) it")
        reason = "fused kernels, training form (batch statistics, fused BN+ReLU backward)"
    else:
        if requires_grad is None:
            requires_grad = torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad)
        reason = "fused kernel, inference form (BN folded into the conv epilogue)"
        if requires_grad:
            reason += (" with autograd: backward through the ReLU mask and the folded BN scale, conv gradients from "
                       "ATen")
    if not detail:
        return Decision(device, reason)
    plan = plan or _device_plan(input, weight, stride, padding, dilation, groups, training, exact=True)
    reason += f"; {plan.path}: {plan.reason}"
    if training:
        data_grad, weight_grad = plan.data_grad, plan.weight_grad
        reason += f"; {plan.grads_reason}"
    elif requires_grad:
        data_grad, weight_grad = "dgrad_aten", "wgrad_aten"  # _infer_backward
    else:
        data_grad = weight_grad = None
    return Decision(device, reason, plan.path, dict(plan.params), data_grad, weight_grad)


def _out_hw(input: Tensor, weight: Tensor, stride: IntPair, padding: IntPair, dilation: IntPair) -> int:
    s, p, d = _pair(stride, "stride", 1), _pair(padding, "padding", 0), _pair(dilation, "dilation", 1)
    oh = _conv_out_size(input.shape[2], weight.shape[2], s[0], p[0], d[0])
    ow = _conv_out_size(input.shape[3], weight.shape[3], s[1], p[1], d[1])
    return oh * ow


# ----------------------------------------------------------------------------------------------------
# The functional op
# ----------------------------------------------------------------------------------------------------

def fold_batch_norm(running_mean: Tensor, running_var: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
                    eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) with ``bn(y) == y * scale + shift`` in inference form, in ``dtype``."""
    inv_std = torch.rsqrt(running_var.to(dtype) + eps)
    scale = inv_std if bn_weight is None else bn_weight.to(dtype) * inv_std
    shift = -running_mean.to(dtype) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(dtype)
    return scale.contiguous(), shift.contiguous()


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast_tensors(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Casts like autocast casts F.conv2d (a lower-precision op): each floating-point, non-double tensor on
    the autocast device (that of the first tensor) goes to the autocast dtype; others (float64, integer,
    other devices) are left for the argument checks to judge."""
    device = tensors[0].device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 and t.device.type == device
                 else t for t in tensors)


def _autocast(input: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Autocast of a layer's (input, weight). Runs before the argument checks, as autocast runs before
    conv2d's: under autocast a layer's input may already be lower precision than its weight."""
    _check_tensor(input, "input")
    _check_tensor(weight, "weight")
    return _autocast_tensors(input, weight)


def conv_bn_relu(input: Tensor, weight: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                 bn_weight: Tensor | None = None, bn_bias: Tensor | None = None, *, training: bool = False,
                 momentum: float = 0.1, eps: float = 1e-5, stride: IntPair = 1, padding: IntPair = 1,
                 dilation: IntPair = 1, groups: int = 1, relu: bool = True) -> Tensor:
    """``relu(batch_norm(conv2d(input, weight, None, stride, padding, dilation, groups), ...))`` fused.

    BatchNorm arguments follow :func:`torch.nn.functional.batch_norm` (``running_mean``,
    ``running_var``, ``bn_weight``, ``bn_bias``, ``training``, ``momentum``, ``eps``): in training mode
    the batch statistics are used and the running buffers updated in place, exactly as there. ``relu``
    switches the final ReLU. Which implementation runs is described by :func:`explain`.
    """
    x, w = _autocast(input, weight)
    stride_p, padding_p, dilation_p = _check_conv_args(x, w, stride, padding, dilation, groups)
    _check_bn_args(x, w.shape[0], running_mean, running_var, bn_weight, bn_bias, training, eps)
    decision = _decide(x, w, stride_p, padding_p, dilation_p, groups, training, None, detail=False)
    if not decision.fused:
        y = F.conv2d(x, w, None, stride_p, padding_p, dilation_p, groups)
        y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
        return F.relu(y) if relu else y
    args = (list(stride_p), list(padding_p), list(dilation_p), groups, relu)
    if training:
        out, _, mean, var = torch.ops.resnext_kernels.conv_bn_relu_train(x, w, bn_weight, bn_bias, float(eps), *args)
        if running_mean is not None:
            _update_running_stats(running_mean, running_var, mean, var, momentum,
                                  x.shape[0] * _out_hw(x, w, stride_p, padding_p, dilation_p))
        return out
    scale, shift = fold_batch_norm(running_mean, running_var, bn_weight, bn_bias, eps,
                                   _accumulation_dtype(x.dtype))
    return torch.ops.resnext_kernels.conv_bn_relu_infer(x, w, scale, shift, *args)


def _update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, momentum: float,
                          count: int) -> None:
    """The running-statistics update of nn.BatchNorm2d: exponential average with ``momentum`` of the batch
    mean and of the unbiased batch variance."""
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        running_mean.copy_(momentum * mean + (1 - momentum) * running_mean)
        running_var.copy_(momentum * unbiased + (1 - momentum) * running_var)


# ----------------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes, dtypes and memory formats for torch.compile and opcheck
# ----------------------------------------------------------------------------------------------------

def _conv_out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _suggest_memory_format(t: Tensor) -> torch.memory_format:
    from torch._prims_common import suggest_memory_format
    return suggest_memory_format(t)


def _conv_output_memory_format(*tensors: Tensor) -> torch.memory_format:
    """F.conv2d's rule (csrc/common/conv_checks.h): channels_last if the input or a weight suggests it."""
    if any(_suggest_memory_format(t) == torch.channels_last for t in tensors):
        return torch.channels_last
    return torch.contiguous_format


@torch.library.register_fake("resnext_kernels::conv_bn_relu_infer")
def _conv_bn_relu_infer_fake(input, weight, scale, shift, stride, padding, dilation, groups, relu):
    torch._check(input.dim() == 4 and weight.dim() == 4, lambda: "input and weight must be 4-D")
    torch._check(weight.shape[1] * groups == input.shape[1], lambda: "weight.shape[1] * groups != C_in")
    n, _, h, w = input.shape
    oh = _conv_out_size(h, weight.shape[2], stride[0], padding[0], dilation[0])
    ow = _conv_out_size(w, weight.shape[3], stride[1], padding[1], dilation[1])
    return input.new_empty((n, weight.shape[0], oh, ow)).contiguous(
        memory_format=_conv_output_memory_format(input, weight))


def _acc_dtype_of(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.register_fake("resnext_kernels::conv_bn_relu_train")
def _conv_bn_relu_train_fake(input, weight, bn_weight, bn_bias, eps, stride, padding, dilation, groups, relu):
    out = _conv_bn_relu_infer_fake(input, weight, None, None, stride, padding, dilation, groups, relu)
    conv_out = torch.empty_like(out, memory_format=torch.channels_last)
    acc = _acc_dtype_of(input)
    return out, conv_out, input.new_empty((weight.shape[0],), dtype=acc), input.new_empty((weight.shape[0],), dtype=acc)


@torch.library.register_fake("resnext_kernels::conv_bn_relu_train_backward")
def _conv_bn_relu_train_backward_fake(grad_out, input, weight, conv_out, mean, var, bn_weight, bn_bias, eps, stride,
                                      padding, dilation, groups, relu, output_mask):
    acc = _acc_dtype_of(input)
    c_out = weight.shape[0]
    grad_input = (torch.empty_like(input, memory_format=_suggest_memory_format(input)) if output_mask[0]
                  else input.new_empty((0,)))
    grad_weight = (torch.empty_like(weight, memory_format=_suggest_memory_format(weight)) if output_mask[1]
                   else weight.new_empty((0,)))
    n = c_out if output_mask[2] else 0
    return grad_input, grad_weight, input.new_empty((n,), dtype=acc), input.new_empty((n,), dtype=acc)


# ----------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------

def _train_setup_context(ctx, inputs, output):
    input, weight, bn_weight, bn_bias, eps, stride, padding, dilation, groups, relu = inputs
    _, conv_out, mean, var = output
    ctx.save_for_backward(input, weight, conv_out, mean, var, bn_weight, bn_bias)
    ctx.conv_bn_args = (eps, stride, padding, dilation, groups, relu)
    ctx.mark_non_differentiable(conv_out, mean, var)
    # No zero-filled gradients for the non-differentiable outputs: conv_out's was a full activation-sized fill per
    # layer and step (about 4% of a ResNeXt-50 training step's CPU time).
    ctx.set_materialize_grads(False)


def _train_backward(ctx, grad_out, _grad_conv_out, _grad_mean, _grad_var):
    input, weight, conv_out, mean, var, bn_weight, bn_bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad_out is None:  # the output itself was not used in the loss
        return (None,) * 10
    mask = [need[0], need[1], need[2] or need[3]]
    grad_input, grad_weight, grad_gamma, grad_beta = torch.ops.resnext_kernels.conv_bn_relu_train_backward(
        grad_out, input, weight, conv_out, mean, var, bn_weight, bn_bias, *ctx.conv_bn_args, mask)
    return (grad_input if need[0] else None,
            grad_weight if need[1] else None,
            grad_gamma.to(bn_weight.dtype) if need[2] else None,
            grad_beta.to(bn_bias.dtype) if need[3] else None,
            None, None, None, None, None, None)


torch.library.register_autograd("resnext_kernels::conv_bn_relu_train", _train_backward,
                                setup_context=_train_setup_context)


def _infer_setup_context(ctx, inputs, output):
    input, weight, scale, shift, stride, padding, dilation, groups, relu = inputs
    # The output carries the ReLU mask (out > 0 exactly where the pre-activation was > 0; NaN excluded, as in
    # torch.relu's backward). The conv output is needed only for the scale gradient and is then recomputed
    # rather than kept alive.
    ctx.save_for_backward(input, weight, scale, output if relu else None)
    ctx.conv_args = (stride, padding, dilation, groups, relu)


@contextlib.contextmanager
def _grad_scopes(data: bool, weight: bool) -> Iterator[None]:
    """The profiler scopes of the gradient sources explain() names (dgrad_aten, wgrad_aten), while a profiler
    records (the C++ backward opens the same)."""
    if not torch.autograd._profiler_enabled():
        yield
        return
    with contextlib.ExitStack() as stack:
        for name, on in (("resnext_kernels::dgrad_aten", data), ("resnext_kernels::wgrad_aten", weight)):
            if on:
                stack.enter_context(torch.autograd.profiler.record_function(name))
        yield


def _infer_backward(ctx, grad_out):
    """Eval-form backward (frozen statistics, e.g. fine-tuning with BatchNorm in eval mode):
    out = relu(conv(x, w) * scale + shift), so with g = grad_out masked by the ReLU,
    d shift = sum g, d scale = sum g * conv, and (dx, dw) = the conv backward of g * scale."""
    input, weight, scale, output = ctx.saved_tensors
    stride, padding, dilation, groups, relu = ctx.conv_args
    need = ctx.needs_input_grad
    g = torch.where(output > 0, grad_out, torch.zeros_like(grad_out)) if relu else grad_out
    grad_input = grad_weight = grad_scale = grad_shift = None
    if need[0] or need[1]:
        grad_conv = (g.to(scale.dtype) * scale.view(1, -1, 1, 1)).to(input.dtype)
        with _grad_scopes(need[0], need[1]):
            grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad_conv, input, weight, None, stride, padding, dilation, False, [0, 0], groups,
                [need[0], need[1], False])
    if need[2]:
        conv = F.conv2d(input, weight, None, stride, padding, dilation, groups)
        grad_scale = (g.to(scale.dtype) * conv.to(scale.dtype)).sum((0, 2, 3))
    if need[3]:
        grad_shift = g.to(scale.dtype).sum((0, 2, 3))
    return grad_input, grad_weight, grad_scale, grad_shift, None, None, None, None, None


torch.library.register_autograd("resnext_kernels::conv_bn_relu_infer", _infer_backward,
                                setup_context=_infer_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("resnext_kernels::conv_bn_relu_train_backward: double backward (gradients of gradients) "
                       "of the fused conv+BN+ReLU is not supported; for higher-order gradients run the ATen path "
                       "(resnext_kernels.ops.force_reference())")


torch.library.register_autograd("resnext_kernels::conv_bn_relu_train_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


# ----------------------------------------------------------------------------------------------------
# The whole aggregated bottleneck in inference form
# ----------------------------------------------------------------------------------------------------

def bottleneck_inference(input: Tensor, convs_bns: Sequence[tuple[Tensor, Tensor, Tensor, Tensor | None,
                                                                  Tensor | None, float]],
                         downsample: tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, float] | None,
                         *, stride: int, groups: int, dilation: int) -> Tensor:
    """One call of ``bottleneck_infer``: ``convs_bns`` holds (conv weight, running_mean, running_var, bn weight,
    bn bias, eps) for conv1, conv2, conv3; ``downsample`` the same for the projection shortcut, or None.
    Autocast casts the input and the conv weights like it casts conv2d."""
    args = bottleneck_infer_args(input, convs_bns, downsample, stride=stride, groups=groups, dilation=dilation)
    return torch.ops.resnext_kernels.bottleneck_infer(*args)


def bottleneck_infer_args(input: Tensor, convs_bns, downsample, *, stride: int, groups: int,
                          dilation: int) -> tuple:
    """The arguments of the raw ``bottleneck_infer`` op for :func:`bottleneck_inference`'s arguments: autocast
    applied, every BatchNorm folded into (scale, shift) in the accumulation dtype."""
    weights = [c[0] for c in convs_bns] + ([downsample[0]] if downsample is not None else [])
    x, *weights = _autocast_tensors(input, *weights)
    acc = _accumulation_dtype(x.dtype)
    folded = []
    for w, (_, mean, var, gamma, beta, eps) in zip(weights, list(convs_bns) + ([downsample] if downsample else [])):
        folded.append((w, *fold_batch_norm(mean, var, gamma, beta, eps, acc)))
    down = folded[3] if downsample is not None else (None, None, None)
    return (x, *folded[0], *folded[1], *folded[2], *down, stride, groups, dilation)


@torch.library.register_fake("resnext_kernels::bottleneck_infer")
def _bottleneck_infer_fake(input, w1, s1, b1, w2, s2, b2, w3, s3, b3, w_down, s_down, b_down, stride, groups,
                           dilation):
    n, _, h, w = input.shape
    oh = _conv_out_size(h, w2.shape[2], stride, dilation, dilation)
    ow = _conv_out_size(w, w2.shape[3], stride, dilation, dilation)
    weights = [w1, w2, w3] + ([w_down] if w_down is not None else [])
    return input.new_empty((n, w3.shape[0], oh, ow)).contiguous(
        memory_format=_conv_output_memory_format(input, *weights))

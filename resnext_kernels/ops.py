"""Functional API of resnext_kernels: the fused op, its argument checks, and :func:`explain`.

The fused operation is ``relu?(batch_norm(conv2d(input, weight, stride, padding, dilation, groups)))``
with no convolution bias. Every call goes to one of three paths:

* ``"cpu"``:  the project's C++ kernels (``torch.ops.resnext_kernels.conv_bn_relu_infer`` on CPU),
* ``"cuda"``: the project's CUDA kernel (same op on CUDA tensors),
* ``"aten"``: PyTorch's own ``conv2d -> batch_norm -> relu`` (cuDNN on GPU, oneDNN on CPU) for every case
  the kernels do not cover, or when the reference path is forced.

:func:`explain` returns the path a call takes, which kernel runs and why; :func:`force_reference` (or the
environment variable ``RESNEXT_KERNELS_FORCE_ATEN=1``) forces the ATen path for A/B comparisons.

The pieces: the dispatch decision (``_dispatch``, asking the C++ planners), fake kernels (``_fake``), autograd
formulas (``_autograd``), the bottleneck (``_bottleneck``), shared helpers (``_common``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _autograd  # noqa: F401  (registers the autograd formulas)
from . import _cpu_backend
from ._bottleneck import bottleneck_infer_args, bottleneck_inference
from ._common import accumulation_dtype, autocast_tensors, fold_batch_norm, out_pixels
from ._dispatch import (FORCE_ATEN_ENV, CpuConfig, Decision, cpu_config, decide, force_reference,  # noqa: F401
                        op_namespace)
from ._fake import (_bottleneck_infer_fake, _conv_bn_relu_infer_fake,  # noqa: F401  (resnext_kernels.emulator)
                    _conv_bn_relu_train_backward_fake, _conv_bn_relu_train_fake)

__all__ = [
    "CpuConfig",
    "Decision",
    "bottleneck_infer_args",
    "bottleneck_inference",
    "conv_bn_relu",
    "cpu_config",
    "explain",
    "force_reference",
    "fold_batch_norm",
]

IntPair = int | Sequence[int]


# ----------------------------------------------------------------------------------------------------
# Argument checking (Python exceptions that name the argument; the C++ kernels re-check with TORCH_CHECK)
# ----------------------------------------------------------------------------------------------------

def _pair(value: IntPair, name: str, minimum: int) -> tuple[int, int]:
    # Fast path for plain ints and pairs of them: this runs several times per call of the op, and the general checks
    # below, with their abstract Sequence test, are slow.
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


def explain(input: Tensor, weight: Tensor, *, stride: IntPair = 1, padding: IntPair = 1, dilation: IntPair = 1,
            groups: int = 1, training: bool = False, requires_grad: bool | None = None, relu: bool = True) -> Decision:
    """Tells which path :func:`conv_bn_relu` takes for these arguments, and why.

    ``requires_grad`` defaults to whether autograd would record the call (grad mode on and input or
    weight requiring grad).
    """
    stride, padding, dilation = _check_conv_args(input, weight, stride, padding, dilation, groups)
    return decide(input, weight, stride, padding, dilation, groups, training, requires_grad, detail=True, relu=relu)


def _autocast(input: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Autocast of a layer's (input, weight). Runs before the argument checks, as autocast runs before
    conv2d's: under autocast a layer's input may already be lower precision than its weight."""
    _check_tensor(input, "input")
    _check_tensor(weight, "weight")
    return autocast_tensors(input, weight)


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
    decision = decide(x, w, stride_p, padding_p, dilation_p, groups, training, None, detail=False)
    conv = (stride_p, padding_p, dilation_p, groups)
    if not decision.fused:
        return aten_conv_bn_relu(x, w, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, conv,
                                  relu)
    args = (list(stride_p), list(padding_p), list(dilation_p), groups, relu)
    ops = op_namespace(x)
    if training:
        if decision.path == "cpu" and _cpu_chooses_aten(x, w, bn_weight, bn_bias, True, eps, conv, relu, args, None):
            with _cpu_backend.scope():
                return aten_conv_bn_relu(x, w, running_mean, running_var, bn_weight, bn_bias, True, momentum, eps,
                                          conv, relu)
        out, _, mean, var = ops.conv_bn_relu_train(x, w, bn_weight, bn_bias, float(eps), *args)
        if running_mean is not None:
            _update_running_stats(running_mean, running_var, mean, var, momentum,
                                  x.shape[0] * out_pixels(x, w, stride_p, padding_p, dilation_p))
        return out
    if decision.path == "cpu" and _cpu_chooses_aten(x, w, bn_weight, bn_bias, False, eps, conv, relu, args,
                                                    (running_mean, running_var)):
        with _cpu_backend.scope():
            return aten_conv_bn_relu(x, w, running_mean, running_var, bn_weight, bn_bias, False, momentum, eps,
                                      conv, relu)
    scale, shift = fold_batch_norm(running_mean, running_var, bn_weight, bn_bias, eps, accumulation_dtype(x.dtype))
    return ops.conv_bn_relu_infer(x, w, scale, shift, *args)


def cpu_route_is_aten(input: Tensor, weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None, *,
                      stride: IntPair, padding: IntPair, dilation: IntPair, groups: int, training: bool,
                      relu: bool) -> bool | None:
    """Whether conv_bn_relu with these arguments runs ATen's sequence because the CPU run-time choice measured it
    faster (None while that is not decided: not timed yet, a path other than the CPU kernels, or invalid arguments)."""
    try:
        x, w = _autocast(input, weight)
        conv = _check_conv_args(x, w, stride, padding, dilation, groups)
    except (TypeError, ValueError):
        return None
    if decide(x, w, *conv, groups, training, None, detail=False).path != "cpu":
        return None
    need_grad = any(_grads_needed((x, w, bn_weight, bn_bias)))
    backend = _cpu_backend.lookup(_cpu_backend.problem_key(training, x, w, *conv, groups, relu, need_grad)).backend
    return None if backend is None else backend == _cpu_backend.ATEN


def aten_conv_bn_relu(x: Tensor, w: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                       bn_weight: Tensor | None, bn_bias: Tensor | None, training: bool, momentum: float, eps: float,
                       conv: tuple, relu: bool) -> Tensor:
    """PyTorch's own conv2d -> batch_norm -> relu (the relu in place on batch_norm's fresh output, as torchvision's
    blocks run it)."""
    y = F.conv2d(x, w, None, *conv)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return F.relu(y, inplace=True) if relu else y


def _grads_needed(params: tuple) -> tuple[bool, ...]:
    """Which of (input, weight, bn_weight, bn_bias) autograd will want a gradient for: part of the choice's problem."""
    grad_mode = torch.is_grad_enabled()
    return tuple(grad_mode and t is not None and t.requires_grad for t in params)


def _cpu_chooses_aten(x: Tensor, w: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None, training: bool,
                      eps: float, conv: tuple, relu: bool, args: tuple, running: tuple | None) -> bool:
    """Whether the CPU run-time choice (_cpu_backend) sends this problem to ATen. The candidates it times run on
    detached views of the arguments (nothing the caller holds is updated): in training the forward with batch
    statistics and, where autograd will need them, the gradients."""
    params = (x, w, bn_weight, bn_bias)
    grads = _grads_needed(params)
    key = _cpu_backend.problem_key(training, x, w, *conv, relu, any(grads))
    candidates = _cpu_candidates(params, grads, eps, conv, relu, args, running)
    return _cpu_backend.choose(key, *candidates) == _cpu_backend.ATEN


def _cpu_candidates(params: tuple, grads: tuple, eps: float, conv: tuple, relu: bool, args: tuple,
                    running: tuple | None) -> tuple:
    """(ours, aten): closures that run one call of each candidate for the timing; ``running``: the running
    (mean, var) of the inference form, None in training."""
    grad_out = []

    def run(forward):
        inputs = [None if t is None else t.detach().requires_grad_(g) for t, g in zip(params, grads)]
        out = forward(*inputs)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        if wanted:
            if not grad_out:  # any values do for timing; the RNG is left alone
                grad_out.append(out.detach().clone())
            torch.autograd.grad(out, wanted, grad_out[0])

    if running is None:
        def ours(x, w, g, b):
            return torch.ops.resnext_kernels.conv_bn_relu_train(x, w, g, b, float(eps), *args)[0]

        def aten(x, w, g, b):
            return aten_conv_bn_relu(x, w, None, None, g, b, True, 0.0, eps, conv, relu)
    else:
        def ours(x, w, g, b):
            scale, shift = fold_batch_norm(*running, g, b, eps, accumulation_dtype(x.dtype))
            return torch.ops.resnext_kernels.conv_bn_relu_infer(x, w, scale, shift, *args)

        def aten(x, w, g, b):
            return aten_conv_bn_relu(x, w, *running, g, b, False, 0.0, eps, conv, relu)
    return (lambda: run(ours)), (lambda: run(aten))


def _update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, momentum: float,
                          count: int) -> None:
    """The running-statistics update of nn.BatchNorm2d: exponential average with ``momentum`` of the batch
    mean and of the unbiased batch variance."""
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        running_mean.copy_(momentum * mean + (1 - momentum) * running_mean)
        running_var.copy_(momentum * unbiased + (1 - momentum) * running_var)

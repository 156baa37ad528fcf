"""Autograd formulas of the ops: the training form's backward op, the inference form's backward through ATen, and no
double backward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def _train_setup_context(ctx, inputs, output):
    input, weight, bn_weight, bn_bias, eps, stride, padding, dilation, groups, relu = inputs
    _, conv_out, mean, var = output
    ctx.save_for_backward(input, weight, conv_out, mean, var, bn_weight, bn_bias)
    ctx.conv_bn_args = (eps, stride, padding, dilation, groups, relu)
    ctx.mark_non_differentiable(conv_out, mean, var)
    # No zero-filled gradients for the non-differentiable outputs: conv_out's would be a full activation-sized fill per
    # layer and step.
    ctx.set_materialize_grads(False)


def _train_backward_of(namespace: str):
    """The training form's backward, through ``namespace``'s backward op (the real one or the emulated one)."""
    def backward(ctx, grad_out, _grad_conv_out, _grad_mean, _grad_var):
        input, weight, conv_out, mean, var, bn_weight, bn_bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        if grad_out is None:  # the output itself was not used in the loss
            return (None,) * 10
        mask = [need[0], need[1], need[2] or need[3]]
        grad_input, grad_weight, grad_gamma, grad_beta = getattr(torch.ops, namespace).conv_bn_relu_train_backward(
            grad_out, input, weight, conv_out, mean, var, bn_weight, bn_bias, *ctx.conv_bn_args, mask)
        return (grad_input if need[0] else None,
                grad_weight if need[1] else None,
                grad_gamma.to(bn_weight.dtype) if need[2] else None,
                grad_beta.to(bn_bias.dtype) if need[3] else None,
                None, None, None, None, None, None)
    return backward


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


def _no_double_backward(ctx, *grads):
    raise RuntimeError("resnext_kernels::conv_bn_relu_train_backward: double backward (gradients of gradients) "
                       "of the fused conv+BN+ReLU is not supported; for higher-order gradients run the ATen path "
                       "(resnext_kernels.ops.force_reference())")


def register(namespace: str) -> None:
    """Registers the autograd formulas of ``namespace``'s ops (resnext_kernels, or the emulated resnext_kernels_emu
    when resnext_kernels.emulator.cuda_on_cpu() first needs them)."""
    torch.library.register_autograd(f"{namespace}::conv_bn_relu_train", _train_backward_of(namespace),
                                    setup_context=_train_setup_context)
    torch.library.register_autograd(f"{namespace}::conv_bn_relu_infer", _infer_backward,
                                    setup_context=_infer_setup_context)
    torch.library.register_autograd(f"{namespace}::conv_bn_relu_train_backward", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


register("resnext_kernels")

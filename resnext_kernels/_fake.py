"""Fake (meta) kernels of the ops: output shapes, dtypes and memory formats, for torch.compile and opcheck."""

from __future__ import annotations

import torch

from ._common import accumulation_dtype, conv_out_size, conv_output_memory_format, suggest_memory_format


@torch.library.register_fake("resnext_kernels::conv_bn_relu_infer")
def _conv_bn_relu_infer_fake(input, weight, scale, shift, stride, padding, dilation, groups, relu):
    torch._check(input.dim() == 4 and weight.dim() == 4, lambda: "input and weight must be 4-D")
    torch._check(weight.shape[1] * groups == input.shape[1], lambda: "weight.shape[1] * groups != C_in")
    n, _, h, w = input.shape
    oh = conv_out_size(h, weight.shape[2], stride[0], padding[0], dilation[0])
    ow = conv_out_size(w, weight.shape[3], stride[1], padding[1], dilation[1])
    return input.new_empty((n, weight.shape[0], oh, ow)).contiguous(
        memory_format=conv_output_memory_format(input, weight))


@torch.library.register_fake("resnext_kernels::conv_bn_relu_train")
def _conv_bn_relu_train_fake(input, weight, bn_weight, bn_bias, eps, stride, padding, dilation, groups, relu):
    out = _conv_bn_relu_infer_fake(input, weight, None, None, stride, padding, dilation, groups, relu)
    conv_out = torch.empty_like(out, memory_format=torch.channels_last)
    acc = accumulation_dtype(input.dtype)
    return out, conv_out, input.new_empty((weight.shape[0],), dtype=acc), input.new_empty((weight.shape[0],), dtype=acc)


@torch.library.register_fake("resnext_kernels::conv_bn_relu_train_backward")
def _conv_bn_relu_train_backward_fake(grad_out, input, weight, conv_out, mean, var, bn_weight, bn_bias, eps, stride,
                                      padding, dilation, groups, relu, output_mask):
    acc = accumulation_dtype(input.dtype)
    c_out = weight.shape[0]
    grad_input = (torch.empty_like(input, memory_format=suggest_memory_format(input)) if output_mask[0]
                  else input.new_empty((0,)))
    grad_weight = (torch.empty_like(weight, memory_format=suggest_memory_format(weight)) if output_mask[1]
                   else weight.new_empty((0,)))
    n = c_out if output_mask[2] else 0
    return grad_input, grad_weight, input.new_empty((n,), dtype=acc), input.new_empty((n,), dtype=acc)


@torch.library.register_fake("resnext_kernels::bottleneck_infer")
def _bottleneck_infer_fake(input, w1, s1, b1, w2, s2, b2, w3, s3, b3, w_down, s_down, b_down, stride, groups,
                           dilation):
    n, _, h, w = input.shape
    oh = conv_out_size(h, w2.shape[2], stride, dilation, dilation)
    ow = conv_out_size(w, w2.shape[3], stride, dilation, dilation)
    weights = [w1, w2, w3] + ([w_down] if w_down is not None else [])
    return input.new_empty((n, w3.shape[0], oh, ow)).contiguous(
        memory_format=conv_output_memory_format(input, *weights))

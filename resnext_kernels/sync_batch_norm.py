"""Synchronized BatchNorm for the fused conv -> BN (-> ReLU): batch statistics over all ranks of a process group.

A fused module whose BatchNorm is an ``nn.SyncBatchNorm`` (what ``nn.SyncBatchNorm.convert_sync_batchnorm``
or :func:`resnext_kernels.nn.convert_sync_batchnorm` puts there) runs :func:`sync_conv_bn_relu` in training
mode when ``torch.distributed`` is initialized and the BatchNorm's group has more than one rank; otherwise it
runs the ordinary fused op. Unlike ``nn.SyncBatchNorm.forward``, this path also runs on CPU (gloo).

Forward: the convolution (the fused kernel with an identity BatchNorm, or ATen where :func:`ops.explain` says
so), per-channel local (count, mean, M2) in float32 (float64 for float64 input) in two passes,
**one** ``all_gather`` of the packed statistics, Chan's parallel merge in rank order (every rank gets bitwise
the same mean and variance), normalize + affine + ReLU, and the running statistics updated as
``nn.BatchNorm2d`` does with the global count (unbiased variance).

Backward: the ReLU mask, the two per-channel sums ``sum(dy)`` and ``sum(dy * xhat)`` all-reduced in **one**
collective (as ``nn.SyncBatchNorm`` does), the BatchNorm input gradient with the global count, then the
convolution's data and weight gradients from ``aten.convolution_backward``. The gamma/beta gradients are the
local sums, so DistributedDataParallel's gradient averaging gives the gradient of the mean of the ranks'
losses. Ranks with an empty local batch still join both collectives (count 0).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import _dispatch, ops
from ._common import accumulation_dtype

__all__ = ["sync_conv_bn_relu", "sync_group"]


def sync_group(bn: nn.Module):
    """The process group whose ranks share ``bn``'s batch statistics, or None when no synchronization happens
    (not an ``nn.SyncBatchNorm``, eval mode, ``torch.distributed`` unavailable or uninitialized, or a group of
    one rank)."""
    if not (isinstance(bn, nn.SyncBatchNorm) and bn.training and dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _conv(input: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    """The bias-free convolution: the fused kernel with scale 1 / shift 0 where it covers the call."""
    if input.shape[0] > 0:
        decision = _dispatch.decide(input, weight, stride, padding, dilation, groups, training=False,
                                    requires_grad=False, detail=False)
        if decision.fused:
            acc = accumulation_dtype(input.dtype)
            c_out = weight.shape[0]
            ones = torch.ones(c_out, dtype=acc, device=input.device)
            zeros = torch.zeros(c_out, dtype=acc, device=input.device)
            return torch.ops.resnext_kernels.conv_bn_relu_infer(input, weight, ones, zeros, list(stride),
                                                                list(padding), list(dilation), groups, False)
    return F.conv2d(input, weight, None, stride, padding, dilation, groups)


def _all_gather(packed: Tensor, group) -> Tensor:
    """(world, *packed.shape): every rank's ``packed`` in rank order, one collective."""
    world = dist.get_world_size(group)
    # all_gather_single: the newer name of all_gather_into_tensor; gloo wants the output flat (world * n)
    out = packed.new_empty(world * packed.numel())
    dist.all_gather_single(out, packed, group=group)
    return out.view(world, *packed.shape)


def _merge(gathered: Tensor, c: int) -> tuple[float, Tensor, Tensor]:
    """Chan et al.'s pairwise merge of the per-rank rows (count, mean[c], M2[c]) in rank order, in float64;
    the same arithmetic in the same order on every rank, so every rank gets bitwise the same result."""
    gathered = gathered.to(torch.float64)
    count = 0.0
    mean = torch.zeros(c, dtype=torch.float64, device=gathered.device)
    m2 = torch.zeros_like(mean)
    for n_b, row in zip(gathered[:, 0].tolist(), gathered.unbind(0)):
        if n_b == 0:
            continue
        n_ab = count + n_b
        delta = row[1:1 + c] - mean
        mean = mean + delta * (n_b / n_ab)
        m2 = m2 + row[1 + c:] + delta * delta * (count * n_b / n_ab)
        count = n_ab
    return count, mean, m2


class SyncConvBNReLU(torch.autograd.Function):
    """relu?(batch_norm(conv2d(input, weight))) with batch statistics over every rank of ``group``."""

    @staticmethod
    def forward(ctx, input, weight, bn_weight, bn_bias, running_mean, running_var, momentum, eps, stride, padding,
                dilation, groups, relu, group):
        acc = accumulation_dtype(input.dtype)
        y = _conv(input, weight, stride, padding, dilation, groups)
        c = y.shape[1]
        local_count = y.shape[0] * y.shape[2] * y.shape[3]
        yf = y.to(acc)
        if local_count > 0:  # two passes (mean, then sum of squared deviations): no E[x^2] - E[x]^2
            mean_b = yf.sum(dim=(0, 2, 3)) / local_count
            m2_b = (yf - mean_b.view(1, -1, 1, 1)).square_().sum(dim=(0, 2, 3))
        else:
            mean_b = m2_b = torch.zeros(c, dtype=acc, device=y.device)
        packed = torch.cat([torch.full((1,), float(local_count), dtype=torch.float64, device=y.device),
                            mean_b.to(torch.float64), m2_b.to(torch.float64)])
        count, mean64, m264 = _merge(_all_gather(packed, group), c)
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(count)} over all "
                             f"ranks of the process group (output of shape {list(y.shape)} on this rank)")
        mean = mean64.to(device=y.device, dtype=acc)
        var = (m264 / count).to(device=y.device, dtype=acc)
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            ops._update_running_stats(running_mean, running_var, mean, var, momentum, int(count))
        scale = invstd if bn_weight is None else invstd * bn_weight.to(acc)
        shift = -mean * scale if bn_bias is None else bn_bias.to(acc) - mean * scale
        out = torch.addcmul(shift.view(1, -1, 1, 1), yf, scale.view(1, -1, 1, 1))
        mask = None
        if relu:
            out = out.clamp_min_(0)
            mask = out > 0
        ctx.save_for_backward(input, weight, y, mean, invstd, bn_weight, mask)
        ctx.args = (stride, padding, dilation, groups, relu, group, count)
        ctx.bias_dtype = None if bn_bias is None else bn_bias.dtype
        return out.to(input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        input, weight, y, mean, invstd, bn_weight, mask = ctx.saved_tensors
        stride, padding, dilation, groups, relu, group, count = ctx.args
        need = ctx.needs_input_grad
        acc = mean.dtype
        gamma = torch.ones_like(invstd) if bn_weight is None else bn_weight.to(acc)
        xhat = torch.addcmul((-mean * invstd).view(1, -1, 1, 1), y.to(acc), invstd.view(1, -1, 1, 1))
        g = grad_out.to(acc)
        if relu:
            g = torch.where(mask, g, 0.0)
        sum_dy = g.sum(dim=(0, 2, 3))
        sum_dy_xhat = (g * xhat).sum(dim=(0, 2, 3))
        grad_gamma = sum_dy_xhat.to(bn_weight.dtype) if need[2] else None
        grad_beta = sum_dy.to(ctx.bias_dtype) if need[3] else None
        grad_input = grad_weight = None
        if need[0] or need[1]:
            c = sum_dy.shape[0]
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=group)  # one collective: the global sums
            k = invstd * gamma  # dy = k * (g - mean(g) - xhat * mean(g * xhat)), means over all ranks
            dy = torch.addcmul((-k * sums[:c] / count).view(1, -1, 1, 1), xhat,
                               (-k * sums[c:] / count).view(1, -1, 1, 1))
            dy = torch.addcmul(dy, g, k.view(1, -1, 1, 1)).to(input.dtype)
            grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
                dy, input, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
                [need[0], need[1], False])
        return (grad_input if need[0] else None, grad_weight if need[1] else None, grad_gamma, grad_beta,
                None, None, None, None, None, None, None, None, None, None)


def sync_conv_bn_relu(input: Tensor, weight: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                      bn_weight: Tensor | None, bn_bias: Tensor | None, *, momentum: float, eps: float, stride=1,
                      padding=1, dilation=1, groups: int = 1, relu: bool = True, group=None) -> Tensor:
    """Training form of :func:`resnext_kernels.conv_bn_relu` with the batch statistics synchronized over
    ``group`` (default: the world). Every rank of the group must call it (the same layers in the same order),
    also with an empty local batch. ``momentum`` and the running buffers as from
    :func:`resnext_kernels.nn.batch_norm_call_args`."""
    x, w = ops._autocast(input, weight)  # before the checks: under autocast a layer's input may be lower precision
    stride_p, padding_p, dilation_p = ops._check_conv_args(x, w, stride, padding, dilation, groups)
    ops._check_bn_args(x, w.shape[0], running_mean, running_var, bn_weight, bn_bias, True, eps)
    if group is None:
        group = dist.group.WORLD
    return SyncConvBNReLU.apply(x, w, bn_weight, bn_bias, running_mean, running_var, momentum, float(eps),
                                stride_p, padding_p, dilation_p, groups, relu, group)

"""The whole aggregated bottleneck in inference form, one call of the ``bottleneck_infer`` op."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._common import accumulation_dtype, autocast_tensors, fold_batch_norm
from ._dispatch import op_namespace


def bottleneck_inference(input: Tensor, convs_bns: Sequence[tuple[Tensor, Tensor, Tensor, Tensor | None,
                                                                  Tensor | None, float]],
                         downsample: tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, float] | None,
                         *, stride: int, groups: int, dilation: int) -> Tensor:
    """One call of ``bottleneck_infer``: ``convs_bns`` holds (conv weight, running_mean, running_var, bn weight,
    bn bias, eps) for conv1, conv2, conv3; ``downsample`` the same for the projection shortcut, or None.
    Autocast casts the input and the conv weights like it casts conv2d."""
    args = bottleneck_infer_args(input, convs_bns, downsample, stride=stride, groups=groups, dilation=dilation)
    return op_namespace(input).bottleneck_infer(*args)


def bottleneck_infer_args(input: Tensor, convs_bns, downsample, *, stride: int, groups: int,
                          dilation: int) -> tuple:
    """The arguments of the raw ``bottleneck_infer`` op for :func:`bottleneck_inference`'s arguments: autocast
    applied, every BatchNorm folded into (scale, shift) in the accumulation dtype."""
    weights = [c[0] for c in convs_bns] + ([downsample[0]] if downsample is not None else [])
    x, *weights = autocast_tensors(input, *weights)
    acc = accumulation_dtype(x.dtype)
    folded = []
    for w, (_, mean, var, gamma, beta, eps) in zip(weights, list(convs_bns) + ([downsample] if downsample else [])):
        folded.append((w, *fold_batch_norm(mean, var, gamma, beta, eps, acc)))
    down = folded[3] if downsample is not None else (None, None, None)
    return (x, *folded[0], *folded[1], *folded[2], *down, stride, groups, dilation)

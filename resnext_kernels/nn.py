"""Modules built on the fused ops, drop-in replacements for their torch.nn equivalents."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ops

__all__ = ["FusedGroupedConvBNReLU"]


def batch_norm_call_args(bn: nn.BatchNorm2d) -> tuple[bool, float, Tensor | None, Tensor | None]:
    """(training, momentum, running_mean, running_var) for a functional batch_norm call that behaves
    exactly as ``bn.forward`` does, including the ``num_batches_tracked`` update and ``momentum=None``
    (cumulative moving average). Mutates ``bn.num_batches_tracked`` like ``bn.forward`` would."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return use_batch_stats, momentum, (bn.running_mean if track else None), (bn.running_var if track else None)


class FusedGroupedConvBNReLU(nn.Module):
    """``Conv2d(bias=False) -> BatchNorm2d -> ReLU`` computed by one fused kernel.

    Parameters and buffers are those of ``nn.Sequential(nn.Conv2d(...), nn.BatchNorm2d(...), nn.ReLU())``
    under the same keys, so state dicts move between the two unchanged:

    ==========================  ====================================
    key                         meaning
    ==========================  ====================================
    ``0.weight``                convolution weight (C_out, C_in/groups, KH, KW)
    ``1.weight``, ``1.bias``    BatchNorm affine parameters (gamma, beta)
    ``1.running_mean``          BatchNorm running mean
    ``1.running_var``           BatchNorm running variance
    ``1.num_batches_tracked``   BatchNorm step counter
    ==========================  ====================================

    The submodules are reachable as ``.conv`` and ``.bn``. ``padding`` defaults to
    ``dilation * (kernel_size // 2)`` ("same" size at stride 1).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1, relu: bool = True,
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if padding is None:
            padding = dilation * (kernel_size // 2)
        factory = {"device": device, "dtype": dtype}
        self.add_module("0", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                       bias=False, **factory))
        self.add_module("1", nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, **factory))
        self.relu = relu

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True) -> FusedGroupedConvBNReLU:
        """Wraps an existing Conv2d (no bias, zero padding mode) and BatchNorm2d, sharing their tensors."""
        if not isinstance(conv, nn.Conv2d) or conv.bias is not None or conv.padding_mode != "zeros":
            raise ValueError("conv must be an nn.Conv2d with bias=False and padding_mode='zeros'")
        if isinstance(conv.padding, str):
            raise ValueError(f"conv.padding must be numeric, got {conv.padding!r}")
        if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != conv.out_channels:
            raise ValueError(f"bn must be an nn.BatchNorm2d with {conv.out_channels} features")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.add_module("0", conv)
        module.add_module("1", bn)
        module.relu = relu
        return module

    @property
    def conv(self) -> nn.Conv2d:
        return self._modules["0"]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self._modules["1"]

    def explain(self, input: Tensor) -> ops.Decision:
        """Which implementation ``forward(input)`` runs, and why."""
        conv, bn = self.conv, self.bn
        training = bn.training or (bn.running_mean is None and bn.running_var is None)
        return ops.explain(input, conv.weight, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                           groups=conv.groups, training=training)

    def forward(self, input: Tensor) -> Tensor:
        conv, bn = self.conv, self.bn
        training, momentum, running_mean, running_var = batch_norm_call_args(bn)
        return ops.conv_bn_relu(input, conv.weight, running_mean, running_var, bn.weight, bn.bias,
                                training=training, momentum=momentum, eps=bn.eps, stride=conv.stride,
                                padding=conv.padding, dilation=conv.dilation, groups=conv.groups, relu=self.relu)

    def extra_repr(self) -> str:
        return f"relu={self.relu}"

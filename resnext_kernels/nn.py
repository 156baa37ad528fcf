"""Modules built on the fused ops, drop-in replacements for their torch.nn equivalents."""

from __future__ import annotations

import dataclasses
import os
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _build_info, _cpu_backend, _dispatch, _prepacked, ops, sync_batch_norm

__all__ = ["FusedBasicBlock", "FusedGroupedConvBNReLU", "FusedResNeXtBlock", "conv_bn", "convert_sync_batchnorm",
           "explain_block"]

# The BatchNorm modules the fused layers run (SyncBatchNorm is a _BatchNorm, not a BatchNorm2d).
FUSABLE_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def _is_fusable_norm(norm: nn.Module) -> bool:
    return type(norm) in FUSABLE_NORMS


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)``: every BatchNorm (including the
    ones inside the fused modules and blocks) becomes an ``nn.SyncBatchNorm`` sharing its parameters and
    buffers. In training mode, with ``torch.distributed`` initialized and more than one rank in the group, the
    fused layers then compute the batch statistics over all ranks (:mod:`resnext_kernels.sync_batch_norm`, CPU
    and CUDA); in eval mode or with one rank they behave as before.

    On CPU, ``DistributedDataParallel`` refuses to wrap a module that already holds ``nn.SyncBatchNorm``
    ("SyncBatchNorm layers only work with GPU modules"): there, wrap first and convert the wrapped model
    (``ddp = DDP(model); convert_sync_batchnorm(ddp)``, which converts ``ddp.module``'s layers in place).
    BatchNorms that run their own forward (outside a fused conv + BN) keep ``nn.SyncBatchNorm``'s behaviour,
    which needs GPU inputs.
    """
    return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)


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


class FusedGroupedConvBNReLU(_prepacked.PreparedOwner, nn.Module):
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
        if not isinstance(bn, FUSABLE_NORMS) or bn.num_features != conv.out_channels:
            raise ValueError(f"bn must be an nn.BatchNorm2d or nn.SyncBatchNorm with {conv.out_channels} features")
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
        group = sync_batch_norm.sync_group(bn)
        if group is not None:
            conv_path = ops.explain(input, conv.weight, stride=conv.stride, padding=conv.padding,
                                    dilation=conv.dilation, groups=conv.groups, training=False, requires_grad=False)
            world = torch.distributed.get_world_size(group)
            return dataclasses.replace(conv_path, reason=f"synchronized BatchNorm over {world} ranks (resnext_kernels."
                                                         f"sync_batch_norm); the convolution: {conv_path.reason}")
        decision = ops.explain(input, conv.weight, stride=conv.stride, padding=conv.padding,
                               dilation=conv.dilation, groups=conv.groups, training=training, relu=self.relu)
        if decision.path != "cpu" or not prepared_inference(conv, bn, input):
            return decision
        choice = _prepacked.conv2_choice(self, input) or "not timed yet (the first call at this size and layout)"
        return dataclasses.replace(decision, reason="prepared inference: BatchNorm folded into the weights once "
                                   "(rebuilt when a weight changes); the fastest of the fused kernel "
                                   f"({decision.kernel}), prepacked oneDNN with the ReLU fused and ATen's "
                                   f"convolution with BatchNorm folded ({_prepacked.FOLDED}), timed on the first call "
                                   f"at each input size and layout (ATen's conv2d + batch_norm + relu where "
                                   f"{_cpu_backend.BACKEND_ENV}=aten forces it): {choice}",
                                   backend=choice if choice in _prepacked.LAYER_CHOICES else None)

    def forward(self, input: Tensor) -> Tensor:
        fast = self.__dict__.get("_fast")
        if fast is not None and isinstance(input, Tensor) and not torch.compiler.is_compiling():
            signature = _prepacked.fast_signature(self.conv, self.bn, input)
            if signature == fast[0]:
                return fast[1](input)  # what the prepared call chose for this signature
        if prepared_inference(self.conv, self.bn, input):
            return _prepacked.conv_bn_forward(self, self.conv, self.bn, input, self.relu,
                                              _prepacked.fast_signature(self.conv, self.bn, input))
        return conv_bn(input, self.conv, self.bn, self.relu)

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


# ----------------------------------------------------------------------------------------------------
# Residual blocks: drop-in replacements for torchvision's Bottleneck and BasicBlock
# ----------------------------------------------------------------------------------------------------

def conv_bn(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool) -> Tensor:
    """``relu?(bn(conv(x)))`` through the fused op, with ``bn``'s training/eval semantics (synchronized batch
    statistics for a training ``nn.SyncBatchNorm`` in a multi-rank group, see :mod:`.sync_batch_norm`)."""
    routes = sig = None
    if type(bn) is nn.BatchNorm2d and not torch.compiler.is_compiling() and _dispatch.reference_forced() is None:
        routes = _ROUTES.get(conv)
        if routes is None:
            routes = _ROUTES[conv] = {}
        sig = _route_signature(x, conv, bn, relu)
        if routes.get(sig):
            return _aten_conv_bn(x, conv, bn, relu)
    training, momentum, running_mean, running_var = batch_norm_call_args(bn)
    group = sync_batch_norm.sync_group(bn)
    if group is not None:
        return sync_batch_norm.sync_conv_bn_relu(x, conv.weight, running_mean, running_var, bn.weight, bn.bias,
                                                 momentum=momentum, eps=bn.eps, stride=conv.stride,
                                                 padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                                                 relu=relu, group=group)
    out = ops.conv_bn_relu(x, conv.weight, running_mean, running_var, bn.weight, bn.bias, training=training,
                           momentum=momentum, eps=bn.eps, stride=conv.stride, padding=conv.padding,
                           dilation=conv.dilation, groups=conv.groups, relu=relu)
    if routes is not None and sig not in routes:
        aten = ops.cpu_route_is_aten(x, conv.weight, bn.weight, bn.bias, stride=conv.stride, padding=conv.padding,
                                     dilation=conv.dilation, groups=conv.groups, training=training, relu=relu)
        if aten is not None:
            routes[sig] = aten
    return out


def prepared_inference(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor) -> bool:
    """Whether relu?(bn(conv(x))) runs with prepared weights (_prepacked.conv_bn_forward): BatchNorm in inference
    form, autograd not recording, a plain convolution, a CPU where oneDNN's prepacked path runs, nothing forced."""
    grad = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
    return (not bn.training and bn.running_mean is not None and not grad and _is_plain_conv(conv)
            and _is_fusable_norm(bn) and _prepacked.unavailable(x) is None and not _dispatch.reference_forced())


# conv module -> {route signature: whether the CPU run-time choice sent it to ATen}; kept outside the modules so that
# copies and pickles of a model do not carry one machine's timings.
_ROUTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_cpu_backend.on_clear.append(_ROUTES.clear)


def _route_signature(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool) -> tuple:
    """Everything conv_bn's route depends on besides the layer's geometry: a call with the signature of one that the
    CPU run-time choice sent to ATen goes there directly, without the op's argument checks and planning (on small
    layers these cost more than the difference to be won)."""
    w = conv.weight
    return (x.shape, x.stride(), x.dtype, x.device, x.requires_grad, torch.is_grad_enabled(), bn.training, relu,
            w.dtype, w.device, w.requires_grad, bn.weight is not None and bn.weight.requires_grad,
            torch.is_autocast_enabled(x.device.type), _dispatch.emulating(x), os.environ.get(_cpu_backend.BACKEND_ENV),
            torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())


def _aten_conv_bn(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool) -> Tensor:
    """PyTorch's own conv2d -> BatchNorm2d -> relu, as the op's ATen route runs them."""
    training, momentum, running_mean, running_var = batch_norm_call_args(bn)
    with _cpu_backend.scope():
        return ops.aten_conv_bn_relu(x, conv.weight, running_mean, running_var, bn.weight, bn.bias, training,
                                     momentum, bn.eps, (conv.stride, conv.padding, conv.dilation, conv.groups), relu)


def _is_plain_conv(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.bias is None and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def _is_projection(downsample: nn.Module | None) -> bool:
    """torchvision's shortcut: Sequential(conv1x1 (no bias), BatchNorm2d or SyncBatchNorm)."""
    return (isinstance(downsample, nn.Sequential) and len(downsample) == 2 and _is_plain_conv(downsample[0])
            and _is_fusable_norm(downsample[1]))


def _check_norm(norm: nn.Module, name: str) -> None:
    if not _is_fusable_norm(norm):
        raise ValueError(f"{name}: the fused blocks need nn.BatchNorm2d (or nn.SyncBatchNorm) normalization, "
                         f"got {type(norm).__name__}")


def _bn_inference_args(bn: nn.BatchNorm2d) -> tuple:
    return bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps


def _block_geometry_reason(block: nn.Module) -> str | None:
    """Why the convolutions of a bottleneck do not have the whole-block op's geometry (1x1 convs at stride 1
    without padding, a square 3x3 conv with padding == dilation, a 1x1 projection with the 3x3's stride), or
    None. torchvision's and timm's blocks always have it; hand-modified ones may not."""
    pointwise = [("conv1", block.conv1, (1, 1)), ("conv3", block.conv3, (1, 1))]
    if block.downsample is not None:
        pointwise.append(("downsample.0", block.downsample[0], block.conv2.stride))
    for name, conv, stride in pointwise:
        if conv.kernel_size != (1, 1) or conv.stride != tuple(stride) or conv.padding != (0, 0) or conv.groups != 1 \
                or conv.dilation != (1, 1):
            return f"{name} is not a 1x1 convolution with stride {tuple(stride)}, no padding and groups=1"
    c2 = block.conv2
    if c2.kernel_size != (3, 3) or c2.stride[0] != c2.stride[1] or c2.dilation[0] != c2.dilation[1] \
            or c2.padding != c2.dilation:
        return "conv2 is not a 3x3 convolution with square stride and dilation and padding == dilation"
    return None


def explain_block(block: nn.Module, x: Tensor) -> ops.Decision:
    """Whether a fused block runs as one ``bottleneck_infer`` call ("block" path) or layer by layer, and why."""
    forced = _dispatch.reference_forced()
    if forced:
        return ops.Decision("aten", forced)
    if not isinstance(block, FusedResNeXtBlock):
        return ops.Decision("layers", f"{type(block).__name__} has no whole-block kernel")
    bns = [block.bn1, block.bn2, block.bn3] + ([block.downsample[1]] if _is_projection(block.downsample) else [])
    if any(bn.training or bn.running_mean is None for bn in bns):
        return ops.Decision("layers", "BatchNorm uses batch statistics (training mode)")
    if block.downsample is not None and not _is_projection(block.downsample):
        return ops.Decision("layers", "the shortcut is not torchvision's conv1x1 + BatchNorm2d projection")
    geometry = _block_geometry_reason(block)
    if geometry is not None:
        return ops.Decision("layers", geometry)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in block.parameters())):
        return ops.Decision("layers", "autograd is recording; the whole-block kernel is inference-only")
    if x.device.type == "cpu" and torch.compiler.is_compiling() and not _dispatch.emulating(x):
        return ops.Decision("layers", "under torch.compile: layer by layer, so that Inductor folds, packs and fuses "
                                      "what the run-time choice leaves to ATen (the 1x1 convolutions at least)")
    if x.device.type == "cpu":
        if x.dtype not in _dispatch.CPU_DTYPES:
            return ops.Decision("layers", f"the CPU kernels cover float32, float64 and bfloat16, not {x.dtype}")
        why_not = _prepacked.unavailable(x)
        if why_not is None:
            choice = _prepacked.conv2_choice(block, x) or "the faster, timed on the first call at this size"
            return ops.Decision("block", "prepared inference: BatchNorm folded into the weights and the 1x1 "
                                         "convolutions' weights prepacked for oneDNN once (rebuilt when a weight "
                                         "changes), their bias, shortcut and ReLU in its post-ops; the 3x3 "
                                         f"convolution by the fused kernel or prepacked oneDNN: {choice}",
                                kernel="onednn_prepacked")
        return ops.Decision("block", f"the whole block in one fused operator call (inference); not prepared: "
                                     f"{why_not}", kernel="bottleneck_infer")
    if x.device.type == "cuda":
        if not _build_info.WITH_CUDA:
            return ops.Decision("layers", "resnext_kernels was built without CUDA kernels")
        if x.dtype not in _dispatch.CUDA_DTYPES:
            return ops.Decision("layers", f"the CUDA kernels cover float16, bfloat16, float32 and float64, "
                                          f"not {x.dtype}")
        return ops.Decision("block", "the whole block in one operator call (inference): cuDNN 1x1 convolutions "
                                     "with fused bias+ReLU and bias+shortcut+ReLU epilogues, the grouped 3x3 "
                                     "through the fused kernel where it covers the shape")
    return ops.Decision("layers", f"no whole-block kernel for device type {x.device.type!r}")


class FusedResNeXtBlock(_prepacked.PreparedOwner, nn.Module):
    """Drop-in replacement for ``torchvision.models.resnet.Bottleneck`` (the ResNeXt / ResNet-50+ block).

    Same constructor, same submodule names (``conv1 bn1 conv2 bn2 conv3 bn3 relu downsample``), same width
    formula ``int(planes * base_width / 64) * groups`` and the stride on the 3x3 convolution, so state dicts
    load unchanged. In inference (eval, no autograd) on CPU the block runs as one operator call with every
    BatchNorm folded and the shortcut + ReLU fused into the last convolution; otherwise each conv + BN (+ ReLU)
    runs the fused op (training form with batch statistics when training). ``explain(x)`` tells which.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer=None) -> None:
        super().__init__()
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, dilation, dilation=dilation, groups=groups, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        for name in ("bn1", "bn2", "bn3"):
            _check_norm(getattr(self, name), f"FusedResNeXtBlock.{name}")

    def explain(self, x: Tensor) -> ops.Decision:
        return explain_block(self, x)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x)

    def _forward(self, x: Tensor, consume: bool = False) -> Tensor:
        """forward(); ``consume``: the caller will not read ``x`` again and no hook sees it (a model's intermediate),
        so prepared inference may write its output over ``x``."""
        decision = explain_block(self, x)
        if decision.kernel == "onednn_prepacked":
            return _prepacked.bottleneck_forward(self, x, consume)
        if decision.path == "block":
            down = None
            if self.downsample is not None:
                down = (self.downsample[0].weight, *_bn_inference_args(self.downsample[1]))
            layers = [(conv.weight, *_bn_inference_args(bn))
                      for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3))]
            return ops.bottleneck_inference(x, layers, down, stride=self.conv2.stride[0], groups=self.conv2.groups,
                                            dilation=self.conv2.dilation[0])
        out = conv_bn(x, self.conv1, self.bn1, relu=True)
        out = conv_bn(out, self.conv2, self.bn2, relu=True)
        out = conv_bn(out, self.conv3, self.bn3, relu=False)
        out += _shortcut(self.downsample, x)  # in place, as torchvision: keeps out's dtype under autocast
        return F.relu(out)


class FusedBasicBlock(nn.Module):
    """Drop-in replacement for ``torchvision.models.resnet.BasicBlock`` (ResNet-18/34): two 3x3 conv + BN
    (+ ReLU) through the fused op, same constructor and state-dict keys."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer=None) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("FusedBasicBlock only supports groups=1 and base_width=64 (like BasicBlock)")
        if dilation > 1:
            raise ValueError("dilation > 1 is not supported in FusedBasicBlock (like BasicBlock)")
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        for name in ("bn1", "bn2"):
            _check_norm(getattr(self, name), f"FusedBasicBlock.{name}")

    def explain(self, x: Tensor) -> ops.Decision:
        return explain_block(self, x)

    def forward(self, x: Tensor) -> Tensor:
        out = conv_bn(x, self.conv1, self.bn1, relu=True)
        out = conv_bn(out, self.conv2, self.bn2, relu=False)
        out += _shortcut(self.downsample, x)  # in place, as torchvision: keeps out's dtype under autocast
        return F.relu(out)


def _shortcut(downsample: nn.Module | None, x: Tensor) -> Tensor:
    if downsample is None:
        return x
    if _is_projection(downsample):
        return conv_bn(x, downsample[0], downsample[1], relu=False)
    return downsample(x)

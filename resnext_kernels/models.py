"""The ResNeXt / ResNet model family on the fused blocks.

ImageNet models reuse torchvision's ``ResNet`` skeleton with the fused blocks (and a fused stem), so their
state dicts have torchvision's keys and shapes: ``ours.load_state_dict(torchvision_model.state_dict())``
works strictly, and so does the reverse. ``convert_model`` swaps the blocks of an existing torchvision
model in place, sharing its tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import _prepacked
from . import nn as _nn
from .nn import FusedBasicBlock, FusedResNeXtBlock, _is_fusable_norm, conv_bn

__all__ = [
    "CifarResNeXt",
    "ConversionReport",
    "FusedPreActBottleneck",
    "ResNet",
    "convert_model",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext29_8x64d",
    "resnext29_16x64d",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
]


def _torchvision_resnet():
    try:
        from torchvision.models.resnet import ResNet as TorchvisionResNet
    except ImportError as e:  # pragma: no cover - torchvision is a pinned requirement
        raise ImportError("resnext_kernels.models needs torchvision (see requirements.txt)") from e
    return TorchvisionResNet


def _global_hooks() -> bool:
    """Whether a hook registered for every module (torch.nn.modules.module.register_module_forward_hook, ...) is set."""
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                or hooks._global_backward_pre_hooks)


def _zero_init_residual(model: nn.Module) -> None:
    """torchvision's zero_init_residual for the fused blocks: the last BN of each residual branch starts at 0."""
    for m in model.modules():
        if isinstance(m, FusedResNeXtBlock) and m.bn3.weight is not None:
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, FusedBasicBlock) and m.bn2.weight is not None:
            nn.init.zeros_(m.bn2.weight)
        elif isinstance(m, FusedPreActBottleneck):
            nn.init.zeros_(m.conv3.weight)


class ResNet(_prepacked.PreparedOwner, _torchvision_resnet()):
    """torchvision's ResNet (v1.5: stride on the 3x3 conv) built from fused blocks, with a fused stem."""

    def __init__(self, block, layers, num_classes: int = 1000, zero_init_residual: bool = False, **kwargs) -> None:
        super().__init__(block, layers, num_classes=num_classes, zero_init_residual=False, **kwargs)
        if zero_init_residual:
            _zero_init_residual(self)

    def _stem(self, x: Tensor) -> Tensor:
        """The stem's conv + BN + ReLU; in inference on CPU with prepared weights, as the blocks'."""
        if _nn.prepared_inference(self.conv1, self.bn1, x):
            return _prepacked.conv_bn_forward(self, self.conv1, self.bn1, x, relu=True)
        return conv_bn(x, self.conv1, self.bn1, relu=True)

    def _forward_impl(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.dim() == 4:
            # The CPU kernels and oneDNN's prepacked convolutions compute channels_last: an NCHW batch is converted
            # once here rather than at every layer (the logits do not depend on the layout).
            x = x.contiguous(memory_format=torch.channels_last)
        image = x
        x = self.maxpool(self._stem(x))
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        if self._blocks_may_consume(x, image, layers, self.maxpool):
            for layer in layers:
                for block in layer:
                    x = block._forward(x, consume=True) if type(block) is FusedResNeXtBlock else block(x)
        else:
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    @staticmethod
    def _blocks_may_consume(x: Tensor, image: Tensor, layers: tuple[nn.Module, ...], before: nn.Module) -> bool:
        """Whether each block may write its output over its input in CPU inference, saving an activation-sized
        allocation per block: its input is an intermediate of this forward (not the caller's tensor), nothing records
        autograd or traces, and no hook could keep a block's input or output (a hook of a block, of a layer, of
        ``before``, the module whose output enters the first block, or a global one)."""
        if x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling() \
                or not all(isinstance(layer, nn.Sequential) for layer in layers):
            return False
        if x.untyped_storage().data_ptr() == image.untyped_storage().data_ptr() or _global_hooks():
            return False
        modules = (before, *layers, *(block for layer in layers for block in layer))
        return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                       for m in modules)


def resnet18(**kwargs) -> ResNet:
    return ResNet(FusedBasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs) -> ResNet:
    return ResNet(FusedBasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet(FusedResNeXtBlock, [3, 4, 6, 3], **kwargs)


def resnet101(**kwargs) -> ResNet:
    return ResNet(FusedResNeXtBlock, [3, 4, 23, 3], **kwargs)


def resnet152(**kwargs) -> ResNet:
    return ResNet(FusedResNeXtBlock, [3, 8, 36, 3], **kwargs)


def resnext50_32x4d(**kwargs) -> ResNet:
    return ResNet(FusedResNeXtBlock, [3, 4, 6, 3], groups=32, width_per_group=4, **kwargs)


def resnext101_32x8d(**kwargs) -> ResNet:
    return ResNet(FusedResNeXtBlock, [3, 4, 23, 3], groups=32, width_per_group=8, **kwargs)


def resnext101_64x4d(**kwargs) -> ResNet:
    return ResNet(FusedResNeXtBlock, [3, 4, 23, 3], groups=64, width_per_group=4, **kwargs)


# --------------------------------------------------------------------------------------------------
# The CIFAR ResNeXt-29 of the paper (section 5.3 / Table 7)
# --------------------------------------------------------------------------------------------------

def _make_stage(block, inplanes: int, planes: int, blocks: int, stride: int, **block_kwargs) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                                   nn.BatchNorm2d(planes * block.expansion))
    layers = [block(inplanes, planes, stride, downsample, **block_kwargs)]
    layers += [block(planes * block.expansion, planes, **block_kwargs) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class CifarResNeXt(nn.Module):
    """ResNeXt for 32x32 images: a 3x3 stem, three stages of bottlenecks with output widths 4x ``stage_planes``
    (256, 512, 1024 by default) at strides 1, 2, 2, global average pooling and a linear classifier.

    ``depth = 9 * blocks_per_stage + 2``; with cardinality C and base width d the grouped convolution of the
    first stage is C*d wide (the paper's "ResNeXt-29, 8x64d" is depth 29, C=8, d=64). ``fused=False`` builds
    the same network from torchvision's plain Bottleneck (same state-dict keys), as a reference.
    """

    def __init__(self, cardinality: int = 8, base_width: int = 64, depth: int = 29, num_classes: int = 10,
                 in_channels: int = 3, stem_channels: int = 64, stage_planes: tuple[int, ...] = (64, 128, 256),
                 zero_init_residual: bool = False, fused: bool = True) -> None:
        super().__init__()
        self.fused = fused
        if fused:
            block = FusedResNeXtBlock
        else:  # the same architecture from plain torch.nn layers (torchvision's Bottleneck): a reference
            from torchvision.models.resnet import Bottleneck as block
        if (depth - 2) % 9 != 0 or depth < 11:
            raise ValueError(f"depth must be 9 * blocks_per_stage + 2 (11, 20, 29, ...), got {depth}")
        blocks = (depth - 2) // 9
        self.conv1 = nn.Conv2d(in_channels, stem_channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        inplanes = stem_channels
        stages = []
        for i, planes in enumerate(stage_planes):
            stages.append(_make_stage(block, inplanes, planes, blocks, 1 if i == 0 else 2,
                                      groups=cardinality, base_width=base_width))
            inplanes = planes * block.expansion
        self.stages = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if hasattr(m, "bn3") and isinstance(m, (FusedResNeXtBlock, block)):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = conv_bn(x, self.conv1, self.bn1, relu=True) if self.fused else torch.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnext29_8x64d(**kwargs) -> CifarResNeXt:
    return CifarResNeXt(cardinality=8, base_width=64, depth=29, **kwargs)


def resnext29_16x64d(**kwargs) -> CifarResNeXt:
    return CifarResNeXt(cardinality=16, base_width=64, depth=29, **kwargs)


# --------------------------------------------------------------------------------------------------
# Pre-activation (ResNet v2) bottleneck
# --------------------------------------------------------------------------------------------------

class FusedPreActBottleneck(nn.Module):
    """Pre-activation bottleneck (He et al., "Identity Mappings in Deep Residual Networks", 2016):
    ``x + conv3(relu(bn3(conv2(relu(bn2(conv1(relu(bn1(x)))))))))``, with the shortcut (``downsample``, a
    1x1 convolution) applied to ``relu(bn1(x))`` when present.

    Read as conv -> BN -> ReLU, the two inner pairs are exactly the fused op: conv1 with bn2, conv2 with bn3.
    The width formula and ``groups`` follow the ResNeXt bottleneck.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, dilation, dilation=dilation, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        pre = torch.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(pre)
        out = conv_bn(pre, self.conv1, self.bn2, relu=True)
        out = conv_bn(out, self.conv2, self.bn3, relu=True)
        return self.conv3(out) + shortcut


# --------------------------------------------------------------------------------------------------
# convert_model
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ConversionReport:
    """What convert_model did: the qualified names of converted blocks, and blocks left alone with why."""

    converted: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} block(s)"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _adopt(fused_cls, block: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """A fused block that takes over `block`'s submodules (sharing parameters and buffers)."""
    fused = fused_cls.__new__(fused_cls)
    nn.Module.__init__(fused)
    for name in names:
        setattr(fused, name, getattr(block, name))
    if not hasattr(fused, "relu"):  # timm's blocks name their activations act1..act3 (no parameters)
        fused.relu = nn.ReLU(inplace=True)
    fused.stride = block.conv2.stride[0] if isinstance(fused, FusedResNeXtBlock) else block.conv1.stride[0]
    fused.train(block.training)
    return fused


_BOTTLENECK_LAYERS = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample")
_BASIC_LAYERS = ("conv1", "bn1", "conv2", "bn2", "downsample")


def _tv_block_classes() -> dict[type, Callable[[nn.Module], nn.Module]]:
    from torchvision.models.resnet import BasicBlock, Bottleneck
    return {
        Bottleneck: lambda b: _adopt(FusedResNeXtBlock, b,
                                     ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample")),
        BasicBlock: lambda b: _adopt(FusedBasicBlock, b, ("conv1", "bn1", "relu", "conv2", "bn2", "downsample")),
    }


def _timm_block_classes() -> dict[type, Callable[[nn.Module], nn.Module]]:
    """timm's ResNet/ResNeXt blocks (timm.models.resnet), when timm is installed."""
    try:
        from timm.models.resnet import BasicBlock, Bottleneck
    except ImportError:
        return {}
    return {
        Bottleneck: lambda b: _adopt(FusedResNeXtBlock, b, _BOTTLENECK_LAYERS),
        BasicBlock: lambda b: _adopt(FusedBasicBlock, b, _BASIC_LAYERS),
    }


def _why_not_convertible_timm(block: nn.Module) -> str | None:
    """timm's blocks carry optional extras the fused blocks do not compute: attention (se), anti-aliasing
    (aa), DropBlock, stochastic depth (drop_path), other activations."""
    for name in ("se", "drop_path"):
        if getattr(block, name, None) is not None:
            return f"{name} is {type(getattr(block, name)).__name__} (the fused blocks have no {name})"
    for name in ("aa", "drop_block"):
        layer = getattr(block, name, None)
        if layer is not None and not isinstance(layer, nn.Identity):
            return f"{name} is {type(layer).__name__}, not Identity"
    for name in ("act1", "act2", "act3"):
        act = getattr(block, name, None)
        if act is not None and type(act) is not nn.ReLU:
            return f"{name} is {type(act).__name__}, not nn.ReLU"
    return _why_not_convertible(block)


def _why_not_convertible(block: nn.Module) -> str | None:
    for name in ("bn1", "bn2", "bn3"):
        bn = getattr(block, name, None)
        if bn is not None and not _is_fusable_norm(bn):
            return f"{name} is {type(bn).__name__}, not nn.BatchNorm2d"
    for name in ("conv1", "conv2", "conv3"):
        conv = getattr(block, name, None)
        if conv is not None and (type(conv) is not nn.Conv2d or conv.bias is not None or conv.padding_mode != "zeros"):
            return f"{name} is not a bias-free, zero-padded nn.Conv2d"
    return None


def convert_model(module: nn.Module, *, return_report: bool = False):
    """Replaces torchvision's and timm's ``Bottleneck`` / ``BasicBlock`` modules in ``module`` (in place) by the
    fused blocks, which take over their submodules, so weights, devices, dtypes and training mode are kept and
    state-dict keys do not change. timm blocks with extras the fused blocks do not compute (attention,
    anti-aliasing, DropBlock, drop_path, non-ReLU activations) and anything else are left untouched and
    reported. Returns ``module`` (and a :class:`ConversionReport` with ``return_report=True``)."""
    timm_classes = _timm_block_classes()
    classes = {**_tv_block_classes(), **timm_classes}
    report = ConversionReport()

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            qualified = f"{prefix}{name}"
            convert = classes.get(type(child))
            if convert is not None:
                why = (_why_not_convertible_timm if type(child) in timm_classes else _why_not_convertible)(child)
                if why is None:
                    setattr(parent, name, convert(child))
                    report.converted.append(qualified)
                    continue
                report.skipped.append((qualified, why))
            visit(child, qualified + ".")

    if type(module) in classes:
        raise ValueError("convert_model converts the blocks inside a model; wrap a single block in a container")
    visit(module, "")
    return (module, report) if return_report else module

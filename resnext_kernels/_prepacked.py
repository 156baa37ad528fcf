"""The bottleneck's CPU inference with prepared weights: every BatchNorm folded into its convolution's weights once,
the 1x1 convolutions' weights prepacked once in oneDNN's blocked layout (what torch.compile's freezing does), their
bias, the shortcut and the ReLUs in oneDNN's post-ops. The 3x3 convolution runs the faster of the fused kernel the
planner picks and prepacked oneDNN, timed on the first call at each input size (prepacked oneDNN wins at wide dense
layers and at batch 1 in the last stage; the fused kernel at ResNeXt's grouped layers): the choice is then fixed
for that size, so repeated calls give identical results.

Unprepared, oneDNN reorders each 1x1 convolution's weights on every call: at batch 1 that reorder costs more than
the convolution in ResNeXt-50's last stages. The prepared tensors live on the block (and on the model, for its
stem), not in the state dict, and are rebuilt when a weight or BatchNorm tensor is replaced or modified in place
(its version counter), or the dtype changes. A change through ``.data`` keeps the version counter: ``eval()`` (or
``train()``) drops the prepared tensors.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _cpu_backend
from ._common import autocast_tensors, fold_batch_norm
from ._cpu_backend import ATEN, time_candidates
from ._dispatch import FORCE_ATEN_ENV, _emulate, _force, cpu_config, emulating
from .ops import aten_conv_bn_relu

PACKED = "onednn_prepacked"  # the choice of prepacked oneDNN for a convolution
SCOPE = f"resnext_kernels::{PACKED}"  # the profiler scope of each prepacked oneDNN convolution


class _Pointwise(NamedTuple):
    weight: Tensor  # oneDNN-packed, BatchNorm scale folded in, in the compute dtype
    bias: Tensor  # the BatchNorm shift, in the compute dtype (oneDNN's fused paths take the weight's)


class _Prepared(NamedTuple):
    key: tuple
    conv1: _Pointwise
    conv2: tuple[Tensor, Tensor, Tensor]  # weight in the compute dtype, BatchNorm (scale, shift) in float32
    conv2_packed: _Pointwise
    conv3: _Pointwise
    down: _Pointwise | None
    choice: dict  # input size -> the 3x3 convolution's implementation: FUSED or PACKED


def compute_dtype(x: Tensor) -> torch.dtype:
    """x's dtype after autocast (without casting x), as autocast_tensors casts."""
    device = x.device.type
    if device in ("cpu", "cuda") and x.is_floating_point() and x.dtype != torch.float64 \
            and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def unavailable(x: Tensor) -> str | None:
    """Why the prepared path cannot run a block on ``x``, or None."""
    if x.device.type != "cpu" or emulating(x):
        return "not a CPU tensor"
    if torch.compiler.is_compiling():
        return "under torch.compile (Inductor packs the 1x1 convolutions itself)"
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return "oneDNN is not available or disabled (torch.backends.mkldnn)"
    config = cpu_config()
    if not config.aten_routes:
        return "the oneDNN routes are off (RESNEXT_KERNELS_CPU_ATEN_ROUTES=off)"
    dtype = compute_dtype(x)
    if dtype == torch.bfloat16 and not config.native_bf16:
        return "this CPU has no native bfloat16 multiply (oneDNN would emulate it)"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN's prepacked path covers float32 and bfloat16, not {dtype}"
    return None


def _layers(block: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    layers = [(block.conv1, block.bn1), (block.conv2, block.bn2), (block.conv3, block.bn3)]
    return layers + ([(block.downsample[0], block.downsample[1])] if block.downsample is not None else [])


def _key(block: nn.Module, dtype: torch.dtype) -> tuple:
    """Identifies the tensors the prepared ones derive from: a replaced tensor changes its address, one modified in
    place (an optimizer step, load_state_dict) its version."""
    return (dtype, *(part for conv, bn in _layers(block) for part in _key_parts(conv, bn)))


def _key_parts(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple:
    # through _parameters/_buffers: Module.__getattr__ would double this per-call cost
    p, b = bn._parameters, bn._buffers
    return (*(None if t is None else (t.data_ptr(), t._version)
              for t in (conv._parameters["weight"], b["running_mean"], b["running_var"], p["weight"], p["bias"])),
            bn.eps)


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> _Pointwise:
    """The convolution's weight and bias with BatchNorm folded in (in float32, rounded once to ``dtype``)."""
    scale, shift = fold_batch_norm(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, torch.float32)
    return _Pointwise((conv.weight.detach().float() * scale.view(-1, 1, 1, 1)).to(dtype), shift.to(dtype))


def _pointwise(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype, input_size: list[int],
               folded: _Pointwise | None = None) -> _Pointwise:
    weight, bias = folded or _folded(conv, bn, dtype)
    packed = torch.ops.mkldnn._reorder_convolution_weight(weight, list(conv.padding), list(conv.stride),
                                                          list(conv.dilation), conv.groups, input_size)
    return _Pointwise(packed, bias)


def _prepare(block: nn.Module, x: Tensor, key: tuple) -> _Prepared:
    n, _, h, w = x.shape
    s = block.conv2.stride[0]
    width = block.conv1.out_channels
    out_size = [n, width, (h - 1) // s + 1, (w - 1) // s + 1]
    bn2 = block.bn2
    conv2 = (block.conv2.weight.detach().to(x.dtype),
             *fold_batch_norm(bn2.running_mean, bn2.running_var, bn2.weight, bn2.bias, bn2.eps, torch.float32))
    down = None
    if block.downsample is not None:
        down = _pointwise(block.downsample[0], block.downsample[1], x.dtype, list(x.shape))
    return _Prepared(key, _pointwise(block.conv1, block.bn1, x.dtype, list(x.shape)), conv2,
                     _pointwise(block.conv2, bn2, x.dtype, [n, width, h, w]),
                     _pointwise(block.conv3, block.bn3, x.dtype, out_size), down, {})


FUSED = "fused"  # the choice of the project's fused kernel for a convolution
FOLDED = "aten_folded"  # ATen's convolution with BatchNorm folded in (a single layer's candidate)
FOLDED_SCOPE = f"resnext_kernels::{FOLDED}"
LAYER_CHOICES = (FUSED, PACKED, FOLDED, ATEN)


def _scope():
    """The profiler scope of a prepacked convolution."""
    return _cpu_backend.scope(SCOPE)


def _packed_conv(x: Tensor, p: _Pointwise, conv: nn.Conv2d, relu: bool) -> Tensor:
    with _scope():
        return torch.ops.mkldnn._convolution_pointwise(x, p.weight, p.bias, list(conv.padding), list(conv.stride),
                                                       list(conv.dilation), conv.groups, "relu" if relu else "none",
                                                       [], "")


def size_key(x: Tensor) -> tuple:
    return x.dtype, tuple(x.shape), x.stride()  # the layout too: oneDNN's NCHW and channels_last kernels differ


def _choose(choice: dict, key: tuple, candidates: dict) -> str:
    """The candidate chosen for ``key`` (the input's size_key); on the first call with it, the fastest by
    _cpu_backend.time_candidates, kept so that later calls give identical results."""
    if key not in choice:
        best = time_candidates(candidates)
        choice[key] = min(best, key=best.get)
    return choice[key]


def conv2_choice(block: nn.Module, x: Tensor) -> str | None:
    """The (3x3) convolution's implementation chosen for ``x``'s size and layout (a layer's own: its only
    convolution), or None before the first call at them."""
    prepared = block.__dict__.get("_prepared")
    if isinstance(prepared, _Prepared):  # a block's
        return prepared.choice.get(size_key(x))
    if _cpu_backend.mode() == ATEN:
        return ATEN  # a layer forced to ATen's sequence times nothing
    return None if prepared is None else prepared.choice.get(_choice_key(x))


def _choice_key(x: Tensor) -> tuple:
    """A layer's choices per input size and layout, apart per RESNEXT_KERNELS_CPU_BACKEND mode (which decides what
    competes)."""
    mode = _cpu_backend.mode()
    return size_key(x) if mode == "auto" else (mode, *size_key(x))


class _PreparedConv(NamedTuple):
    key: tuple
    fused: tuple[Tensor, Tensor, Tensor]  # weight in the compute dtype, BatchNorm (scale, shift) in float32
    packed: _Pointwise
    folded: _Pointwise  # the same weight and bias in PyTorch's layout, for ATen's convolution
    choice: dict  # _choice_key -> FUSED, PACKED or FOLDED


def _folded_conv(x: Tensor, p: _Pointwise, conv: nn.Conv2d, relu: bool) -> Tensor:
    """ATen's convolution with BatchNorm folded into its weight and bias, then ReLU in place: one pass fewer than
    the eager sequence, in the input's own layout (oneDNN's NCHW kernels need no conversion)."""
    with _cpu_backend.scope(FOLDED_SCOPE):
        out = F.conv2d(x, p.weight, p.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return out.relu_() if relu else out


def _aten_conv(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool) -> Tensor:
    with _cpu_backend.scope():
        return aten_conv_bn_relu(x, conv.weight, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                                 bn.eps, (conv.stride, conv.padding, conv.dilation, conv.groups), relu)


def conv_bn_forward(owner: nn.Module, conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor, relu: bool,
                    signature: tuple | None = None) -> Tensor:
    """relu?(bn(conv(x))) in inference by the fastest of the fused kernel, prepacked oneDNN (BatchNorm folded, ReLU
    fused) and ATen's convolution with BatchNorm folded, timed on the first call at each input size and layout (ATen's
    conv2d + batch_norm + relu runs where RESNEXT_KERNELS_CPU_BACKEND=aten forces it; otherwise it is not timed: the
    folded convolution is the same convolution with one pass fewer, so the sequence could win only by noise, and a
    noisy first call would keep it for the process); the prepared weights kept on ``owner`` (as a block keeps its
    own); the caller checked unavailable() and that ``bn`` is in inference form. With the call's fast_signature(),
    the chosen implementation is kept on ``owner`` for later calls with the same signature (see fast_call())."""
    x = autocast_tensors(x)[0]
    key = (x.dtype, *_key_parts(conv, bn))
    prepared = owner.__dict__.get("_prepared")
    if prepared is None or prepared.key != key:
        fused = (conv.weight.detach().to(x.dtype),
                 *fold_batch_norm(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, torch.float32))
        folded = _folded(conv, bn, x.dtype)
        prepared = owner.__dict__["_prepared"] = _PreparedConv(
            key, fused, _pointwise(conv, bn, x.dtype, list(x.shape), folded), folded, {})
    stride, padding, dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
    candidates = {
        FUSED: lambda x: torch.ops.resnext_kernels.conv_bn_relu_infer(x, *prepared.fused, stride, padding, dilation,
                                                                      conv.groups, relu),
        PACKED: lambda x: _keep_layout(x, _packed_conv(x, prepared.packed, conv, relu)),
        FOLDED: lambda x: _folded_conv(x, prepared.folded, conv, relu),
        ATEN: lambda x: _aten_conv(x, conv, bn, relu),
    }
    if _cpu_backend.mode() == ATEN:  # RESNEXT_KERNELS_CPU_BACKEND=aten: ATen's sequence alone
        chosen = ATEN
    else:
        timed = {k: functools.partial(f, x) for k, f in candidates.items() if k != ATEN}
        chosen = _choose(prepared.choice, _choice_key(x), timed)
    if signature is not None and signature[FAST_AUTOCAST] is False:
        owner.__dict__["_fast"] = (signature, candidates[chosen])
    return candidates[chosen](x)


# Index of the autocast flag in fast_signature(): under autocast the input is cast first, so nothing is kept.
FAST_AUTOCAST = 3
# The process environment as os.environ keeps it (bytes on POSIX): a lookup there skips os.environ.get's key encoding
# and, for an unset variable, its KeyError, which together cost more than the rest of fast_signature().
_ENVIRON = os.environ._data if os.name == "posix" else None
_ENV_KEYS = tuple(k.encode() for k in (FORCE_ATEN_ENV, _cpu_backend.BACKEND_ENV))


def _env_switches() -> tuple:
    if _ENVIRON is not None:
        return tuple(_ENVIRON.get(k) for k in _ENV_KEYS)
    return tuple(os.environ.get(k.decode()) for k in _ENV_KEYS)


def fast_signature(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor) -> tuple:
    """Everything a layer's prepared call depends on besides the input's values: its dtype, size and layout, the grad
    and autocast modes, the switches that force a path, BatchNorm's mode and the tensors the prepared ones derive
    from (object and version). A few microseconds where the checks it stands for cost tens: a tenth of a small
    layer's time, and Python work before a convolution slows the convolution too."""
    w = conv._parameters["weight"]
    tensors = (w, bn._buffers["running_mean"], bn._buffers["running_var"], bn._parameters["weight"],
               bn._parameters["bias"])
    return (x.dtype, x.shape, x.stride(), torch.is_autocast_enabled("cpu"), x.is_cpu,
            torch.is_grad_enabled() and (x.requires_grad or w.requires_grad), bn.training, bn.eps,
            torch._C._get_mkldnn_enabled(), getattr(_force, "enabled", False), getattr(_emulate, "enabled", False),
            *_env_switches(), *((id(t), t._version) for t in tensors if t is not None))


def _keep_layout(x: Tensor, out: Tensor) -> Tensor:
    """oneDNN's output (channels_last) in the input's layout, as the other paths give it."""
    return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


def bottleneck_forward(block: nn.Module, x: Tensor, consume: bool = False) -> Tensor:
    """The block's inference on ``x`` with its prepared weights (prepared now if missing or stale); the caller
    checked explain_block() and unavailable(). ``consume``: nothing else reads ``x`` after this call (a model's
    intermediate, no hooks), so the identity shortcut may be overwritten with the output."""
    x = autocast_tensors(x)[0]
    key = _key(block, x.dtype)
    prepared = block.__dict__.get("_prepared")
    if prepared is None or prepared.key != key:
        prepared = block.__dict__["_prepared"] = _prepare(block, x, key)
    c2 = block.conv2
    s, d = c2.stride[0], c2.dilation[0]
    h = _packed_conv(x, prepared.conv1, block.conv1, relu=True)
    candidates = {
        FUSED: lambda: torch.ops.resnext_kernels.conv_bn_relu_infer(h, *prepared.conv2, [s, s], [d, d], [d, d],
                                                                    c2.groups, True),
        PACKED: lambda: _packed_conv(h, prepared.conv2_packed, c2, relu=True),
    }
    h = candidates[_choose(prepared.choice, size_key(x), candidates)]()
    p = prepared.conv3
    args = (p.weight, p.bias, [0, 0], [1, 1], [1, 1], 1, "add", 1.0, "relu", [], "")
    if prepared.down is None:
        with _scope():
            if consume and x.is_contiguous(memory_format=torch.channels_last):
                return torch.ops.mkldnn._convolution_pointwise_.binary(x, h, *args)  # as the projection's below
            return _keep_layout(x, torch.ops.mkldnn._convolution_pointwise.binary(h, x, *args))
    shortcut = _packed_conv(x, prepared.down, block.downsample[0], relu=False)
    with _scope():
        if shortcut.is_contiguous(memory_format=torch.channels_last):
            # The projection's output belongs to this call: the last convolution adds into it in place, so no fresh
            # output is allocated (a new activation-sized block costs its page faults: 9 of 35 ms at stage 1, N=8).
            out = torch.ops.mkldnn._convolution_pointwise_.binary(shortcut, h, *args)
        else:
            out = torch.ops.mkldnn._convolution_pointwise.binary(h, shortcut, *args)
    return _keep_layout(x, out)


def release(block: nn.Module) -> None:
    block.__dict__.pop("_prepared", None)
    block.__dict__.pop("_fast", None)


class PreparedOwner:
    """Mixin of the modules that keep prepared weights: ``train()`` and ``eval()`` drop them (the way to drop weights
    prepared before a change through ``.data``); copies and pickles leave them out (oneDNN's packed tensors cannot
    be copied; a copy prepares its own)."""

    def train(self, mode: bool = True):
        release(self)
        return super().train(mode)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_prepared", None)
        state.pop("_fast", None)
        return state

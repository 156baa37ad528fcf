"""Controls of the CUDA-on-CPU emulator build (``resnext_kernels._emu``, see csrc/emu/README.md).

The emulated ops live in ``torch.ops.resnext_kernels_emu`` with the same schemas as the real ones and take
CPU tensors; they run the project's CUDA host launchers and kernels, thread by thread, on the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# (block order, seed) triples the tests run every emulated kernel under.
SCHEDULES = [("forward", 0), ("reverse", 1), ("random", 1234)]


def available() -> bool:
    try:
        from . import _emu  # noqa: F401
    except ImportError:
        return False
    return True


def _ops():
    from . import _emu  # noqa: F401  (registers torch.ops.resnext_kernels_emu)
    return torch.ops.resnext_kernels_emu


def set_schedule(order: str, seed: int = 0) -> None:
    """Block order ("forward", "reverse" or "random") and seed of the random choices for later launches."""
    _ops().set_schedule(order, seed)


@contextlib.contextmanager
def schedule(order: str, seed: int = 0) -> Iterator[None]:
    """Runs the block under a schedule, then restores the default forward schedule."""
    set_schedule(order, seed)
    try:
        yield
    finally:
        set_schedule("forward", 0)


def launch_stats() -> dict[str, int]:
    """Counters since the process started: launches, blocks, threads, barriers, warp operations."""
    return dict(zip(("launches", "blocks", "threads", "barriers", "warp_ops"), _ops().launch_stats()))


if available():
    from .ops import (_bottleneck_infer_fake, _conv_bn_relu_infer_fake, _conv_bn_relu_train_backward_fake,
                      _conv_bn_relu_train_fake)

    torch.library.register_fake("resnext_kernels_emu::conv_bn_relu_infer")(_conv_bn_relu_infer_fake)
    torch.library.register_fake("resnext_kernels_emu::conv_bn_relu_train")(_conv_bn_relu_train_fake)
    torch.library.register_fake("resnext_kernels_emu::conv_bn_relu_train_backward")(_conv_bn_relu_train_backward_fake)
    torch.library.register_fake("resnext_kernels_emu::bottleneck_infer")(_bottleneck_infer_fake)

"""The CUDA-on-CPU emulator build (``resnext_kernels._emu``, see docs/emulator.md): its controls and its counters.

The emulated ops live in ``torch.ops.resnext_kernels_emu`` with the same schemas as the real ones and take
CPU tensors; they run the project's CUDA host launchers and kernels, thread by thread, on the CPU.

:func:`profile` runs a function that calls emulated ops and returns one :class:`LaunchRecord` per kernel launch:
the counts Nsight Compute would show (global requests, bytes and sectors, the compulsory DRAM traffic, shared
memory wavefronts and bank conflicts, tensor-core and asynchronous-copy instructions), and a predicted time per GPU
(:mod:`resnext_kernels.emulator.gpu_model`). ``python -m resnext_kernels.emulator profile`` prints them for the
ResNeXt grouped 3x3 layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import gpu_model

# (block order, seed) triples the tests run every emulated kernel under.
SCHEDULES = [("forward", 0), ("reverse", 1), ("random", 1234)]


def available() -> bool:
    try:
        from .. import _emu  # noqa: F401
    except ImportError:
        return False
    return True


def _ops():
    from .. import _emu  # noqa: F401  (registers torch.ops.resnext_kernels_emu)
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


def counters_available() -> bool:
    """Whether this build's emulated kernels carry the counters' hooks (not in the AddressSanitizer build)."""
    return available() and bool(_ops().counters_built())


@dataclasses.dataclass
class LaunchRecord:
    """What one emulated kernel launch did, counted per warp instruction (see docs/emulator.md, "Counters").

    ``*_bytes`` are the bytes the lanes asked for, ``*_distinct_bytes`` the distinct ones among them (lanes that
    read one address count once), ``*_sectors`` the 32-byte sectors the warp instructions touched, and
    ``dram_*_bytes_min`` the launch's unique sectors x 32: the traffic no cache can avoid. Shared memory is in
    wavefronts (32 banks of 4 bytes, one wavefront a cycle); ``*_ideal_wavefronts`` is what the same instructions
    would take without bank conflicts.
    """

    kernel: str
    symbol: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    smem_bytes: int
    blocks: int
    threads: int
    barriers: int
    warp_ops: int
    gld_requests: int
    gld_bytes: int
    gld_distinct_bytes: int
    gld_sectors: int
    gst_requests: int
    gst_bytes: int
    gst_distinct_bytes: int
    gst_sectors: int
    gld_requests_by_width: dict[int, int]
    gst_requests_by_width: dict[int, int]
    dram_read_bytes_min: int
    dram_write_bytes_min: int
    smem_ld_requests: int
    smem_ld_wavefronts: int
    smem_ld_ideal_wavefronts: int
    smem_st_requests: int
    smem_st_wavefronts: int
    smem_st_ideal_wavefronts: int
    ldmatrix_requests: int
    ldmatrix_wavefronts: int
    ldmatrix_ideal_wavefronts: int
    ldmatrix_bytes: int
    cp_async_requests: int
    cp_async_bytes: int
    cp_async_src_bytes: int
    cp_async_src_distinct_bytes: int
    cp_async_sectors: int
    cp_async_smem_requests: int
    cp_async_smem_wavefronts: int
    cp_async_smem_ideal_wavefronts: int
    mma_m16n8k16_f16: int
    mma_m16n8k16_bf16: int
    mma_m16n8k8_tf32: int
    local_ld_bytes: int
    local_st_bytes: int
    requests: int
    diverged_requests: int

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LaunchRecord:
        d = dict(d)
        d["grid"], d["block"] = tuple(d["grid"]), tuple(d["block"])
        for key in ("gld_requests_by_width", "gst_requests_by_width"):
            d[key] = {int(k): v for k, v in d[key].items()}
        return cls(**d)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- derived figures ---------------------------------------------------------------------------------

    @property
    def dram_bytes_min(self) -> int:
        return self.dram_read_bytes_min + self.dram_write_bytes_min

    @property
    def gld_efficiency(self) -> float:
        """Distinct bytes the global loads (cp.async included) asked for / the bytes of the sectors they touched."""
        sectors = self.gld_sectors + self.cp_async_sectors
        return (self.gld_distinct_bytes + self.cp_async_src_distinct_bytes) / (32 * sectors) if sectors else 1.0

    @property
    def gst_efficiency(self) -> float:
        return self.gst_distinct_bytes / (32 * self.gst_sectors) if self.gst_sectors else 1.0

    @property
    def smem_requests(self) -> int:
        return self.smem_ld_requests + self.smem_st_requests + self.ldmatrix_requests + self.cp_async_smem_requests

    @property
    def smem_wavefronts(self) -> int:
        return (self.smem_ld_wavefronts + self.smem_st_wavefronts + self.ldmatrix_wavefronts
                + self.cp_async_smem_wavefronts)

    @property
    def smem_conflict_wavefronts(self) -> int:
        ideal = (self.smem_ld_ideal_wavefronts + self.smem_st_ideal_wavefronts + self.ldmatrix_ideal_wavefronts
                 + self.cp_async_smem_ideal_wavefronts)
        return self.smem_wavefronts - ideal

    @property
    def wavefronts_per_request(self) -> float:
        return self.smem_wavefronts / self.smem_requests if self.smem_requests else 0.0

    @property
    def mma(self) -> int:
        return self.mma_m16n8k16_f16 + self.mma_m16n8k16_bf16 + self.mma_m16n8k8_tf32

    def predict_us(self, gpu: str = "h100", *, registers: int | None = None, static_smem: int = 0,
                   fma: float = 0.0) -> float:
        """Predicted time of this launch on `gpu` (a key of gpu_model.GPUS), by gpu_model.predict."""
        return self.predict(gpu, registers=registers, static_smem=static_smem, fma=fma).us

    def predict(self, gpu: str = "h100", *, registers: int | None = None, static_smem: int = 0,
                fma: float = 0.0) -> gpu_model.Prediction:
        return gpu_model.predict(self.as_dict(), gpu, registers=registers, static_smem=static_smem, fma=fma)


def profile(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[LaunchRecord]:
    """Runs ``fn(*args, **kwargs)`` (which calls emulated ops) with the counters on; one record per kernel launch,
    in launch order. Launches from other threads meanwhile are not counted reliably: profile one thing at a time."""
    ops = _ops()
    if not ops.counters_built():
        raise RuntimeError("this build of resnext_kernels._emu has no counters (the AddressSanitizer build has none)")
    ops.profile_start()
    try:
        fn(*args, **kwargs)
    finally:
        records = json.loads(ops.profile_stop())
    return [LaunchRecord.from_json(r) for r in records]


def cuda_on_cpu(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Within the block (in this thread), the library's fused ops and modules on CPU tensors run their CUDA path
    under the emulator: the CUDA planner's decision (``explain()`` answers for CUDA), the CUDA host launchers and
    kernels, the CUDA autograd formulas. For tests and debugging of the CUDA code without a GPU; slow::

        with resnext_kernels.emulator.cuda_on_cpu():
            loss = block(x).sum()  # block: a FusedResNeXtBlock, x: a CPU tensor
            loss.backward()
    """
    if enabled and not available():
        raise RuntimeError("resnext_kernels._emu (the emulated CUDA build) is not built: see docs/emulator.md")
    from .._dispatch import emulate_cuda
    return emulate_cuda(enabled)


if available():
    from .. import _autograd
    from ..ops import (_bottleneck_infer_fake, _conv_bn_relu_infer_fake, _conv_bn_relu_train_backward_fake,
                       _conv_bn_relu_train_fake)

    _autograd.register("resnext_kernels_emu")

    torch.library.register_fake("resnext_kernels_emu::conv_bn_relu_infer")(_conv_bn_relu_infer_fake)
    torch.library.register_fake("resnext_kernels_emu::conv_bn_relu_train")(_conv_bn_relu_train_fake)
    torch.library.register_fake("resnext_kernels_emu::conv_bn_relu_train_backward")(_conv_bn_relu_train_backward_fake)
    torch.library.register_fake("resnext_kernels_emu::bottleneck_infer")(_bottleneck_infer_fake)

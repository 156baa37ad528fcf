"""From the emulator's counts to a predicted kernel time on a GPU: a throughput model, small on purpose.

predicted time = the largest of
  * DRAM:   the launch's unique sectors x 32 B (its compulsory traffic) / DRAM bandwidth,
  * L2:     the sectors its warp instructions touch x 32 B / L2-to-SM bandwidth,
  * shared: shared-memory wavefronts / (SMs x clock): an SM's shared memory delivers one wavefront a cycle,
  * tensor: mma.sync FLOPs / the dense tensor-core rate of their type,
  * FP32:   CUDA-core multiply-adds x 2 / the FP32 rate,
with the SM-side terms (shared, tensor, FP32) divided by the grid's balance over the SMs (the average SM's blocks
over the busiest one's: fewer blocks than SMs leave some idle). Resident blocks per SM, from registers, shared
memory, threads and the block limit (ptxas's report gives the first two), are reported; the model assumes they
keep an SM's pipes busy.

What it ignores, and so how it errs: latency (a kernel with too few warps in flight to cover DRAM or L2 latency
runs slower than predicted), instruction issue (integer address arithmetic, which today's kernels spend a lot on),
the L1 cache (a re-read that hits L1 is counted at L2 here: pessimistic), DRAM efficiency below the peak (about
80-90% is reachable), clocks below the maximum boost under a power limit, and launch overhead (a few us). Expect
the prediction to be a lower bound that memory-bound, well-occupied kernels approach within ~1.3x, and that
latency- or issue-bound kernels miss by more. scripts/gpu_check.sh measures the truth and compares.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    clock_ghz: float          # the boost clock NVIDIA's peak rates are computed at
    dram_gbs: float
    l2_gbs: float
    fp32_tflops: float        # FMA = 2 FLOPs
    tensor_f16_tflops: float  # dense, f16/bf16 inputs, fp32 accumulation
    tensor_tf32_tflops: float
    smem_per_sm: int          # bytes of shared memory an SM can give its blocks
    smem_per_block: int       # the most one block may take
    sources: str
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    smem_reserved_per_block: int = 1024  # the runtime's own shared memory per block (sm_80 and newer)


GPUS = {
    "h100": GPU(
        name="H100 SXM5 80GB", sms=132, clock_ghz=1.98, dram_gbs=3350.0, l2_gbs=10100.0, fp32_tflops=66.9,
        tensor_f16_tflops=989.4, tensor_tf32_tflops=494.7, smem_per_sm=228 * 1024, smem_per_block=227 * 1024,
        sources="NVIDIA H100 datasheet and Hopper tuning guide (SMs, HBM3 3.35 TB/s, FP32 66.9, dense FP16 989.4 "
                "and TF32 494.7 TFLOPS, 228 KB shared memory per SM); L2 bandwidth is not published: A100's 5120 "
                "B/clk at 1.98 GHz is assumed. mma.sync cannot reach the dense peak on Hopper (that needs wgmma), "
                "so the tensor term is optimistic there."),
    "a100-80": GPU(
        name="A100 SXM4 80GB", sms=108, clock_ghz=1.41, dram_gbs=2039.0, l2_gbs=7219.0, fp32_tflops=19.5,
        tensor_f16_tflops=312.0, tensor_tf32_tflops=156.0, smem_per_sm=164 * 1024, smem_per_block=163 * 1024,
        sources="NVIDIA A100 datasheet and Ampere architecture whitepaper (108 SMs at 1.41 GHz, HBM2e 2.039 "
                "TB/s, FP32 19.5, dense FP16 312 and TF32 156 TFLOPS, L2 5120 B/clk, 164 KB shared memory per SM)"),
    "a100-40": GPU(
        name="A100 SXM4 40GB", sms=108, clock_ghz=1.41, dram_gbs=1555.0, l2_gbs=7219.0, fp32_tflops=19.5,
        tensor_f16_tflops=312.0, tensor_tf32_tflops=156.0, smem_per_sm=164 * 1024, smem_per_block=163 * 1024,
        sources="as a100-80, with HBM2 at 1.555 TB/s"),
}


@dataclasses.dataclass(frozen=True)
class Occupancy:
    blocks_per_sm: int
    limited_by: str
    sm_fraction: float  # the grid's balance over the SMs: average blocks per SM / the busiest SM's
    registers: int | None


def occupancy(gpu: GPU, threads: int, blocks: int, dynamic_smem: int, registers: int | None = None,
              static_smem: int = 0) -> Occupancy:
    """Resident blocks per SM and the busy fraction of the GPU's SMs for a launch of `blocks` blocks."""
    warps = math.ceil(threads / 32)
    limits = {"threads": gpu.threads_per_sm // (warps * 32), "block limit": gpu.blocks_per_sm}
    smem = dynamic_smem + static_smem
    limits["shared memory"] = (gpu.smem_per_sm // (smem + gpu.smem_reserved_per_block)
                               if smem <= gpu.smem_per_block else 0)
    if registers is not None:
        per_warp = math.ceil(registers * 32 / 256) * 256  # registers are allocated per warp in units of 256
        limits["registers"] = gpu.regs_per_sm // (per_warp * warps)
    limited_by = min(limits, key=limits.get)
    per_sm = limits[limited_by]
    if per_sm == 0 or blocks == 0:
        return Occupancy(per_sm, limited_by, 0.0, registers)
    # The busiest SM runs ceil(blocks / SMs) blocks, the average one blocks / SMs (fewer blocks than SMs: some idle).
    per_sm_avg = blocks / gpu.sms
    return Occupancy(per_sm, limited_by, per_sm_avg / math.ceil(per_sm_avg), registers)


@dataclasses.dataclass(frozen=True)
class Prediction:
    gpu: str
    us: float
    bound: str            # which term is the largest
    terms_us: dict        # every term
    occupancy: Occupancy

    def __str__(self) -> str:
        terms = ", ".join(f"{k} {v:.2f}" for k, v in self.terms_us.items())
        return f"{self.us:.2f} us on {self.gpu} ({self.bound}-bound; {terms})"


def predict(counts: dict, gpu: str | GPU = "h100", *, registers: int | None = None, static_smem: int = 0,
            fma: float = 0.0) -> Prediction:
    """Predicted time of one launch from its counters (a LaunchRecord's fields). `fma`: its CUDA-core multiply-adds
    (the emulator does not count arithmetic); `registers`/`static_smem`: from ptxas (occupancy)."""
    g = GPUS[gpu] if isinstance(gpu, str) else gpu
    threads = counts["block"][0] * counts["block"][1] * counts["block"][2]
    occ = occupancy(g, threads, counts["blocks"], counts["smem_bytes"], registers, static_smem)
    busy = max(occ.sm_fraction, 1e-9)
    sectors = counts["gld_sectors"] + counts["gst_sectors"] + counts["cp_async_sectors"]
    wavefronts = (counts["smem_ld_wavefronts"] + counts["smem_st_wavefronts"] + counts["ldmatrix_wavefronts"]
                  + counts["cp_async_smem_wavefronts"])
    tensor_flops_f16 = 2 * 16 * 8 * 16 * (counts["mma_m16n8k16_f16"] + counts["mma_m16n8k16_bf16"])
    tensor_flops_tf32 = 2 * 16 * 8 * 8 * counts["mma_m16n8k8_tf32"]
    terms = {
        "dram": (counts["dram_read_bytes_min"] + counts["dram_write_bytes_min"]) / (g.dram_gbs * 1e3),
        "l2": sectors * 32 / (g.l2_gbs * 1e3),
        "shared": wavefronts / (g.sms * g.clock_ghz * 1e3) / busy,
        "tensor": (tensor_flops_f16 / g.tensor_f16_tflops + tensor_flops_tf32 / g.tensor_tf32_tflops) / 1e6 / busy,
        "fp32": 2 * fma / (g.fp32_tflops * 1e6) / busy,
    }
    bound = max(terms, key=terms.get)
    return Prediction(g.name, terms[bound], bound, terms, occ)

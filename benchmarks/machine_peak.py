"""Machine peaks, the benchmarks' FLOP and byte models, the environment record, and the CUDA kernel's
design targets (the table in docs/cuda_kernels.md).

* Achievable GEMM peak: GFLOP/s of a large square ``torch.mm`` in the given dtype (fp32 by default; on CUDA
  TF32 stays off, PyTorch's default, so fp32 means fp32 FMA). Bandwidth peak: GB/s of ``y.copy_(x)`` on a
  large tensor, counting the bytes read plus the bytes written.
* FLOP model of a grouped KxK convolution: ``2 * N * C_out * OH * OW * (C_in / groups) * K * K``
  (BatchNorm and ReLU, a few operations per output element, are not counted). A training step
  (forward + backward) counts 3x: forward, input gradient, weight gradient.
* Byte model ("ideal traffic"): every tensor read or written once, in the benchmark's dtype:
  inference ``|x| + |w| + |y|``; training step ``3 * (|x| + |w| + |y|)`` (forward reads x, w and writes y;
  backward reads dy, the saved activation (size |y|), x and w, and writes dx and dw). BatchNorm's
  per-channel vectors are ignored. Real implementations move more (halo re-reads, the unfused
  sequence's intermediates), so the achieved GB/s is a lower bound of the true traffic.

usage: python benchmarks/machine_peak.py [--cpu] [--quick]       measure and print the peaks + environment
       python benchmarks/machine_peak.py --design-table [--bandwidth-tbs 3.35 --fp32-tflops 67]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.utils.benchmark as tb

GROUPS = 32


# ----------------------------------------------------------------------------------------------------
# FLOP and byte models
# ----------------------------------------------------------------------------------------------------

def out_size(size: int, stride: int, k: int = 3, pad: int = 1) -> int:
    return (size + 2 * pad - k) // stride + 1


def conv_flops(n: int, c_in: int, c_out: int, hw: int, stride: int, groups: int = GROUPS, k: int = 3,
               training: bool = False) -> int:
    o = out_size(hw, stride, k)
    return 2 * n * c_out * o * o * (c_in // groups) * k * k * (3 if training else 1)


def conv_bytes(n: int, c_in: int, c_out: int, hw: int, stride: int, elem_size: int, groups: int = GROUPS,
               k: int = 3, training: bool = False) -> int:
    o = out_size(hw, stride, k)
    x, w, y = n * c_in * hw * hw, c_out * (c_in // groups) * k * k, n * c_out * o * o
    return (x + w + y) * elem_size * (3 if training else 1)


# ----------------------------------------------------------------------------------------------------
# Peaks
# ----------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gemm_gflops(device: torch.device, dtype: torch.dtype, n: int, min_run_time: float) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    _sync(device)
    timer = tb.Timer("torch.mm(a, b, out=out)", globals={"torch": torch, "a": a, "b": b, "out": out},
                     num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return 2 * n ** 3 / min(m.times) / 1e9  # best block: the achievable rate


def copy_gbs(device: torch.device, nbytes: int, min_run_time: float) -> float:
    x = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    timer = tb.Timer("y.copy_(x)", globals={"x": x, "y": y}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return 2 * x.numel() * 4 / min(m.times) / 1e9  # read + write


def measure_peaks(device: torch.device, dtypes, quick: bool = False) -> dict:
    """{"gflops": {dtype name: GFLOP/s}, "gbs": GB/s, "how": description} measured on ``device``."""
    cuda = device.type == "cuda"
    n = (4096 if quick else 8192) if cuda else (1024 if quick else 2048)
    nbytes = (256 << 20 if quick else 1 << 30) if cuda else (64 << 20 if quick else 256 << 20)
    run_time = 0.1 if quick else 0.5
    gflops = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        try:
            gflops[name] = gemm_gflops(device, dtype, n, run_time)
        except RuntimeError as e:  # e.g. a dtype without a GEMM on this device
            print(f"# peak: torch.mm in {name} failed ({e}); using float32's", flush=True)
    gflops.setdefault("float32", gemm_gflops(device, torch.float32, n, run_time))
    for name in dtypes:
        gflops.setdefault(name, gflops["float32"])
    gbs = copy_gbs(device, nbytes, run_time)
    how = (f"measured: torch.mm {n}x{n} per dtype (best block; TF32 off), y.copy_(x) of {nbytes >> 20} MiB "
           f"fp32 (read + write)")
    return {"gflops": gflops, "gbs": gbs, "how": how}


def parse_peak_override(text: str | None, dtypes) -> dict | None:
    """``--peak-gflops 90`` (every dtype) or ``--peak-gflops float32=90,bfloat16=200``."""
    if not text:
        return None
    if "=" not in text:
        return {d: float(text) for d in dtypes}
    out = {}
    for part in text.split(","):
        key, value = part.split("=")
        out[key.strip()] = float(value)
    return out


# ----------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    import record
    return record.machine(torch.device("cpu"))["cpu"]


def environment(device: torch.device) -> dict:
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "-",
        "cpu": cpu_model(),
        "cpu count": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
        "cudnn": str(torch.backends.cudnn.version()) if device.type == "cuda" else "-",
    }
    try:
        import resnext_kernels.info as info
        env.update({f"resnext_kernels: {k}": str(v) for k, v in info.summary().items()})
    except Exception as e:  # pragma: no cover - broken install
        env["resnext_kernels"] = f"info unavailable: {e}"
    return env


def write_csv(path: str, rows: list[dict], fields: list[str]) -> None:
    """The benchmark rows as CSV (columns `fields`; other keys of a row are left out)."""
    import csv
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    """A markdown table of the rows' `cols` (missing values empty)."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# Design targets of the CUDA kernel (csrc/cuda/kernels/conv_bn_relu_fwd.cuh)
# ----------------------------------------------------------------------------------------------------

RESNEXT50_STAGES = [("stage1", 128, 56, 1), ("stage2", 256, 28, 1), ("stage3", 512, 14, 1), ("stage4", 1024, 7, 1),
                    ("stage2-s2", 256, 56, 2), ("stage3-s2", 512, 28, 2), ("stage4-s2", 1024, 14, 2)]


def design_rows(n: int = 32, bandwidth_tbs: float = 3.35, fp32_tflops: float = 67.0, lds_fraction: float = 1 / 8):
    """Per ResNeXt-50 stage shape: FLOPs, DRAM bytes of the fused kernel and of the unfused sequence
    (ideal: each tensor once, weights and halos from L2), and the resulting time bounds."""
    rows = []
    for name, c, hw, s in RESNEXT50_STAGES:
        o = out_size(hw, s)
        x, y = n * c * hw * hw, n * c * o * o
        flops = conv_flops(n, c, c, hw, s)
        tiles = (-(-o // 8)) ** 2
        row = {"shape": f"{name} C={c} {hw}x{hw} s{s}", "GFLOP": flops / 1e9,
               "blocks": n * tiles * (c // 32), "lane_util": o * o / (tiles * 64)}
        # threads of a tile's pixels outside the image still run the loop: the issue bounds scale by 1/lane_util
        row["flop_us"] = flops / (fp32_tflops * 1e12) * 1e6 / row["lane_util"]
        row["lds_us"] = flops / (fp32_tflops * lds_fraction * 1e12) * 1e6 / row["lane_util"]
        for dt, size in (("fp32", 4), ("fp16", 2)):
            fused, unfused = (x + y) * size, (x + 5 * y) * size
            row[f"fused_MB_{dt}"] = fused / 1e6
            row[f"unfused_MB_{dt}"] = unfused / 1e6
            row[f"fused_us_{dt}"] = fused / (bandwidth_tbs * 1e12) * 1e6
            row[f"unfused_us_{dt}"] = unfused / (bandwidth_tbs * 1e12) * 1e6
        rows.append(row)
    return rows


def design_table(n: int = 32, bandwidth_tbs: float = 3.35, fp32_tflops: float = 67.0) -> str:
    lines = [f"| shape (N={n}) | GFLOP | fused MB fp32 / fp16 | unfused MB fp32 / fp16 | "
             f"fused DRAM bound us fp32 / fp16 | unfused DRAM bound us fp32 / fp16 | FP32 FMA bound us | "
             f"LDS-issue bound us | blocks | lanes used |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in design_rows(n, bandwidth_tbs, fp32_tflops):
        lines.append(f"| {r['shape']} | {r['GFLOP']:.2f} | {r['fused_MB_fp32']:.0f} / {r['fused_MB_fp16']:.0f} | "
                     f"{r['unfused_MB_fp32']:.0f} / {r['unfused_MB_fp16']:.0f} | "
                     f"{r['fused_us_fp32']:.1f} / {r['fused_us_fp16']:.1f} | "
                     f"{r['unfused_us_fp32']:.1f} / {r['unfused_us_fp16']:.1f} | {r['flop_us']:.1f} | "
                     f"{r['lds_us']:.0f} | {r['blocks']} | {r['lane_util']:.0%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--design-table", action="store_true", help="print the CUDA kernel's design-target table")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--bandwidth-tbs", type=float, default=3.35, help="DRAM bandwidth (H100 SXM: 3.35 TB/s)")
    parser.add_argument("--fp32-tflops", type=float, default=67.0, help="FP32 FMA peak (H100 SXM: 67 TFLOP/s)")
    args = parser.parse_args(argv)
    if args.design_table:
        print(design_table(args.batch, args.bandwidth_tbs, args.fp32_tflops))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtypes = ["float32", "bfloat16"] + (["float16"] if device.type == "cuda" else [])
    peaks = measure_peaks(device, dtypes, args.quick)
    print(json.dumps({"environment": environment(device), "peaks": peaks}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

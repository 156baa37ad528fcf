"""``python -m resnext_kernels.emulator profile``: the emulator's counters and predicted GPU times for the project's
CUDA kernels at the grouped 3x3 layers of ResNeXt-50 32x4d and ResNeXt-101 32x8d.

Each (shape, dtype, form) runs through the emulated ops twice, at N = 2 and N = 4, and every counter is
extrapolated linearly to --batch: exact where an image is a whole number of every kernel's blocks and the batch a
multiple of the images a block takes (two 7x7 images share a tensor-core CTA), as the kernels' work is then affine
in N; otherwise off by less than one block per launch (the statistics kernels' row blocks at 56x56, 28x28, 7x7);
--exact runs --batch itself instead (slow). The tensor-core weight gradient always runs at --batch itself (through
resnext_kernels_emu::conv_weight_grad_tc, the counts do not depend on the values): it chooses its number of pixel
chunks from the batch, to fill the GPU within a budget of partial sums, so its launches are not affine in N. Per
kernel launch it prints the sector efficiency of global loads and stores (distinct bytes asked for / bytes of the
sectors touched), shared-memory wavefronts per request and the share of them that bank
conflicts add, the launch's compulsory DRAM traffic, and the predicted time on a GPU (gpu_model) with the term that
bounds it; per form, the sum over its kernels against the layer's compulsory bound (its tensors read and written
once at the GPU's DRAM bandwidth) and its tensor-core bound (its multiply-adds at the dense fp16 or tf32 rate).

Forms: inference (conv_bn_relu_infer), training (conv_bn_relu_train: the forward with batch statistics), backward
(conv_bn_relu_train_backward with torch.use_deterministic_algorithms on, so the project's weight-gradient kernels
run; the data gradient is the tensor-core forward kernel at stride 1, ATen's otherwise: not emulated, not in the
sum).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from . import LaunchRecord, counters_available, gpu_model, profile
from .ptxas import read as read_ptxas

GROUPS = 32
FORMS = ("inference", "training", "backward")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ARCH_OF_GPU = {"h100": "sm_90", "a100-80": "sm_80", "a100-40": "sm_80"}


def shapes() -> list[tuple[str, int, int, int]]:
    """(name, channels, input size, stride) of the grouped 3x3 convolutions (32 groups): each stage at stride 1,
    and the stride-2 first blocks of stages 2-4."""
    out = []
    for model, widths in (("x50", (128, 256, 512, 1024)), ("x101", (256, 512, 1024, 2048))):
        for i, (c, hw) in enumerate(zip(widths, (56, 28, 14, 7))):
            out.append((f"{model}.stage{i + 1}", c, hw, 1))
        for i, (c, hw) in enumerate(zip(widths[1:], (56, 28, 14))):
            out.append((f"{model}.stage{i + 2}.s2", c, hw, 2))
    return out


def _run_form(form: str, n: int, c: int, hw: int, stride: int, dtype: torch.dtype) -> list[LaunchRecord]:
    ops = torch.ops.resnext_kernels_emu
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c, c // GROUPS, 3, 3, generator=gen) * 0.2).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    conv = ([stride, stride], [1, 1], [1, 1], GROUPS, True)
    if form == "inference":  # the weight packing is cached across calls: not part of a call
        records = profile(ops.conv_bn_relu_infer, x, w, torch.ones(c, dtype=acc), torch.zeros(c, dtype=acc), *conv)
        return [r for r in records if "pack_weight" not in r.kernel]
    if form == "training":
        return profile(ops.conv_bn_relu_train, x, w, None, None, 1e-5, *conv)
    out, conv_out, mean, var = ops.conv_bn_relu_train(x, w, None, None, 1e-5, *conv)
    grad = torch.randn(out.shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return profile(ops.conv_bn_relu_train_backward, grad, x, w, conv_out, mean, var, None, None, 1e-5, *conv,
                       [True, True, True])
    finally:
        torch.use_deterministic_algorithms(deterministic)


_NUMERIC = [f.name for f in dataclasses.fields(LaunchRecord)
            if f.name not in ("kernel", "symbol", "grid", "block", "gld_requests_by_width", "gst_requests_by_width")]


BASE_BATCHES = (2, 4)
NOT_AFFINE = ("conv_wgrad_tc",)  # kernels run at the batch itself, never extrapolated (see the module docstring)


def _run_weight_grad(n: int, c: int, hw: int, stride: int, dtype: torch.dtype) -> list[LaunchRecord]:
    """The tensor-core weight gradient's launches at batch n, as the backward form makes them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, c // GROUPS, 3, 3, generator=gen).to(dtype)
    out = (hw + 2 - 3) // stride + 1
    grad_y = torch.randn(n, c, out, out, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    return profile(torch.ops.resnext_kernels_emu.conv_weight_grad_tc, grad_y, x, w, [stride, stride], [1, 1],
                   [1, 1], GROUPS)


def records_at(form: str, n: int, c: int, hw: int, stride: int, dtype: torch.dtype) -> list[LaunchRecord]:
    """The form's launches at batch n: extrapolated from BASE_BATCHES, but the NOT_AFFINE kernels (the last
    launches of the backward form) run at n."""
    full = [_run_form(form, b, c, hw, stride, dtype) for b in BASE_BATCHES]
    runs = [[r for r in rs if not any(k in r.kernel for k in NOT_AFFINE)] for rs in full]
    records = [extrapolate(a, b, n) for a, b in zip(*runs)]
    if len(runs[0]) != len(full[0]):
        records += _run_weight_grad(n, c, hw, stride, dtype)
    return records


def extrapolate(r1: LaunchRecord, r2: LaunchRecord, n: int, batches: tuple[int, int] = BASE_BATCHES) -> LaunchRecord:
    """Counts at batch n from those at the two base batches (affine in the batch)."""
    if (r1.kernel, r1.block) != (r2.kernel, r2.block):
        raise RuntimeError(f"launch sequences differ between N={batches[0]} and N={batches[1]}: "
                           f"{r1.kernel} vs {r2.kernel}")
    b1, b2 = batches

    def at(a, b):
        value = a + (n - b1) * (b - a) / (b2 - b1)
        return int(round(value)) if isinstance(a, int) else value

    d = r1.as_dict()
    for name in _NUMERIC:
        d[name] = at(getattr(r1, name), getattr(r2, name))
    d["grid"] = tuple(at(a, b) for a, b in zip(r1.grid, r2.grid))
    for key in ("gld_requests_by_width", "gst_requests_by_width"):
        m1, m2 = getattr(r1, key), getattr(r2, key)
        d[key] = {w: at(m1.get(w, 0), m2.get(w, 0)) for w in sorted(set(m1) | set(m2))}
    return LaunchRecord(**d)


def cuda_core_macs(kernel: str, n: int, c: int, hw: int, stride: int) -> float:
    """Multiply-adds the direct-convolution kernels do on CUDA cores (they skip other groups' channels); the other
    kernels' arithmetic is a few operations per element and is left out."""
    if "conv_bn_relu_fwd_kernel" in kernel or "weight_grad_partial_kernel" in kernel:
        out = (hw + 2 - 3) // stride + 1
        return float(n) * out * out * c * 9 * (c // GROUPS)
    return 0.0


def layer_bounds(form: str, n: int, c: int, hw: int, stride: int, dtype: torch.dtype, gpu: gpu_model.GPU):
    """(compulsory us, tensor-core us) of the layer: its tensors once at DRAM bandwidth; its MACs at the dense rate."""
    e = torch.empty((), dtype=dtype).element_size()
    out = (hw + 2 - 3) // stride + 1
    x, y, w = n * c * hw * hw * e, n * c * out * out * e, c * (c // GROUPS) * 9 * e
    # Training: out needs the statistics of every tile, so y (saved for the backward) is written and read back
    # before out is written: x + w + 3y for any kernel sequence whose tiles do not all fit on chip at once.
    moved = {"inference": x + w + y, "training": x + w + 3 * y, "backward": 2 * y + x + w}[form]
    macs = n * out * out * c * 9 * (c // GROUPS)  # the forward's, or (backward) the weight gradient's
    rate = gpu.tensor_f16_tflops if dtype in (torch.float16, torch.bfloat16) else gpu.tensor_tf32_tflops
    return moved / (gpu.dram_gbs * 1e3), 2 * macs / (rate * 1e6), moved


def _ptxas(path: str | None):
    if path and os.path.exists(path):
        return read_ptxas(path)
    return {}


def _fmt(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}"


def run(args) -> int:
    if not counters_available():
        print("resnext_kernels.emulator profile: this build has no emulator counters (build without "
              "RESNEXT_KERNELS_SANITIZE, with the CUDA headers present)", file=sys.stderr)
        return 1
    wanted = set(args.shapes.split(",")) if args.shapes else None
    models = set(args.models.split(","))
    selected = [s for s in shapes() if s[0].split(".")[0] in models and
                (wanted is None or s[0] in wanted or s[0].split(".", 1)[1] in wanted)]
    forms = args.forms.split(",")
    gpus = args.gpus.split(",")
    ptxas = _ptxas(args.ptxas_log)
    rows, summaries = [], []
    start = time.time()
    for name, c, hw, stride in selected:
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            for form in forms:
                if args.exact:
                    records = _run_form(form, args.batch, c, hw, stride, dtype)
                else:
                    records = records_at(form, args.batch, c, hw, stride, dtype)
                for gpu_key in gpus:
                    gpu = gpu_model.GPUS[gpu_key]
                    total = 0.0
                    for r in records:
                        info = ptxas.get((r.symbol, ARCH_OF_GPU[gpu_key]), {})
                        p = r.predict(gpu_key, registers=info.get("regs"), static_smem=info.get("smem") or 0,
                                      fma=cuda_core_macs(r.kernel, args.batch, c, hw, stride))
                        total += p.us
                        rows.append({"shape": name, "dtype": dtype_name, "form": form, "gpu": gpu_key,
                                     "kernel": r.kernel, "blocks": r.blocks, "registers": info.get("regs"),
                                     "gld_efficiency": r.gld_efficiency, "gst_efficiency": r.gst_efficiency,
                                     "wavefronts_per_request": r.wavefronts_per_request,
                                     "conflict_share": (r.smem_conflict_wavefronts / r.smem_wavefronts
                                                        if r.smem_wavefronts else 0.0),
                                     "gst_bytes": r.gst_bytes, "dram_bytes_min": r.dram_bytes_min,
                                     "mma": r.mma, "diverged_requests": r.diverged_requests,
                                     "requests": r.requests, "predicted_us": p.us, "bound": p.bound,
                                     "terms_us": p.terms_us, "blocks_per_sm": p.occupancy.blocks_per_sm,
                                     "occupancy_limit": p.occupancy.limited_by, "counts": r.as_dict()})
                    compulsory, tensor, moved = layer_bounds(form, args.batch, c, hw, stride, dtype, gpu)
                    summaries.append({"shape": name, "dtype": dtype_name, "form": form, "gpu": gpu_key,
                                      "kernels": len(records), "predicted_us": total,
                                      "compulsory_us": compulsory, "tensor_us": tensor, "compulsory_bytes": moved,
                                      "ratio": total / max(compulsory, tensor)})
    _print(rows, summaries, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "rows": rows, "summaries": summaries,
                       "gpus": {k: dataclasses.asdict(gpu_model.GPUS[k]) for k in gpus},
                       "ptxas_log": args.ptxas_log if ptxas else None}, f, indent=1)
    how = " exact" if args.exact else f", extrapolated from N={BASE_BATCHES[0]} and N={BASE_BATCHES[1]}"
    print(f"\n({len(rows)} launches profiled in {time.time() - start:.0f} s; N={args.batch}{how}; registers "
          f"{'from ' + args.ptxas_log if ptxas else 'unknown (no ptxas report): occupancy from shared memory only'})")
    return 0


def _print(rows, summaries, args) -> None:
    md = args.format == "markdown"
    head = ["shape", "dtype", "form", "kernel", "blocks", "regs", "gld eff", "gst eff", "wavefr/req", "conflicts",
            "DRAM min MB", "predicted us", "bound"]
    lines = []
    for r in rows:
        kernel = r["kernel"].replace("rk::cuda_kernels::", "")
        lines.append([r["shape"], r["dtype"], r["form"], kernel, str(r["blocks"]), str(r["registers"] or "?"),
                      f"{100 * r['gld_efficiency']:.0f}%", f"{100 * r['gst_efficiency']:.0f}%",
                      _fmt(r["wavefronts_per_request"]), f"{100 * r['conflict_share']:.0f}%",
                      _fmt(r["dram_bytes_min"] / 1e6), _fmt(r["predicted_us"]), r["bound"]])
    _table(head, lines, md)
    print()
    head = ["shape", "dtype", "form", "GPU", "kernels", "predicted us", "compulsory us", "tensor us",
            "predicted / max(bounds)"]
    lines = [[s["shape"], s["dtype"], s["form"], s["gpu"], str(s["kernels"]), _fmt(s["predicted_us"]),
              _fmt(s["compulsory_us"]), _fmt(s["tensor_us"]), _fmt(s["ratio"], 1) + "x"] for s in summaries]
    _table(head, lines, md)


def _table(head, lines, md) -> None:
    if md:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for line in lines:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for line in lines:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnext_kernels.emulator",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("profile", help="counters and predicted times of the CUDA kernels at ResNeXt's layers")
    p.add_argument("--models", default="x50,x101", help="x50, x101 or both (default)")
    p.add_argument("--shapes", default=None, help="e.g. stage1,stage3,stage4.s2 or x50.stage1 (default: all)")
    p.add_argument("--dtypes", default="float16", help="comma-separated: float16, bfloat16, float32")
    p.add_argument("--forms", default="inference,training,backward")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--exact", action="store_true", help="run at --batch instead of extrapolating from N=1, 2")
    p.add_argument("--gpus", default="h100", help=f"comma-separated: {', '.join(gpu_model.GPUS)}")
    p.add_argument("--ptxas-log", default=os.path.join("logs", "build.log"),
                   help="the build log with nvcc's ptxas report (registers and static shared memory)")
    p.add_argument("--format", choices=("text", "markdown"), default="text")
    p.add_argument("--json", default=None, help="also write every row and summary to this file")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

"""Kernel microbenchmark: the fused grouped conv + BN + ReLU against PyTorch's eager
Conv2d -> BatchNorm2d -> ReLU at the grouped 3x3 convolutions of ResNeXt-50 32x4d, on the device at hand
(CUDA when present, CPU otherwise).

Every row first checks the fused output against the eager module (a fast wrong kernel is reported, not
timed), then times both with torch.utils.benchmark (median and interquartile range of repeated runs)
in the same process, and prints the ratio eager / fused (> 1 means the fused kernel is faster).
Results go to benchmarks/results/kernels{,_training}.{csv,md}.

With --mode training the rows time a training step of the module (forward with batch statistics and
backward), checking the output and the input gradient first.

usage: python benchmarks/bench_kernels.py [--quick] [--batch 8] [--dtype float32] [--layout channels_last]
                                          [--mode inference|training]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time

import torch
import torch.utils.benchmark as tb
from torch import nn

import resnext_kernels as rk

# (name, channels, input size, stride): ResNeXt-50 32x4d grouped 3x3 convs (32 groups), stride 1 and
# the stride-2 first block of stages 2-4 (whose input has twice the spatial size).
STAGES = [
    ("stage1", 128, 56, 1),
    ("stage2", 256, 28, 1),
    ("stage3", 512, 14, 1),
    ("stage4", 1024, 7, 1),
    ("stage2-s2", 256, 56, 2),
    ("stage3-s2", 512, 28, 2),
    ("stage4-s2", 1024, 14, 2),
]
GROUPS = 32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def eager_module(channels, stride, device, dtype):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(channels, channels, 3, stride, 1, groups=GROUPS, bias=False),
                      nn.BatchNorm2d(channels), nn.ReLU())
    with torch.no_grad():
        m[1].running_mean.normal_(0, 0.2)
        m[1].running_var.uniform_(0.5, 1.5)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.normal_(0, 0.2)
    return m.eval().to(device=device, dtype=dtype)


def fused_module(eager, channels, stride, device, dtype):
    m = rk.nn.FusedGroupedConvBNReLU(channels, channels, stride=stride, groups=GROUPS)
    m.load_state_dict(eager.state_dict())
    return m.eval().to(device=device, dtype=dtype)


def time_fn(fn, x, min_run_time):
    timer = tb.Timer(stmt="fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return m.median, m.iqr


def check(fused_out, eager_out, dtype):
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    err = ((fused_out.float() - eager_out.float()).abs().max() / eager_out.float().abs().max().clamp_min(1e-12))
    return err.item(), err.item() <= tol


def run(args):
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = DTYPES[args.dtype]
    memory_format = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    stages = STAGES[:2] if args.quick else STAGES
    rows = []
    print(f"# fused grouped conv3x3+BN+ReLU vs eager ({args.mode}), {device.type}, N={args.batch}, {args.dtype}, "
          f"{args.layout}, groups={GROUPS}, threads={torch.get_num_threads()}", flush=True)
    for i, (name, channels, size, stride) in enumerate(stages):
        eager = eager_module(channels, stride, device, dtype)
        fused = fused_module(eager, channels, stride, device, dtype)
        x = torch.randn(args.batch, channels, size, size, device=device, dtype=dtype)
        x = x.contiguous(memory_format=memory_format)
        training = args.mode == "training"
        row = {"shape": name, "C": channels, "HW": size, "stride": stride, "N": args.batch, "dtype": args.dtype,
               "layout": args.layout, "device": device.type, "mode": args.mode}
        if training:
            eager.train()
            fused.train()
            x.requires_grad_()
            grad = None

            def step(module, x=x):
                nonlocal grad
                out = module(x)
                grad = torch.ones_like(out) if grad is None else grad
                out.backward(grad)
                return out

            row["path"] = fused.explain(x).path
            out_f = step(fused)
            gx_f, x.grad = x.grad.clone(), None
            out_e = step(eager)
            err, ok = check(out_f.detach(), out_e.detach(), dtype)
            err_g, ok_g = check(gx_f, x.grad, dtype)
            err, ok = max(err, err_g), ok and ok_g
            run_eager, run_fused = (lambda _x: step(eager)), (lambda _x: step(fused))
        else:
            with torch.no_grad():
                row["path"] = fused.explain(x).path
                err, ok = check(fused(x), eager(x), dtype)

            def no_grad(module):
                def run(inp):
                    with torch.no_grad():
                        return module(inp)
                return run

            run_eager, run_fused = no_grad(eager), no_grad(fused)
        row["max_rel_err"] = f"{err:.2e}"
        if not ok:
            row.update(status="WRONG RESULT (not timed)")
            print(f"[{i + 1}/{len(stages)}] {name}: WRONG RESULT, rel err {err:.2e}", flush=True)
            rows.append(row)
            continue
        t_eager, iqr_eager = time_fn(run_eager, x, args.min_run_time)
        t_fused, iqr_fused = time_fn(run_fused, x, args.min_run_time)
        decision = row["path"]
        out_hw = (size - 1) // stride + 1
        flops = 2 * args.batch * channels * out_hw * out_hw * (channels // GROUPS) * 9 * (3 if training else 1)
        row.update(status="ok", eager_ms=f"{t_eager * 1e3:.3f}", eager_iqr_ms=f"{iqr_eager * 1e3:.3f}",
                   fused_ms=f"{t_fused * 1e3:.3f}", fused_iqr_ms=f"{iqr_fused * 1e3:.3f}",
                   ratio_vs_eager=f"{t_eager / t_fused:.2f}", fused_gflops=f"{flops / t_fused / 1e9:.1f}")
        rows.append(row)
        print(f"[{i + 1}/{len(stages)}] {name:10s} eager {t_eager * 1e3:8.3f} ms  fused {t_fused * 1e3:8.3f} ms"
              f"  ratio {t_eager / t_fused:5.2f}x  ({row['fused_gflops']} GFLOP/s, path {decision})",
              flush=True)
    return rows


def write_results(rows, out_dir, mode):
    os.makedirs(out_dir, exist_ok=True)
    stem = "kernels" if mode == "inference" else f"kernels_{mode}"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(out_dir, f"{stem}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(f"<!-- {time.strftime('%Y-%m-%d %H:%M')} {platform.processor() or platform.machine()}, "
                f"torch {torch.__version__}, threads {torch.get_num_threads()} -->\n")
        f.write("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
        for r in rows:
            f.write("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |\n")
    print(f"results: {out_dir}/{stem}.csv, {stem}.md")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two shapes, short timing (CI smoke test)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--layout", choices=["channels_last", "nchw"], default="channels_last")
    parser.add_argument("--cpu", action="store_true", help="benchmark on CPU even when CUDA is present")
    parser.add_argument("--mode", choices=["inference", "training"], default="inference",
                        help="inference (eval, no grad) or a training step (forward + backward)")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per row and variant")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if args.min_run_time is None:
        args.min_run_time = 0.2 if args.quick else 1.0
    rows = run(args)
    write_results(rows, args.out, args.mode)
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

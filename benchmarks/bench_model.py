"""Model benchmark: images per second of resnext_kernels' models against torchvision's, inference and
training step, measured in the same process (median of repeated timed runs, after warm-up). With
``--compile`` the torchvision model under torch.compile is added as a third contender.

usage: python benchmarks/bench_model.py [--model resnext50_32x4d] [--batch 8] [--size 224] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

import resnext_kernels as rk


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(step, device, repeats, warmup=2):
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnext50_32x4d")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the torchvision model")
    parser.add_argument("--no-train", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.manual_seed(0)
    ref = getattr(torchvision.models, args.model)().to(device).to(memory_format=torch.channels_last)
    ours = getattr(rk.models, args.model)().to(device).to(memory_format=torch.channels_last)
    ours.load_state_dict(ref.state_dict())
    contenders = {"torchvision": ref, "resnext_kernels": ours}
    if args.compile:
        contenders["torchvision+compile"] = torch.compile(ref)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    print(f"# {args.model}, {device.type}, batch {args.batch}, {args.size}x{args.size}, channels_last, "
          f"threads {torch.get_num_threads()}, median of {args.repeats}")
    results = {}
    for mode in ("eval",) + (() if args.no_train else ("train",)):
        for name, model in contenders.items():
            if mode == "eval":
                model.eval()

                def step(model=model):
                    with torch.no_grad():
                        model(x)
            else:
                model.train()

                def step(model=model):
                    model.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x), target).backward()
            med, lo, hi = time_step(step, device, args.repeats)
            results[(mode, name)] = med
            print(f"{mode:5s} {name:20s} {args.batch / med:8.2f} img/s   (median {med * 1e3:.1f} ms, "
                  f"range {lo * 1e3:.1f}-{hi * 1e3:.1f} ms)", flush=True)
        base = results[(mode, "torchvision")]
        print(f"{mode:5s} ratio resnext_kernels / torchvision: {base / results[(mode, 'resnext_kernels')]:.2f}x")
    with torch.no_grad():
        ref.eval()
        ours.eval()
        err = ((ours(x) - ref(x)).abs().max() / ref(x).abs().max()).item()
    print(f"eval output max relative difference vs torchvision: {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

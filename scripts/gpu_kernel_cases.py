"""Runs every CUDA kernel of the project once, in the order `python -m resnext_kernels.emulator profile` runs them
(inference; training forward; backward with the deterministic weight-gradient kernels), for
scripts/gpu_check.sh: under compute-sanitizer (small shapes) and Nsight Compute (one ResNeXt layer).

usage: python scripts/gpu_kernel_cases.py [--shape x50.stage3] [--batch 32] [--dtype float16] [--small] [--list]
  --small: a few tiny layers (every kernel, odd sizes, stride 2) instead of --shape; --list: print the launches
  that would run and exit (no GPU needed).
"""

import argparse
import sys

import torch

FORMS = ("inference", "training", "backward")
SMALL = [(64, 9, 1, 3), (128, 6, 2, 2), (96, 5, 1, 1)]  # (channels, input size, stride, batch): 32 groups


def layer(shape):
    from resnext_kernels.emulator.__main__ import shapes
    for name, c, hw, stride in shapes():
        if name == shape:
            return c, hw, stride
    raise SystemExit(f"unknown shape {shape!r}")


def run(c, hw, stride, n, dtype, device):
    """The three forms on one layer, through the raw ops (so the launches are exactly the project's kernels)."""
    ops = torch.ops.resnext_kernels
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=gen).to(dtype).to(device).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c, c // 32, 3, 3, generator=gen) * 0.2).to(dtype).to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    conv = ([stride, stride], [1, 1], [1, 1], 32, True)
    ops.conv_bn_relu_infer(x, w, torch.ones(c, dtype=acc, device=device), torch.zeros(c, dtype=acc, device=device),
                           *conv)
    out, conv_out, mean, var = ops.conv_bn_relu_train(x, w, None, None, 1e-5, *conv)
    grad = torch.randn(out.shape, generator=gen).to(dtype).to(device).contiguous(memory_format=torch.channels_last)
    torch.use_deterministic_algorithms(True)
    try:
        ops.conv_bn_relu_train_backward(grad, x, w, conv_out, mean, var, None, None, 1e-5, *conv, [True, True, True])
    finally:
        torch.use_deterministic_algorithms(False)
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="x50.stage3")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32", "float64"))
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    import resnext_kernels  # noqa: F401  (registers the ops)
    dtype = getattr(torch, args.dtype)
    cases = [(c, hw, s, n) for c, hw, s, n in SMALL] if args.small else [(*layer(args.shape), args.batch)]
    if args.list:
        for c, hw, s, n in cases:
            print(f"C={c} {hw}x{hw} stride {s} N={n} {args.dtype}: " + ", ".join(FORMS))
        return 0
    if not torch.cuda.is_available():
        print("gpu_kernel_cases: no CUDA device", file=sys.stderr)
        return 1
    for c, hw, s, n in cases:
        run(c, hw, s, n, dtype, torch.device("cuda"))
    print(f"gpu_kernel_cases: {len(cases)} layer(s), every kernel ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())

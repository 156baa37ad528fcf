"""Train a small ResNeXt (the paper's CIFAR ResNeXt, scaled down, one input channel) on Fashion-MNIST,
offline, with the fused kernels, and optionally the same architecture from plain torch.nn layers.

The data are the IDX files of Debian's `dataset-fashion-mnist` package (`apt-get install
dataset-fashion-mnist`, installed under /usr/share/datasets/fashion-mnist); `--data-dir` points elsewhere.

examples:
  python examples/train_fashion_mnist.py --epochs 2                  # fused model
  python examples/train_fashion_mnist.py --epochs 2 --reference      # the torch.nn reference
  python examples/train_fashion_mnist.py --epochs 2 --compare        # both, then one plot of both
  torchrun --nproc-per-node 2 examples/train_fashion_mnist.py --distributed   # DDP (gloo on CPU)
  torchrun --nproc-per-node 2 examples/train_fashion_mnist.py --distributed --sync-bn   # + synchronized BN

Each run writes <out>/history_<variant>.json, <out>/checkpoint_<variant>.pt (resumable with --resume) and
<out>/curves.png (loss and accuracy of every history in <out>).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import resnext_kernels as rk

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
MEAN, STD = 0.2860, 0.3530


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (gzip or plain): big-endian magic (0, 0, dtype, ndim), then the dims, then data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != math.prod(dims):
        raise ValueError(f"{path}: expected {math.prod(dims)} values for shape {dims}, found {payload.size}")
    return payload.reshape(dims)


def load_split(data_dir: str, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    images_file, labels_file = (os.path.join(data_dir, f) for f in FILES[split])
    missing = [p for p in (images_file, labels_file) if not os.path.exists(p)]
    if missing:
        sys.exit(f"Fashion-MNIST files not found: {', '.join(missing)}.\n"
                 "Install them with `apt-get install dataset-fashion-mnist` (Debian) or pass --data-dir "
                 "pointing at a folder with the four IDX files.")
    images = torch.from_numpy(read_idx(images_file).copy()).float().div_(255).sub_(MEAN).div_(STD).unsqueeze(1)
    labels = torch.from_numpy(read_idx(labels_file).astype(np.int64))
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random 2-pixel translation (zero padding), per image."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2))
    dy, dx = torch.randint(0, 5, (2, n), generator=gen)
    rows = torch.arange(28).view(1, 28) + dy.view(-1, 1)
    cols = torch.arange(28).view(1, 28) + dx.view(-1, 1)
    return padded[torch.arange(n).view(-1, 1, 1), 0, rows.view(n, 28, 1), cols.view(n, 1, 28)].unsqueeze(1)


def build_model(fused: bool) -> torch.nn.Module:
    """ResNeXt-11 (4x4d), stage widths 64/128/256, for 28x28 grey images: 55k parameters."""
    return rk.models.CifarResNeXt(cardinality=4, base_width=4, depth=11, num_classes=10, in_channels=1,
                                  stem_channels=16, stage_planes=(16, 32, 64), fused=fused)


class Progress:
    """A one-line progress bar on a terminal, a line every 10% otherwise."""

    def __init__(self, total: int, prefix: str, enabled: bool) -> None:
        self.total, self.prefix, self.enabled = total, prefix, enabled
        self.tty = sys.stderr.isatty()
        self.last_decile = -1
        self.start = time.perf_counter()

    def update(self, done: int, loss: float) -> None:
        if not self.enabled:
            return
        frac = done / max(self.total, 1)
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        text = f"{self.prefix} {done}/{self.total} [{'#' * int(30 * frac):30s}] loss {loss:.4f} {rate:.1f} it/s"
        if self.tty:
            print("\r" + text, end="" if done < self.total else "\n", file=sys.stderr, flush=True)
        elif int(frac * 10) > self.last_decile:
            self.last_decile = int(frac * 10)
            print(text, file=sys.stderr, flush=True)


def evaluate(model, images, labels, batch_size, device) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device).contiguous(memory_format=torch.channels_last)
            correct += (model(x).argmax(1).cpu() == labels[i:i + batch_size]).sum().item()
    return correct / max(len(images), 1)


def train(args, fused: bool, rank: int = 0, world: int = 1) -> list[dict]:
    variant = "fused" if fused else "reference"
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build_model(fused).to(device).to(memory_format=torch.channels_last)
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model)
        if args.sync_bn and (fused or device.type != "cpu"):
            # After wrapping: on CPU, DDP refuses modules that already hold nn.SyncBatchNorm. This converts the
            # layers of ddp_model.module (= model) in place; the fused layers then sync over all ranks.
            rk.nn.convert_sync_batchnorm(ddp_model)
        elif args.sync_bn and rank == 0:
            print("--sync-bn: torch.nn.SyncBatchNorm needs GPU inputs; the CPU reference keeps per-process BN",
                  file=sys.stderr)
    train_x, train_y = load_split(args.data_dir, "train", args.subset)
    test_x, test_y = load_split(args.data_dir, "test", args.test_subset)
    steps_per_epoch = len(train_x) // (args.batch_size * world)
    # The learning-rate schedule spans --epochs; --max-steps only stops early (an interrupted run that
    # --resume continues with the same arguments).
    schedule_steps = max(args.epochs * steps_per_epoch, 1)
    total_steps = min(args.max_steps, schedule_steps) if args.max_steps else schedule_steps
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=schedule_steps)
    history, start_epoch, step = [], 0, 0
    ckpt_path = os.path.join(args.out, f"checkpoint_{variant}.pt")
    if args.resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, start_epoch, step = state["history"], state["epoch"], state["step"]
        if rank == 0:
            print(f"[{variant}] resumed from {ckpt_path} at epoch {start_epoch}", flush=True)
    gen = torch.Generator().manual_seed(args.seed + 1000 * rank)
    for epoch in range(start_epoch, args.epochs):
        if step >= total_steps:
            break
        ddp_model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed + epoch))
        order = order[rank::world]
        progress = Progress(min(steps_per_epoch, total_steps - step), f"[{variant}] epoch {epoch + 1}", rank == 0)
        running, seen = 0.0, 0
        for i in range(steps_per_epoch):
            if step >= total_steps:
                break
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x = augment(train_x[idx], gen).to(device).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(ddp_model(x), train_y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            running += loss.item()
            seen += 1
            progress.update(i + 1, running / seen)
        seconds = time.perf_counter() - t0
        accuracy = evaluate(model, test_x, test_y, 512, device)
        history.append({"epoch": epoch + 1, "train_loss": running / max(seen, 1), "test_accuracy": accuracy,
                        "seconds": seconds, "steps": step})
        if rank == 0:
            print(f"[{variant}] epoch {epoch + 1}: train loss {running / max(seen, 1):.4f}, "
                  f"test accuracy {accuracy:.4f}, {seconds:.1f} s", flush=True)
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "history": history, "epoch": epoch + 1, "step": step}, ckpt_path)
            with open(os.path.join(args.out, f"history_{variant}.json"), "w") as f:
                json.dump(history, f, indent=1)
    return history


def plot(out_dir: str) -> str | None:
    histories = {}
    for variant in ("fused", "reference"):
        path = os.path.join(out_dir, f"history_{variant}.json")
        if os.path.exists(path):
            with open(path) as f:
                histories[variant] = json.load(f)
    if not histories:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for variant, hist in histories.items():
        epochs = [h["epoch"] for h in hist]
        ax_loss.plot(epochs, [h["train_loss"] for h in hist], marker="o", label=variant)
        ax_acc.plot(epochs, [h["test_accuracy"] for h in hist], marker="o", label=variant)
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="Fashion-MNIST: training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="Fashion-MNIST: test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "curves.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--out", default="runs/fashion_mnist")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subset", type=int, default=None, help="use the first N training images")
    parser.add_argument("--test-subset", type=int, default=None, help="use the first N test images")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--reference", action="store_true", help="train the plain torch.nn model instead")
    group.add_argument("--compare", action="store_true", help="train the fused and the reference model")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--distributed", action="store_true",
                        help="DistributedDataParallel under torchrun (gloo on CPU, nccl on CUDA)")
    parser.add_argument("--sync-bn", action="store_true",
                        help="with --distributed: synchronized BatchNorm statistics over all processes")
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, list[dict]]:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rank, world = 0, 1
    if args.distributed:
        import torch.distributed as dist
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    variants = [True, False] if args.compare else [not args.reference]
    results = {}
    for fused in variants:
        results["fused" if fused else "reference"] = train(args, fused, rank, world)
    if rank == 0:
        path = plot(args.out)
        if path:
            print(f"curves: {path}")
    if args.distributed:
        torch.distributed.destroy_process_group()
    return results


if __name__ == "__main__":
    main()

"""Plots of the benchmark CSVs (matplotlib, Agg backend: no display needed).

``plot_kernels(csv, png)``: one panel per (N, dtype, layout) configuration, grouped bars per shape of the
fused kernel's speedup over eager (eager / fused) and over torch.compile (compile / fused) where a compile
row exists; the dashed line at 1 is parity, bars above it mean the fused kernel is faster.

usage: python benchmarks/plot_results.py benchmarks/results/kernels_inference_cpu.csv [out.png]
"""

from __future__ import annotations

import csv
import math
import sys


def _float(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def plot_kernels(csv_path: str, png_path: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["variant"] == "fused"]
    configs = list(dict.fromkeys((r["N"], r["dtype"], r["layout"]) for r in rows))
    ncols = 2 if len(configs) > 1 else 1
    nrows = max(1, math.ceil(len(configs) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (n, dtype, layout) in zip(axes.flat, configs):
        sel = [r for r in rows if (r["N"], r["dtype"], r["layout"]) == (n, dtype, layout)]
        shapes = [r["shape"] for r in sel]
        series = [("vs eager", [_float(r.get("ratio_vs_eager")) for r in sel], "tab:blue"),
                  ("vs torch.compile", [_float(r.get("ratio_vs_compile")) for r in sel], "tab:orange")]
        series = [s for s in series if any(v is not None for v in s[1])]
        width = 0.8 / max(1, len(series))
        for k, (label, values, color) in enumerate(series):
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(shapes))]
            ax.bar(xs, [v if v is not None else 0 for v in values], width, label=label, color=color)
            for x, v, r in zip(xs, values, sel):
                if v is None and r["status"] != "ok":
                    ax.text(x, 0.05, "X", ha="center", color="red")  # wrong / failed / not timed
        ax.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"N={n}, {dtype}, {layout}", fontsize=9)
        ax.set_ylabel("speedup of fused (x)", fontsize=8)
        if series:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(configs):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    out = argv[1] if len(argv) > 1 else argv[0].rsplit(".", 1)[0] + ".png"
    plot_kernels(argv[0], out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

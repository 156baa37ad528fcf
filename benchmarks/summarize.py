"""Regenerates the README's performance section from the committed result records (benchmarks/results/*.json,
written by bench_kernels.py and bench_model.py through record.py), between the markers

    <!-- BEGIN benchmarks/summarize.py -->  ...  <!-- END benchmarks/summarize.py -->

Per CPU class (the vector ISA the project's kernels ran with: AVX-512, AVX2) it takes the latest kernel record with
float32, channels_last, N=8 rows of ResNeXt-50's grouped convolutions, the latest model record and the latest
allocator record (bench_allocators.py); per GPU the same. While no GPU record exists, the latest record of benchmarks/predict_cuda.py (the emulator's predicted times)
stands in, labelled as a prediction. Records of --quick runs are skipped. The output depends on the files alone (no clock, no machine), so the
same files always give the same section.

usage: python benchmarks/summarize.py            rewrite the section in README.md
       python benchmarks/summarize.py --check    exit 1 (with a diff) if README.md differs from the files
"""

from __future__ import annotations

import argparse
import difflib
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN = "<!-- BEGIN benchmarks/summarize.py -->"
END = "<!-- END benchmarks/summarize.py -->"
ISA_NAMES = {"avx512": "AVX-512", "avx2": "AVX2", "baseline": "baseline x86-64"}
CLASS_ORDER = ["avx512", "avx2", "baseline"]
SHAPE_NAMES = {"stage1": "stage 1", "stage2": "stage 2", "stage3": "stage 3", "stage4": "stage 4"}


def load_records(results_dir: str, link_base: str = ROOT) -> list[dict]:
    """The full-run records of ``results_dir``, each with ``_stem``: its path without extension, relative to
    ``link_base`` (the README's directory)."""
    records = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            rec = json.load(f)
        if rec.get("schema") != 1 or rec.get("quick"):
            continue
        rec["_stem"] = os.path.splitext(os.path.relpath(path, link_base))[0]
        records.append(rec)
    return records


def device_class(rec: dict) -> tuple[str, str]:
    """(device, class): ("cpu", kernel ISA) or ("cuda", GPU name)."""
    m = rec["machine"]
    return ("cuda", m["gpu"]) if m["device"] == "cuda" else ("cpu", m["kernel_isa"])


def latest(records: list[dict]) -> dict:
    return max(records, key=lambda r: (r["date"], r["time"], r["_stem"]))


def kernel_rows(rec: dict) -> list[dict]:
    """float32 channels_last rows of ResNeXt-50's shapes at N=8 (on a GPU: the largest N)."""
    rows = [r for r in rec["rows"] if r.get("dtype") == "float32" and r.get("layout") == "channels_last"
            and str(r.get("shape", "")).startswith("x50.")]
    n = 8 if rec["machine"]["device"] == "cpu" else max((r["N"] for r in rows), default=0)
    return [r for r in rows if r.get("N") == n]


def fmt_ms(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def timing(row: dict | None) -> str:
    if not row or row.get("median_ms") is None:
        return str(row.get("status", "-")).split(":")[0] if row else "-"
    return f"{fmt_ms(row['median_ms'])} [{fmt_ms(row['min_ms'])}-{fmt_ms(row['max_ms'])}]"


def ratio(row: dict, key: str) -> str:
    value = row.get(key)
    return "-" if value is None else f"{value:.2f}x"


def path_label(row: dict) -> str:
    """The kernels the record names for a fused row: its profiler scopes, else a path field of explain()'s decision
    other than the device."""
    if row.get("kernels"):
        return ", ".join(str(row["kernels"]).split())
    decision = row.get("decision") or {}
    named = [str(v) for k, v in decision.items() if k not in ("path", "reason") and isinstance(v, str) and v]
    if named:
        return ", ".join(named)
    return {"cpu": "direct", "cuda": "cuda", "aten": "ATen"}.get(decision.get("path"), "-")


def shape_label(shape: str) -> str:
    parts = shape.split(".")[1:]  # x50.stage2.s2 -> stage 2, stride 2
    return SHAPE_NAMES.get(parts[0], parts[0]) + (", stride 2" if parts[1:] == ["s2"] else "")


def describe_machine(m: dict) -> str:
    if m["device"] == "cuda":
        return f"{m['gpu']} (compute capability {m.get('gpu_capability', '?')})"
    if m["device"] == "emulator":
        return f"{m['gpu']} as modelled by the emulator (run on {m['cpu']})"
    details = [d for d in (m.get("microarchitecture"),
                           f"family {m['family']}, model {m['model']}" if m.get("family") is not None else "") if d]
    cpu = m["cpu"] + (f" ({'; '.join(details)})" if details else "")
    isa = ""
    if m["kernel_isa"] != m["isa_class"]:
        isa = (f"; the project's kernels capped to {ISA_NAMES.get(m['kernel_isa'], m['kernel_isa'])} on this "
               f"{ISA_NAMES.get(m['isa_class'], m['isa_class'])} CPU (eager and torch.compile use the CPU's own ISA)")
    return f"{cpu}, {m['cores']} cores{isa}"


def provenance(rec: dict, extra: str = "") -> str:
    """Machine, torch, commit, date, a link to the record (and ``extra``), then the exact command."""
    dirty = " with uncommitted changes" if rec.get("dirty") else ""
    return (f"{describe_machine(rec['machine'])}; torch {rec['torch']}; commit {rec['commit']}{dirty}, {rec['date']}; "
            f"[record]({rec['_stem']}.md).{extra}\n`{rec['command']}`")


def kernel_table(rec: dict) -> list[str]:
    """One row per layer: inference and training side by side (fused time, ratios against eager and compile)."""
    rows = kernel_rows(rec)
    by_shape: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r["variant"] == "fused":
            by_shape.setdefault(r["shape"], {})[r["mode"]] = r
    peaks = rec.get("peaks") or {}
    measured = (f" Machine at the start of the run: float32 `torch.mm` {peaks['gflops']['float32']:.0f} GFLOP/s, copy "
                f"{peaks['gbs']:.1f} GB/s." if "float32" in peaks.get("gflops", {}) and "gbs" in peaks else "")
    lines = [f"ResNeXt-50 32x4d grouped 3x3 conv + BN + ReLU, float32, channels_last, N={rows[0]['N']}: ours in "
             "ms per call (training: forward + backward), median [min-max], and eager's and torch.compile's "
             "median time over ours. " + provenance(rec, measured), "",
             "| layer | path (inference) | inference ms | vs eager | vs compile | training ms | vs eager | "
             "vs compile |",
             "|---|---|---|---|---|---|---|---|"]
    for shape, modes in by_shape.items():
        infer, train = modes.get("inference", {}), modes.get("training", {})
        lines.append(f"| {shape_label(shape)} | {path_label(infer) if infer else '-'} | {timing(infer)} | "
                     f"{ratio(infer, 'ratio_vs_eager')} | {ratio(infer, 'ratio_vs_compile')} | {timing(train)} | "
                     f"{ratio(train, 'ratio_vs_eager')} | {ratio(train, 'ratio_vs_compile')} |")
    summary = never_slower(rec)
    return lines + (["", summary] if summary else [])


ENGINE_NAMES = {"onnxruntime": "ONNX Runtime ms", "openvino": "OpenVINO ms"}  # bench_model.py's optional rows


def model_table(rec: dict) -> list[str]:
    groups = {}
    for r in rec["rows"]:
        key = (r["model"], r["mode"], r["batch"], r.get("dtype", "float32"), r.get("layout", "channels_last"))
        groups.setdefault(key, {})[r["impl"]] = r
    size = rec["rows"][0].get("image_size", 224) if rec["rows"] else 224
    compiled_ours = any("resnext_kernels+compile" in impls for impls in groups.values())
    engines = [e for e in ENGINE_NAMES if any(e in impls for impls in groups.values())]
    lines = [f"Whole models, {size}x{size} images: ms per step (eval: forward without grad; train: SGD step), median "
             "[min-max], and the others' median time over ours"
             + (" (torch.compile of ours: over torch.compile of torchvision's)" if compiled_ours else "") + ". "
             + provenance(rec), "",
             "| model | mode | batch | dtype | layout | resnext_kernels | torchvision | torchvision + torch.compile | "
             "vs torchvision | vs compile |" + (" compile(ours) vs compile |" if compiled_ours else "")
             + "".join(f" {ENGINE_NAMES[e]} |" for e in engines),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if compiled_ours else "") + "---|" * len(engines)]
    for (model, mode, batch, dtype, layout), impls in groups.items():
        ours = impls.get("resnext_kernels", {})
        line = (f"| {model} | {mode} | {batch} | {dtype} | {layout} | {timing(ours)} | "
                f"{timing(impls.get('torchvision'))} | {timing(impls.get('torchvision+compile'))} | "
                f"{ratio(ours, 'ratio_vs_torchvision')} | {ratio(ours, 'ratio_vs_compile')} |")
        if compiled_ours:
            line += f" {ratio(impls.get('resnext_kernels+compile', {}), 'ratio_vs_compile')} |"
        line += "".join(f" {timing(impls[e]) if e in impls else '-'} |" for e in engines)
        lines.append(line)
    return lines


def allocator_table(rec: dict) -> list[str]:
    """bench_allocators.py's record: per model, mode and contender, the step's median under each allocator, and glibc
    malloc's (as it comes) over it."""
    labels = list(dict.fromkeys(r["allocator"] for r in rec["rows"]))
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rec["rows"]:
        groups.setdefault((r["model"], r["mode"], r["batch"], r["impl"]), {})[r["allocator"]] = r
    lines = ["The same steps under each C allocator, each in its own process, rounds in turn: ms per step (median over "
             "the rounds), and glibc malloc's time over it. glibc tuned: MALLOC_TRIM_THRESHOLD_ and "
             "MALLOC_MMAP_THRESHOLD_ raised; jemalloc tuned: MALLOC_CONF keeping freed pages (the exact settings are "
             "in the record). " + provenance(rec), "",
             "| model | mode | batch | contender | " + " | ".join(labels) + " |",
             "|---|---|---|---|" + "---|" * len(labels)]
    for (model, mode, batch, impl), by in groups.items():
        cells = []
        for label in labels:
            r = by.get(label)
            cells.append("-" if r is None else f"{r['median_ms']:.0f}"
                         + (f" ({r['vs_glibc']:.2f}x)" if r.get("vs_glibc") and r is not by.get(labels[0]) else ""))
        lines.append(f"| {model} | {mode} | {batch} | {impl} | " + " | ".join(cells) + " |")
    return lines


def never_slower(rec: dict) -> str:
    """How many fused rows of the whole record (every shape, batch, dtype and layout) run at >= 0.95x eager."""
    parts = []
    for mode in ("inference", "training"):
        rows = [r for r in rec["rows"] if r.get("variant") == "fused" and r.get("mode") == mode
                and r.get("ratio_vs_eager") is not None]
        if rows:
            ok = sum(r["ratio_vs_eager"] >= 0.95 for r in rows)
            worst = min(r["ratio_vs_eager"] for r in rows)
            parts.append(f"{mode} {ok} of {len(rows)} (lowest {worst:.2f}x)")
    if not parts:
        return ""
    return ("Rows of this record's run (every shape, batch, dtype and layout it ran) at >= 0.95x eager: "
            + "; ".join(parts) + ".")


FORM_NAMES = {"inference": "inference", "training": "training forward", "backward": "training backward"}


def predicted_table(rec: dict) -> list[str]:
    """Per ResNeXt-50 layer and form of the predicted record (as the CPU tables): the predicted time and its ratio to
    the larger of the layer's compulsory DRAM time and its tensor-core time."""
    dtype = rec["summaries"][0]["dtype"] if rec["summaries"] else "float16"
    forms = [f for f in FORM_NAMES if any(s["form"] == f for s in rec["summaries"])]
    cells = {(s["shape"], s["form"]): s for s in rec["summaries"] if s["dtype"] == dtype}
    shapes = list(dict.fromkeys(s["shape"] for s in rec["summaries"] if s["shape"].startswith("x50.")))
    lines = [f"Predicted, not measured: the emulated CUDA kernels' counts through a model of the GPU's DRAM, L2, "
             f"shared-memory and tensor-core rates ([docs/emulator.md](docs/emulator.md)), ResNeXt-50 32x4d grouped "
             f"3x3 conv + BN + ReLU, {dtype}, N={rec['batch']}: us per call and, in brackets, over max(compulsory DRAM "
             f"time, tensor-core time); ResNeXt-101 32x8d's layers are in the record. " + provenance(rec), "",
             "| layer | " + " | ".join(FORM_NAMES[f] for f in forms) + " |",
             "|---|" + "---|" * len(forms)]
    for shape in shapes:
        row = []
        for f in forms:
            c = cells.get((shape, f))
            row.append(f"{c['predicted_us']:.1f} ({c['ratio']:.2f}x)" if c else "-")
        lines.append(f"| {shape_label(shape)} | " + " | ".join(row) + " |")
    return lines


def section(records: list[dict]) -> str:
    """The generated markdown between the markers."""
    predicted = [rec for rec in records if rec["bench"] == "predicted"]
    records = [rec for rec in records if rec["bench"] != "predicted"]
    classes: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for rec in records:
        bench_records = classes.setdefault(device_class(rec), {}).setdefault(rec["bench"], [])
        if rec["bench"] != "kernels" or kernel_rows(rec):
            bench_records.append(rec)

    def order(key):
        device, cls = key
        return (device != "cpu", CLASS_ORDER.index(cls) if cls in CLASS_ORDER else len(CLASS_ORDER), cls)

    out = []
    shown = [key for key in sorted(classes, key=order) if any(classes[key].values())]
    for key in shown:
        device, cls = key
        benches = classes[key]
        out += [f"### {ISA_NAMES.get(cls, cls)} {'kernels' if device == 'cpu' else ''}".rstrip(), ""]
        if benches.get("kernels"):
            out += kernel_table(latest(benches["kernels"])) + [""]
        if benches.get("models"):
            out += model_table(latest(benches["models"])) + [""]
        if benches.get("allocators"):
            out += allocator_table(latest(benches["allocators"])) + [""]
    if not any(device == "cuda" for device, _ in shown):
        out += ["### GPUs", "", "No GPU record yet: the CUDA kernels are verified in the emulator, not yet timed on a "
                "GPU.", ""]
        if predicted:
            out += predicted_table(latest(predicted)) + [""]
    return "\n".join(out).rstrip() + "\n"


def replace_section(text: str, generated: str) -> str:
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        raise SystemExit(f"summarize.py: the README has no '{BEGIN}' ... '{END}' markers")
    return text[:begin + len(BEGIN)] + "\n" + generated + text[end:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if the README is out of date")
    args = parser.parse_args(argv)
    with open(args.readme) as f:
        text = f.read()
    link_base = os.path.dirname(os.path.abspath(args.readme))
    new = replace_section(text, section(load_records(args.results, link_base)))
    if args.check:
        if new == text:
            return 0
        diff = difflib.unified_diff(text.splitlines(True), new.splitlines(True), "README.md", "generated")
        sys.stdout.writelines(diff)
        print("README.md's performance section is out of date: run python benchmarks/summarize.py", file=sys.stderr)
        return 1
    if new != text:
        with open(args.readme, "w") as f:
            f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())

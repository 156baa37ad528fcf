"""Result records of the benchmarks: one markdown file and one JSON file per run, named after the machine, the
date and the commit, in benchmarks/results/ (committed; ``python benchmarks/summarize.py`` builds the README's
performance section from the JSON files).

    benchmarks/results/<machine>-<YYYY-MM-DD>-<commit>-<bench>.{md,json}

<machine> is the GPU's name on CUDA, else the CPU's vendor, microarchitecture (where known) and vector ISA
(``amd-zen4-avx512``), with ``-as-avx2`` when RESNEXT_KERNELS_CPU_ISA capped the project's kernels below it. A second run with another command on the same machine, day and commit gets a numbered suffix; the
same command replaces its earlier record.

The JSON record (``SCHEMA``): bench, date, time, commit (and whether the work tree had uncommitted changes), the
exact command, the environment variables that change what runs, the machine (device, CPU model, vendor, family and
model numbers, microarchitecture, ISA class of the CPU and of the kernels, cores, torch threads, GPU), torch and
Python versions, what was built (``python -m resnext_kernels.info``), the measured peaks where the benchmark has
them, and every row (numbers as numbers).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys

import torch

SCHEMA = 1
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
# Environment variables recorded with a run: the project's switches, and those that change what ATen, oneDNN,
# OpenMP or the allocator do.
ENV_PREFIXES = ("RESNEXT_KERNELS_", "OMP_", "MKL_", "ONEDNN_", "DNNL_", "ATEN_CPU_CAPABILITY", "MALLOC_",
                "LD_PRELOAD", "CUDA_VISIBLE_DEVICES", "TORCH_CUDA_ARCH_LIST")

# (vendor, family, first model, last model) -> microarchitecture, for the x86 server CPUs whose /proc/cpuinfo
# model name may not say it. Unknown CPUs are named by their model name alone.
_MICROARCHITECTURES = [
    ("AuthenticAMD", 23, 0x00, 0xFF, "zen2"),
    ("AuthenticAMD", 25, 0x00, 0x0F, "zen3"),
    ("AuthenticAMD", 25, 0x10, 0x1F, "zen4"),
    ("AuthenticAMD", 25, 0x20, 0x5F, "zen3"),
    ("AuthenticAMD", 25, 0x60, 0xAF, "zen4"),
    ("AuthenticAMD", 26, 0x00, 0xFF, "zen5"),
    ("GenuineIntel", 6, 0x55, 0x55, "skylake-sp"),
    ("GenuineIntel", 6, 0x6A, 0x6C, "icelake-sp"),
    ("GenuineIntel", 6, 0x8F, 0x8F, "sapphirerapids"),
    ("GenuineIntel", 6, 0xCF, 0xCF, "emeraldrapids"),
    ("GenuineIntel", 6, 0xAD, 0xAE, "graniterapids"),
]
ISA_NAMES = {"avx512": "AVX-512", "avx2": "AVX2", "baseline": "baseline x86-64"}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def microarchitecture(vendor: str, family: int | None, model: int | None) -> str:
    for v, fam, lo, hi, name in _MICROARCHITECTURES:
        if vendor == v and family == fam and model is not None and lo <= model <= hi:
            return name
    return ""


# Allocators a process can be preloaded with, by the library name mapped into it.
_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def allocator() -> str:
    """The C allocator this process runs on: a preloaded or linked jemalloc/tcmalloc/mimalloc (named by the library
    mapped into the process), else glibc's malloc; with the MALLOC_* settings of the environment (glibc's tunables,
    jemalloc's MALLOC_CONF)."""
    try:
        with open("/proc/self/maps") as f:
            mapped = f.read()
    except OSError:
        mapped = ""
    name = next((name for name in _ALLOCATORS if f"/lib{name}" in mapped), "glibc malloc")
    tunables = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]
    return name + (f" ({', '.join(tunables)})" if tunables else "")


def machine(device: torch.device) -> dict:
    from resnext_kernels._dispatch import cpu_config  # the kernels' own ISA detection (csrc/cpu/isa.h)

    info = _cpuinfo()
    vendor = info.get("vendor_id", platform.machine())
    family = int(info["cpu family"]) if info.get("cpu family", "").isdigit() else None
    model = int(info["model"]) if info.get("model", "").isdigit() else None
    cpu = cpu_config()
    m = {
        "device": device.type,
        "cpu": info.get("model name", platform.processor() or platform.machine()),
        "vendor": vendor,
        "family": family,
        "model": model,
        "microarchitecture": microarchitecture(vendor, family, model),
        "isa_class": cpu.supported_isa,
        "kernel_isa": cpu.isa,
        "native_bf16": cpu.native_bf16,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "allocator": allocator(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    if device.type == "cuda":
        m["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return m


def describe_cpu(m: dict) -> str:
    """'AMD EPYC (zen4; family 25, model 17), 2 cores'."""
    details = [d for d in (m.get("microarchitecture"),
                           f"family {m['family']}, model {m['model']}" if m.get("family") is not None else "") if d]
    return f"{m['cpu']}" + (f" ({'; '.join(details)})" if details else "") + f", {m['cores']} cores"


def git_commit(root: str = ROOT) -> tuple[str, bool]:
    """(short commit of the checkout at ``root``, whether tracked files outside benchmarks/results differ from it);
    ("unknown", False) outside a git checkout (an installed package)."""
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=30).stdout.strip()
        status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 ":(exclude)benchmarks/results"], capture_output=True, text=True, check=True,
                                timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return sha, bool(status.strip())


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_slug(m: dict) -> str:
    if m["device"] == "cuda":
        return _slug(m["gpu"] or "gpu")
    if m["device"] == "emulator":  # predicted by the emulator's GPU model (predict_cuda.py)
        return "emulated-" + _slug(m["gpu"] or "gpu")
    vendor = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(m["vendor"], _slug(m["vendor"]))
    name = m["microarchitecture"] or _slug(m["cpu"])
    isa = m["isa_class"] + ("" if m["kernel_isa"] == m["isa_class"] else f"-as-{m['kernel_isa']}")
    return "-".join(p for p in (vendor, name, isa) if p)


# Test-suite policy, not a choice of what runs: never part of a record.
ENV_IGNORED = ("RESNEXT_KERNELS_REQUIRE_EMULATOR",)


def relevant_environment() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES) and k not in ENV_IGNORED}


def command_line(script: str, argv: list[str]) -> str:
    """The command as typed, with the recorded environment variables that were set in front of it."""
    env = "".join(f"{k}={v} " for k, v in relevant_environment().items() if k != "LD_PRELOAD")
    return f"{env}python benchmarks/{script}" + "".join(f" {a}" for a in argv)


def package_checkout() -> str:
    """The checkout of the resnext_kernels package that runs (which may not be this script's)."""
    import resnext_kernels
    return os.path.dirname(os.path.dirname(os.path.abspath(resnext_kernels.__file__)))


def new_record(bench: str, script: str, argv: list[str], device: torch.device) -> dict:
    now = datetime.datetime.now()
    commit, dirty = git_commit(package_checkout())
    return {
        "schema": SCHEMA,
        "bench": bench,
        "date": now.strftime("%Y-%m-%d"),
        "time": now.strftime("%H:%M:%S"),
        "commit": commit,
        "dirty": dirty,
        "command": command_line(script, argv),
        "environment": relevant_environment(),
        "machine": machine(device),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "build": build_summary(),
        "rows": [],
    }


def build_summary() -> dict[str, str]:
    """`python -m resnext_kernels.info`, as strings."""
    try:
        import resnext_kernels.info as info
        return {k: str(v) for k, v in info.summary().items()}
    except Exception as e:  # noqa: BLE001 - a broken install is recorded, not fatal here
        return {"error": f"{type(e).__name__}: {e}"}


def kernel_scopes(fn) -> list[str]:
    """The ``resnext_kernels::<name>`` profiler scopes that one call of ``fn`` opens, other than the operators
    (torch.ops.resnext_kernels.*) themselves, by first appearance: the kernels that ran, where the code names them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = []
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        namespace, _, name = event.name.partition("::")
        if namespace == "resnext_kernels" and name and not hasattr(torch.ops.resnext_kernels, name.split(".")[0]):
            if name not in names:
                names.append(name)
    return names


def _number(value):
    """A CSV cell as a JSON value: numbers as numbers, empty as null, anything else as is."""
    if isinstance(value, str):
        if value == "":
            return None
        text = value[:-1] if value.endswith("%") else value
        try:
            number = float(text)
        except ValueError:
            return value
        return number / 100 if value.endswith("%") else number
    return value


def json_rows(rows: list[dict]) -> list[dict]:
    return [{k: _number(v) for k, v in r.items()} for r in rows]


def record_stem(record: dict, results_dir: str) -> str:
    """The path, without extension, of this record: a fresh name, or the earlier record of the same command."""
    base = f"{machine_slug(record['machine'])}-{record['date']}-{record['commit']}-{record['bench']}"
    for i in range(1, 100):
        stem = os.path.join(results_dir, base + ("" if i == 1 else f"-{i}"))
        try:
            with open(stem + ".json") as f:
                earlier = json.load(f)
        except (OSError, ValueError):
            return stem
        if earlier.get("command") == record["command"]:
            return stem
    raise RuntimeError(f"too many records named {base} in {results_dir}")


def write(record: dict, markdown_body: str, results_dir: str = RESULTS_DIR) -> str:
    """Writes <stem>.json and <stem>.md (a header naming the machine, torch, commit and command, then
    ``markdown_body``); returns the stem."""
    os.makedirs(results_dir, exist_ok=True)
    stem = record_stem(record, results_dir)
    m = record["machine"]
    where = {"cuda": m["gpu"], "emulator": f"{m['gpu']}, emulated on {describe_cpu(m)}"}.get(m["device"],
                                                                                            describe_cpu(m))
    isa = ""
    if m["device"] == "cpu":
        isa = f"; CPU ISA {ISA_NAMES.get(m['isa_class'], m['isa_class'])}, kernels run with " \
              f"{ISA_NAMES.get(m['kernel_isa'], m['kernel_isa'])}"
    dirty = " (with uncommitted changes)" if record["dirty"] else ""
    header = (f"# {record['bench']}: {where}\n\n"
              f"- date: {record['date']} {record['time']}\n"
              f"- commit: {record['commit']}{dirty}\n"
              f"- torch {record['torch']}, Python {record['python']}, {m['torch_threads']} threads{isa}\n"
              f"- allocator: {m.get('allocator', 'not recorded')}\n"
              f"- command: `{record['command']}`\n"
              f"- environment: {', '.join(f'{k}={v}' for k, v in record['environment'].items()) or 'none set'}\n\n")
    with open(stem + ".md", "w") as f:
        f.write(header + markdown_body)
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1, sort_keys=False)
        f.write("\n")
    return stem


if __name__ == "__main__":  # prints this machine's description, as a record would hold it
    json.dump(machine(torch.device("cpu")), sys.stdout, indent=1)
    print()

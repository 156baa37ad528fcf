"""Allocator benchmark: the model benchmark (bench_model.py) under each C allocator a user can pick without changing
code, because on CPU a training step frees and re-allocates every activation, and glibc's malloc returns large
freed blocks to the kernel (munmap / heap trimming) only to fault them in again on the next step.

Allocators: glibc malloc as it comes; glibc malloc with ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_``
raised (blocks up to 32 MB, glibc's ceiling, come from the heap and stay mapped between steps); jemalloc (as it
comes, and with ``MALLOC_CONF`` keeping freed pages: JEMALLOC_TUNED) and tcmalloc, preloaded with ``LD_PRELOAD``
where their libraries are installed (Debian: ``libjemalloc2``, ``libtcmalloc-minimal4``). The library itself never changes the allocator of the process it runs in.

An allocator is fixed when a process starts, so each one runs bench_model.py in its own process, --rounds times in
turn (allocator A, B, C, D, then A, B, C, D again), so that the machine's drift falls on all of them alike. A row's
figure is the median over the rounds of that run's median step; each row is compared with the same contender under
glibc malloc as it comes. The allocator a run really had is read back from its record (record.allocator()).

Results: benchmarks/results/<machine>-<date>-<commit>-allocators.{md,json} (--results-dir to change).

usage: python benchmarks/bench_allocators.py [--rounds 2] [--allocators "glibc tuned,tcmalloc"] [--results-dir DIR]
                                            [-- bench_model.py arguments]
       (default bench_model.py arguments: --models resnext50_32x4d,resnet50 --modes train --no-compile --no-engines)
"""

from __future__ import annotations

import argparse
import ctypes.util
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL_ARGS = ["--models", "resnext50_32x4d,resnet50", "--modes", "train", "--no-compile", "--no-engines"]
# glibc's largest accepted mmap threshold on 64-bit (half its 64 MB heap size): larger blocks are always mmapped.
GLIBC_TUNED = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
# jemalloc keeps freed pages (no decay-driven purging) and serves large blocks from its arenas' pages as well.
JEMALLOC_TUNED = {"MALLOC_CONF": "oversize_threshold:0,background_thread:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"}
BASELINE = "glibc"


def _library(name: str) -> str | None:
    """The shared library's file name for LD_PRELOAD (the dynamic loader finds it on its search path), or None."""
    return ctypes.util.find_library(name)


def allocators() -> list[tuple[str, dict[str, str]]]:
    """(label, environment changes) for every allocator this machine can run."""
    out = [(BASELINE, {}), ("glibc tuned", dict(GLIBC_TUNED))]
    jemalloc = _library("jemalloc")
    if jemalloc:
        out += [("jemalloc", {"LD_PRELOAD": jemalloc}), ("jemalloc tuned", {"LD_PRELOAD": jemalloc, **JEMALLOC_TUNED})]
    tcmalloc = _library("tcmalloc_minimal") or _library("tcmalloc")
    if tcmalloc:
        out.append(("tcmalloc", {"LD_PRELOAD": tcmalloc}))
    return out


def child_env(changes: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    env.update(changes)
    return env


def run_once(changes: dict[str, str], model_args: list[str]) -> dict:
    """One bench_model.py run under an allocator: its record (rows, and the machine with the allocator it had)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.join(HERE, "bench_model.py"), *model_args, "--results-dir", tmp, "--out", tmp]
        proc = subprocess.run(cmd, env=child_env(changes), text=True, capture_output=True)
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"bench_model.py failed under {changes or 'glibc malloc'} (exit {proc.returncode})")
        (path,) = glob.glob(os.path.join(tmp, "*.json"))
        with open(path) as f:
            return json.load(f)


def row_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("model", "mode", "impl", "batch", "dtype", "layout"))


def combine(runs: dict[str, list[dict]]) -> list[dict]:
    """Rows per (allocator, model, mode, impl, batch, dtype, layout): the median of the runs' medians, and the ratio
    of glibc malloc's figure (as it comes) to this one (> 1: faster than glibc)."""
    medians: dict[tuple, dict] = {}
    for label, recs in runs.items():
        for rec in recs:
            for row in rec["rows"]:
                if row.get("status") != "ok" or row.get("median_ms") is None:
                    continue
                entry = medians.setdefault((label, *row_key(row)), {
                    "allocator": label, "allocator_detected": rec["machine"].get("allocator"),
                    **{k: row.get(k) for k in ("model", "mode", "impl", "batch", "dtype", "layout")}, "runs_ms": []})
                entry["runs_ms"].append(row["median_ms"])
    rows = []
    for entry in medians.values():
        entry["median_ms"] = statistics.median(entry["runs_ms"])
        rows.append(entry)
    base = {row_key(r): r["median_ms"] for r in rows if r["allocator"] == BASELINE}
    for r in rows:
        b = base.get(row_key(r))
        r["vs_glibc"] = round(b / r["median_ms"], 3) if b else None
    return rows


def markdown(rows: list[dict], labels: list[str], env_of: dict[str, dict[str, str]]) -> str:
    lines = ["Median step in ms (median over rounds of each run's median); in brackets glibc malloc's time over this "
             "one (> 1: faster than glibc malloc as it comes).", "",
             "| model | mode | contender | batch | " + " | ".join(labels) + " |",
             "|---|---|---|---|" + "---|" * len(labels)]
    keys = sorted({row_key(r) for r in rows}, key=lambda k: tuple(str(x) for x in k))
    by = {(r["allocator"], row_key(r)): r for r in rows}
    for key in keys:
        model, mode, impl, batch, dtype, layout = key
        cells = []
        for label in labels:
            r = by.get((label, key))
            cells.append("-" if r is None else f"{r['median_ms']:.1f}" + (
                f" ({r['vs_glibc']:.2f}x)" if r["vs_glibc"] and label != BASELINE else ""))
        lines.append(f"| {model} | {mode} {dtype} {layout} | {impl} | {batch} | " + " | ".join(cells) + " |")
    lines += ["", "Allocators (environment of each run):", ""]
    for label in labels:
        detected = next((r["allocator_detected"] for r in rows if r["allocator"] == label), "?")
        env = " ".join(f"{k}={v}" for k, v in env_of[label].items()) or "nothing set"
        lines.append(f"- {label}: {env}; the run had {detected}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="runs per allocator, in turn (default 2)")
    parser.add_argument("--allocators", default=None,
                        help="comma-separated labels to run (default: every one installed; glibc always runs)")
    parser.add_argument("--results-dir", default=record.RESULTS_DIR)
    parser.add_argument("model_args", nargs=argparse.REMAINDER,
                        help="after --: bench_model.py's arguments (default: " + " ".join(DEFAULT_MODEL_ARGS) + ")")
    args = parser.parse_args(argv)
    model_args = [a for a in args.model_args if a != "--"] or list(DEFAULT_MODEL_ARGS)
    choices = allocators()
    if args.allocators:
        wanted = set(args.allocators.split(",")) | {BASELINE}
        unknown = wanted - {label for label, _ in choices}
        if unknown:
            parser.error(f"--allocators: {', '.join(sorted(unknown))} not available here "
                         f"(choose from {', '.join(label for label, _ in choices)})")
        choices = [(label, env) for label, env in choices if label in wanted]
    print(f"# allocators: {', '.join(label for label, _ in choices)}; {args.rounds} rounds of "
          f"bench_model.py {' '.join(model_args)}", flush=True)
    runs: dict[str, list[dict]] = {label: [] for label, _ in choices}
    for i in range(args.rounds):
        for label, changes in choices:
            print(f"## round {i + 1}, {label}", flush=True)
            runs[label].append(run_once(changes, model_args))
    rows = combine(runs)
    labels = [label for label, _ in choices]
    body = markdown(rows, labels, dict(choices))
    print(body, flush=True)
    rec = record.new_record("allocators", "bench_allocators.py", list(sys.argv[1:] if argv is None else argv),
                            torch.device("cpu"))
    rec["rows"] = record.json_rows(rows)
    stem = record.write(rec, body, args.results_dir)
    print(f"record: {stem}.md, {stem}.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

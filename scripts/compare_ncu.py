"""The emulator's counters against Nsight Compute's, kernel launch by kernel launch, for scripts/gpu_check.sh.

usage: python scripts/compare_ncu.py --emu EMU.json --ncu NCU.csv [--out compare.md]
       python scripts/compare_ncu.py --emu EMU.json --fake-ncu NCU.csv     (writes an ncu-format CSV from the
                                                                             emulator's counts: --dry-run's input)
EMU.json is `python -m resnext_kernels.emulator profile --json` for one shape and dtype (its rows in launch
order); NCU.csv is `ncu --csv --page raw --metrics ...` over scripts/gpu_kernel_cases.py for the same layer, which
launches the same kernels in the same order. Each row of the table: a launch, a counter, both values, and their
ratio (ncu / emulator); time compares the model's prediction with the measured duration.
"""

import argparse
import csv
import json
import sys

# (label, ncu metric, the emulator's value from a row's counts, unit scale of the ncu value)
PAIRS = [
    ("global load requests", "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum", lambda c: c["gld_requests"], 1),
    ("global load sectors", "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum", lambda c: c["gld_sectors"], 1),
    ("global store requests", "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum", lambda c: c["gst_requests"], 1),
    ("global store sectors", "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum", lambda c: c["gst_sectors"], 1),
    ("shared load wavefronts", "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum",
     lambda c: c["smem_ld_wavefronts"], 1),
    ("shared store wavefronts", "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum",
     lambda c: c["smem_st_wavefronts"], 1),
    ("shared load bank conflicts", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
     lambda c: c["smem_ld_wavefronts"] - c["smem_ld_ideal_wavefronts"], 1),
    ("shared store bank conflicts", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum",
     lambda c: c["smem_st_wavefronts"] - c["smem_st_ideal_wavefronts"], 1),
    ("DRAM bytes read (emulator: compulsory)", "dram__bytes_read.sum", lambda c: c["dram_read_bytes_min"], 1),
    ("DRAM bytes written (emulator: compulsory)", "dram__bytes_write.sum", lambda c: c["dram_write_bytes_min"], 1),
    ("tensor-core instructions", "sm__inst_executed_pipe_tensor_op_hmma.sum",
     lambda c: c["mma_m16n8k16_f16"] + c["mma_m16n8k16_bf16"] + c["mma_m16n8k8_tf32"], 1),
]
TIME = "gpu__time_duration.sum"  # ns
METRICS = [m for _, m, _, _ in PAIRS] + [TIME]


def read_ncu(path):
    """Launch rows of `ncu --csv --page raw`: [(kernel name, {metric: float})], in launch order."""
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # ncu's own log lines start with ==PROF==
    rows = list(csv.reader(lines))
    if not rows:
        return []
    head, out = rows[0], []
    for row in rows[1:]:
        record = dict(zip(head, row))
        if not record.get("ID", "").strip().isdigit():  # the units row
            continue
        values = {}
        for m in METRICS:
            text = record.get(m, "").replace(",", "").strip()
            try:
                values[m] = float(text)
            except ValueError:
                pass
        out.append((record.get("Kernel Name", "?"), values))
    return out


def fake_ncu(emu, path):
    """An ncu-format CSV whose values are the emulator's (the --dry-run input: it tests the parser and the table)."""
    head = ["ID", "Kernel Name"] + METRICS
    with open(path, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(head)
        w.writerow(["", ""] + ["" for _ in METRICS])
        for i, row in enumerate(emu):
            c = row["counts"]
            w.writerow([str(i), row["kernel"]] + [f"{fn(c) * scale:.0f}" for _, _, fn, scale in PAIRS]
                       + [f"{row['predicted_us'] * 1e3:.1f}"])


def compare(emu, ncu):
    lines = ["| launch | kernel | counter | emulator | ncu | ncu / emulator |", "|---|---|---|---|---|---|"]
    if len(emu) != len(ncu):
        lines.append(f"| - | - | launches | {len(emu)} | {len(ncu)} | - |")
    for i, (row, (name, values)) in enumerate(zip(emu, ncu)):
        short = row["kernel"].replace("rk::cuda_kernels::", "")
        if short.split("<")[0] not in name:
            lines.append(f"| {i} | {short} | kernel name | - | {name[:60]} | mismatch |")
            continue
        c = row["counts"]
        for label, metric, fn, scale in PAIRS:
            if metric not in values:
                continue
            e, n = fn(c), values[metric] / scale
            ratio = f"{n / e:.2f}" if e else ("-" if n == 0 else "inf")
            lines.append(f"| {i} | {short} | {label} | {e:,.0f} | {n:,.0f} | {ratio} |")
        if TIME in values:
            e, n = row["predicted_us"], values[TIME] / 1e3
            lines.append(f"| {i} | {short} | time us (emulator: predicted, {row['bound']}-bound) | {e:.2f} | "
                         f"{n:.2f} | {n / e:.2f} |" if e else f"| {i} | {short} | time us | 0 | {n:.2f} | - |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--emu", required=True)
    parser.add_argument("--ncu")
    parser.add_argument("--fake-ncu")
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    with open(args.emu) as f:
        emu = [r for r in json.load(f)["rows"] if r["gpu"] == args.gpu]
    if args.fake_ncu:
        fake_ncu(emu, args.fake_ncu)
        return 0
    if not args.ncu:
        parser.error("--ncu or --fake-ncu is required")
    ncu = read_ncu(args.ncu)
    if not ncu:
        print(f"compare_ncu: no launch rows in {args.ncu}", file=sys.stderr)
        return 1
    table = compare(emu, ncu)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

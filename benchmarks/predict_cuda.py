"""The CUDA kernels' predicted times at ResNeXt's grouped 3x3 layers, as a committed record.

Runs ``python -m resnext_kernels.emulator profile`` (the emulated kernels' counters and the GPU model; no GPU
needed, docs/emulator.md) and writes its tables and rows to benchmarks/results/emulated-<gpu>-<date>-<commit>-
predicted.{md,json}, with the provenance of the other benchmark records. ``python benchmarks/summarize.py`` puts the
newest such record in the README while no GPU record exists. These are model predictions, not measurements.

    python benchmarks/predict_cuda.py                  # float16, N=32, H100, inference + training + backward
    python benchmarks/predict_cuda.py --ptxas-log build.log   # registers from nvcc's report (occupancy)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", default="h100", help="the GPU model (resnext_kernels.emulator.gpu_model.GPUS)")
    parser.add_argument("--dtypes", default="float16")
    parser.add_argument("--forms", default="inference,training,backward")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shapes", default=None, help="a subset, as the profiler takes it (default: every layer)")
    parser.add_argument("--ptxas-log", default=os.path.join("logs", "build.log"),
                        help="the build log with nvcc's ptxas report (registers, hence occupancy)")
    parser.add_argument("--results-dir", default=record.RESULTS_DIR)
    args = parser.parse_args(argv)
    from resnext_kernels.emulator import __main__ as profile_cli
    from resnext_kernels.emulator import gpu_model

    script_args = [a for a in (argv if argv is not None else sys.argv[1:])]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "profile.json")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            rc = profile_cli.main(["profile", "--gpus", args.gpu, "--dtypes", args.dtypes, "--forms", args.forms,
                                   "--batch", str(args.batch), "--ptxas-log", args.ptxas_log,
                                   "--format", "markdown", "--json", out]
                                  + (["--shapes", args.shapes] if args.shapes else []))
        if rc != 0:
            sys.stdout.write(printed.getvalue())
            return rc
        with open(out) as f:
            profile = json.load(f)
    commit, dirty = record.git_commit(record.package_checkout())
    rec = record.new_record("predicted", "predict_cuda.py", script_args, torch.device("cpu"))
    rec["commit"], rec["dirty"] = commit, dirty
    rec["machine"]["device"] = "emulator"
    rec["machine"]["gpu"] = gpu_model.GPUS[args.gpu].name
    rec["batch"] = profile["batch"]
    rec["gpu_model"] = profile["gpus"][args.gpu]
    rec["registers_from"] = profile["ptxas_log"]
    rec["summaries"] = profile["summaries"]
    rec["rows"] = [{k: v for k, v in r.items() if k != "counts"} for r in profile["rows"]]
    body = (f"Predicted by the CUDA-on-CPU emulator's counters and its model of the {rec['machine']['gpu']}, not "
            f"measured; N={rec['batch']}.\n\n{printed.getvalue()}")
    stem = record.write(rec, body, args.results_dir)
    print(printed.getvalue())
    print(f"wrote {stem}.md, {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

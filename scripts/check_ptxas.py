"""Checks nvcc's `-Xptxas -v` report in a build log: every kernel of the project was compiled for each
required architecture with 0 bytes of register spills. Exit status 1 otherwise.

usage: python scripts/check_ptxas.py logs/build.log [--require sm_80,sm_90]
"""

import argparse
import importlib.util
import os
import sys
from collections import defaultdict


def _load_parser():
    """resnext_kernels/emulator/ptxas.py, loaded by path: this check must not import torch or the build."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "resnext_kernels", "emulator", "ptxas.py")
    spec = importlib.util.spec_from_file_location("rk_ptxas", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


parse = _load_parser().parse


def demangle(names):
    import shutil
    import subprocess
    if not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log")
    parser.add_argument("--require", default="sm_80,sm_90", help="architectures that must be present")
    args = parser.parse_args()
    with open(args.log, errors="replace") as f:
        kernels = parse(f.read())
    if not kernels:
        print(f"check_ptxas: no ptxas report in {args.log}: the CUDA kernels were not compiled", file=sys.stderr)
        return 1
    names = demangle(sorted({k for k, _ in kernels}))
    archs = defaultdict(int)
    bad = []
    for (kernel, arch), info in sorted(kernels.items()):
        archs[arch] += 1
        if info["spill_stores"] or info["spill_loads"]:
            bad.append(f"  {arch} {names[kernel][:120]}: {info['spill_stores']} B spill stores, "
                       f"{info['spill_loads']} B spill loads, {info['regs']} registers")
    missing = [a for a in args.require.split(",") if a and a not in archs]
    regs = [i["regs"] for i in kernels.values() if i["regs"] is not None]
    print(f"check_ptxas: {len(kernels)} kernel compilations over {dict(sorted(archs.items()))}; "
          f"registers {min(regs, default=0)}..{max(regs, default=0)}; "
          f"max stack frame {max(i['stack'] for i in kernels.values())} B; spilling: {len(bad)}")
    if missing:
        print(f"check_ptxas: required architectures not compiled: {missing}", file=sys.stderr)
    if bad:
        print("check_ptxas: kernels with register spills:\n" + "\n".join(bad), file=sys.stderr)
    return 1 if (missing or bad) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Prints the SASS instruction mix of every CUDA kernel in a build (per architecture), and checks it.

The mix is what a GPU engineer reads first: tensor-core instructions (HMMA), asynchronous copies (LDGSTS), ldmatrix
(LDSM), the width of global loads and stores (LDG/STG .32 = 32 bits or narrower, .64, .128), shared accesses, FP32
math, local memory (LDL/STL: spills or stack arrays), barriers and shuffles. cuobjdump disassembles without a GPU
(from the CUDA toolkit, or the pinned pip packages nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm).

usage: python scripts/check_sass.py [FILE ...] [--arch sm_90] [--require 'NAME_REGEX=HMMA,LDGSTS'] ...
                                    [--forbid 'NAME_REGEX=LDL,STL'] [--project-rules] [--json OUT]
  FILE defaults to the built extension resnext_kernels/_C*.so. --require: every kernel whose (demangled) name
  matches NAME_REGEX has each listed class, in every architecture, and at least one kernel matches; --forbid: none
  of them has any. Exit status 1 when a check fails.
"""

import argparse
import glob
import importlib.util
import json
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# What the project's kernels must compile to (--project-rules): the tensor-core kernels use tensor cores, async
# copies, ldmatrix and 16-byte stores; the 16-byte elementwise passes stay 16-byte; nothing uses local memory.
PROJECT_REQUIRE = [
    "conv_tc_fwd_kernel=HMMA,LDGSTS,LDSM,STG.128",
    "conv_wgrad_tc_kernel=HMMA,LDGSTS,LDSM",
    "normalize_relu_vec8_kernel|bn_relu_backward_vec8_kernel=LDG.128,STG.128",
]
PROJECT_FORBID = [".=LDL,STL"]
COLUMNS = ("HMMA", "LDGSTS", "LDSM", "LDG.128", "LDG.64", "LDG.32", "STG.128", "STG.64", "STG.32", "LDS", "STS",
           "FFMA", "LDL", "STL", "BAR", "total")


def _load_sass():
    """resnext_kernels/emulator/sass.py, loaded by path: this check must not import torch or the build."""
    path = os.path.join(ROOT, "resnext_kernels", "emulator", "sass.py")
    spec = importlib.util.spec_from_file_location("rk_sass", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rules(specs):
    rules = []
    for spec in specs:
        pattern, _, classes = spec.partition("=")
        if not classes:
            raise SystemExit(f"check_sass: a rule is NAME_REGEX=CLASS[,CLASS...], got {spec!r}")
        rules.append((re.compile(pattern), [c.strip() for c in classes.split(",") if c.strip()]))
    return rules


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*")
    parser.add_argument("--arch", default=None, help="one architecture only (default: every one embedded)")
    parser.add_argument("--require", action="append", default=[])
    parser.add_argument("--forbid", action="append", default=[])
    parser.add_argument("--json", default=None, help="also write the mixes to this file")
    parser.add_argument("--quiet", action="store_true", help="print the checks' result only")
    parser.add_argument("--project-rules", action="store_true",
                        help="also check the project's own rules (PROJECT_REQUIRE, PROJECT_FORBID)")
    args = parser.parse_args(argv)
    if args.project_rules:
        args.require += PROJECT_REQUIRE
        args.forbid += PROJECT_FORBID
    sass = _load_sass()
    files = args.files or sorted(glob.glob(os.path.join(ROOT, "resnext_kernels", "_C*.so")))
    if not files:
        print("check_sass: no file given and no built resnext_kernels/_C*.so", file=sys.stderr)
        return 1
    mixes = {}
    for path in files:
        mixes.update(sass.parse(sass.disassemble(path, args.arch)))
    if not mixes:
        print(f"check_sass: no CUDA kernels in {files}", file=sys.stderr)
        return 1
    names = sass.demangle(sorted({k for k, _ in mixes}))
    rows = sorted(((names[k], arch, mix) for (k, arch), mix in mixes.items()), key=lambda r: (r[0], r[1]))
    if not args.quiet:
        width = min(max(len(n) for n, _, _ in rows), 90)
        print(f"{'kernel':{width}s} {'arch':6s} " + " ".join(f"{c:>7s}" for c in COLUMNS))
        for name, arch, mix in rows:
            print(f"{name[:width]:{width}s} {arch:6s} " + " ".join(f"{mix.get(c, 0):7d}" for c in COLUMNS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"kernel": n, "arch": a, "mix": dict(m)} for n, a, m in rows], f, indent=1)
    failures = []
    for rules, must in ((_rules(args.require), True), (_rules(args.forbid), False)):
        for pattern, classes in rules:
            matched = [r for r in rows if pattern.search(r[0])]
            if not matched and must:
                failures.append(f"no kernel matches {pattern.pattern!r}")
            for name, arch, mix in matched:
                for c in classes:
                    if must and mix.get(c, 0) == 0:
                        failures.append(f"{name} ({arch}) has no {c}")
                    if not must and mix.get(c, 0) > 0:
                        failures.append(f"{name} ({arch}) has {mix[c]} {c}")
    kernels = len({n for n, _, _ in rows})
    archs = sorted({a for _, a, _ in rows})
    print(f"check_sass: {kernels} kernels over {archs}; {len(failures)} failed checks")
    for f in failures:
        print(f"check_sass: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Kernel microbenchmark: the fused grouped conv3x3 + BN + ReLU (``rk.nn.FusedGroupedConvBNReLU``) against
PyTorch's eager ``Conv2d -> BatchNorm2d -> ReLU`` and against ``torch.compile`` (Inductor) of that eager
module, at the grouped 3x3 convolutions of ResNeXt-50 32x4d and ResNeXt-101 32x8d, on the device at hand
(CUDA when present, CPU otherwise).

Cases: shape x batch x dtype x layout, for --mode inference (eval, no grad; on CPU the compiled module is
built with ``torch._inductor.config.freezing = True`` so BatchNorm is folded into the conv) and/or
--mode training (one step: forward with batch statistics + backward of a fixed random output gradient).
Each case gives up to three rows: ``fused`` (ours), ``eager``, ``compile``. Every row's output (training:
output, input gradient and conv weight gradient) is first checked against a float64 eager reference
computed from the same (dtype-rounded) input and weights; a mismatch is reported as WRONG and not timed,
a compile failure is reported in its row. Timing: torch.utils.benchmark ``blocked_autorange`` (it
synchronizes CUDA), in --rounds interleaved rounds over the variants, at least --min-runs blocks in all;
median and interquartile range over the blocks.

Columns: median_ms, iqr_ms; ratio_vs_eager = eager median / row median and ratio_vs_compile = compile
median / row median (> 1: the row is faster); GFLOP/s and GB/s by the models of machine_peak.py
(conv FLOPs 2*N*C_out*OH*OW*C_in/groups*9, x3 for a training step; bytes |x|+|w|+|y| once, x3 for a
training step); pct_peak_* = the fraction of the machine peaks measured at start (``torch.mm`` GFLOP/s in
the row's dtype, ``y.copy_(x)`` GB/s), or given with --peak-gflops / --peak-gbs.

Path of each fused row: ``explain()``'s decision (path and reason), and the ``resnext_kernels::`` profiler scopes
one step opens other than the operators themselves (the kernels that ran, where the code names them).

Results: the run's record, benchmarks/results/<machine>-<date>-<commit>-kernels.{md,json} (record.py; not with
--quick unless --results-dir is given), and scratch files in --out (default benchmarks/out/):
kernels_<mode>_<device>.{csv,png}.

usage: python benchmarks/bench_kernels.py [--quick] [--mode inference|training|all] [--batches 1,8]
            [--dtypes float32,bfloat16] [--layouts channels_last,nchw] [--shapes x50] [--compile | --no-compile]
            [--all] [--lift-batch-cap] [--peak-gflops G] [--peak-gbs B] [--cpu] [--out DIR] [--results-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time

import torch
import torch.utils.benchmark as tb
from torch import nn

import resnext_kernels as rk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine_peak  # noqa: E402
import record  # noqa: E402

GROUPS = 32


def _shapes():
    """(name, channels, input size, stride): the grouped 3x3 convs (32 groups) of ResNeXt-50 32x4d
    (widths 128..1024, 4 channels per group) and ResNeXt-101 32x8d (widths 256..2048, 8 per group): each
    stage at stride 1, and the stride-2 first blocks of stages 2-4 (input at twice the spatial size)."""
    shapes = []
    for model, widths in (("x50", (128, 256, 512, 1024)), ("x101", (256, 512, 1024, 2048))):
        for i, (c, hw) in enumerate(zip(widths, (56, 28, 14, 7))):
            shapes.append((f"{model}.stage{i + 1}", c, hw, 1))
        for i, (c, hw) in enumerate(zip(widths[1:], (56, 28, 14))):
            shapes.append((f"{model}.stage{i + 2}.s2", c, hw, 2))
    return shapes


SHAPES = _shapes()
QUICK_SHAPES = ("x50.stage3", "x50.stage4.s2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float64: 1e-9}
TRAIN_TOL = {torch.float32: 2e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2, torch.float64: 1e-9}
FIELDS = ["case", "shape", "C", "HW", "stride", "N", "dtype", "layout", "mode", "device", "variant", "status",
          "path", "kernels", "max_rel_err", "median_ms", "min_ms", "max_ms", "iqr_ms", "runs", "ratio_vs_eager",
          "ratio_vs_compile", "gflops", "gbs", "pct_peak_flops", "pct_peak_bw", "peak_gflops", "peak_gbs",
          "compile_s"]


def eager_module(channels, stride):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(channels, channels, 3, stride, 1, groups=GROUPS, bias=False),
                      nn.BatchNorm2d(channels), nn.ReLU())
    with torch.no_grad():
        m[1].running_mean.normal_(0, 0.2)
        m[1].running_var.uniform_(0.5, 1.5)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.normal_(0, 0.2)
    return m


def fused_module(eager, channels, stride):
    m = rk.nn.FusedGroupedConvBNReLU(channels, channels, stride=stride, groups=GROUPS)
    m.load_state_dict(eager.state_dict())
    return m


def rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


_REF_CACHE: dict = {}


class Case:
    """One (shape, N, dtype, layout, mode): the modules, the input and the float64 reference."""

    def __init__(self, shape, n, dtype_name, layout, mode, device):
        self.name, self.c, self.hw, self.stride = shape
        self.n, self.dtype_name, self.dtype, self.layout, self.mode = n, dtype_name, DTYPES[dtype_name], layout, mode
        self.device, self.training = device, mode == "training"
        self.memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        base = eager_module(self.c, self.stride)
        self.eager = copy.deepcopy(base).to(device=device, dtype=self.dtype).to(memory_format=self.memory_format)
        # reference: the same dtype-rounded weights and input, in float64, NCHW
        ref_mod = copy.deepcopy(self.eager).to(dtype=torch.float64).to(memory_format=torch.contiguous_format)
        self.fused = fused_module(self.eager, self.c, self.stride).to(device=device, dtype=self.dtype)
        self.fused.to(memory_format=self.memory_format)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(n, self.c, self.hw, self.hw, generator=gen).to(device=device, dtype=self.dtype)
        self.x = x.contiguous(memory_format=self.memory_format)
        o = machine_peak.out_size(self.hw, self.stride)
        g = torch.randn(n, self.c, o, o, generator=gen).to(device=device, dtype=self.dtype)
        self.grad = g.contiguous(memory_format=self.memory_format)
        for m in (self.eager, self.fused, ref_mod):
            m.train(self.training)
        key = (self.name, n, dtype_name, mode, device.type)  # layouts share values: reuse the reference
        if _REF_CACHE.get("key") != key:
            _REF_CACHE.clear()
            _REF_CACHE.update(key=key, ref=self._reference(ref_mod), extra=getattr(self, "_ref_inputs", None),
                              grads=getattr(self, "_ref_grads", None))
        self.ref, self._ref_inputs, self._ref_grads = _REF_CACHE["ref"], _REF_CACHE["extra"], _REF_CACHE["grads"]

    def _reference(self, ref_mod):
        """Inference: the float64 output. Training: the float64 pre-ReLU output z (with its autograd graph);
        the gradients are computed per checked variant with that variant's ReLU mask (``check``), since
        where z is within rounding of 0 the mask (and so the gradient) legitimately differs."""
        x = self.x.detach().double().contiguous()
        if not self.training:
            with torch.no_grad():
                return (ref_mod(x),)
        x.requires_grad_()
        z = ref_mod[1](ref_mod[0](x))
        self._ref_inputs = (x, ref_mod[0].weight)
        self._ref_grads = []  # [(mask, (dx, dw))]
        return (torch.relu(z).detach(), z)

    def _train_reference(self, out):
        mask = out.detach() > 0
        for m, grads in self._ref_grads:
            if torch.equal(m, mask):
                return grads
        z = self.ref[1]
        grads = torch.autograd.grad(z, self._ref_inputs, self.grad.double() * mask, retain_graph=True)
        self._ref_grads.append((mask, grads))
        return grads

    def runner(self, module):
        """A callable running one step of ``module`` and returning what is checked against the reference."""
        if not self.training:
            def infer():
                with torch.no_grad():
                    return (module(self.x),)
            return infer
        x = self.x.detach().clone().requires_grad_()
        params = list(module.parameters())

        def train_step():
            x.grad = None
            for p in params:
                p.grad = None
            out = module(x)
            out.backward(self.grad)
            return out.detach(), x.grad, conv_weight(module).grad
        return train_step

    def errors(self, outs):
        """Relative errors (max |out - ref| / max |ref|) of the output (training: and of dx, dw)."""
        refs = (self.ref[0], *self._train_reference(outs[0])) if self.training else self.ref
        return [rel_err(o, r) for o, r in zip(outs, refs)]

    def check(self, outs):
        err = max(self.errors(outs))
        return err, err <= (TRAIN_TOL if self.training else TOL)[self.dtype]

    def flops(self):
        return machine_peak.conv_flops(self.n, self.c, self.c, self.hw, self.stride, training=self.training)

    def bytes(self):
        return machine_peak.conv_bytes(self.n, self.c, self.c, self.hw, self.stride, self.x.element_size(),
                                       training=self.training)


def conv_weight(module):
    module = getattr(module, "_orig_mod", module)
    return module[0].weight if isinstance(module, nn.Sequential) else module.conv.weight


def compiled_module(case):
    torch._dynamo.reset()  # fresh caches: no recompile limit across shapes, no automatic dynamic shapes
    freezing = case.device.type == "cpu" and not case.training
    torch._inductor.config.freezing = freezing
    module = copy.deepcopy(case.eager)
    return torch.compile(module, dynamic=False), ("inductor+freezing" if freezing else "inductor")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_timer(fn):
    return tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def time_variants(fns, device, min_run_time, rounds, min_runs, warmup, block_s=0.02):
    """Times every variant with torch.utils.benchmark (``Timer.timeit`` blocks; CUDA synchronized) in
    ``rounds`` interleaved rounds (robust to drift), each round at least min_run_time / rounds seconds and
    ceil(min_runs / rounds) blocks per variant. A block runs the step enough times to last >= block_s.
    Returns {name: Measurement} with median / IQR over all blocks."""
    timers, numbers, parts = {}, {}, {name: [] for name in fns}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        sync(device)
        timers[name] = make_timer(fn)
        first = timers[name].timeit(number=1)
        numbers[name] = max(1, int(block_s / max(first.median, 1e-7)))
        if numbers[name] == 1:
            parts[name].append(first)  # a warm run of a slow step: keep it
    per_round = -(-min_runs // rounds)
    for r in range(rounds):
        for name in fns:
            t0, count = time.perf_counter(), (len(parts[name]) if r == 0 else 0)
            while count < per_round or time.perf_counter() - t0 < min_run_time / rounds:
                parts[name].append(timers[name].timeit(number=numbers[name]))
                count += 1
    return {name: tb.Measurement.merge(ms)[0] for name, ms in parts.items()}


def compile_wanted(args, device, n, dtype_name, layout):
    if args.no_compile:
        return False
    if args.compile or args.all:
        return True
    if args.quick:
        return False
    if device.type == "cuda":  # every dtype at the largest batch: ~100 compiles instead of ~500
        return n == args.max_batch and layout == "channels_last"
    return n == 8 and dtype_name == "float32" and layout == "channels_last"


def run_case(case, args, peaks, label):
    base = {"case": f"{case.name}/N{case.n}/{case.dtype_name}/{case.layout}", "shape": case.name, "C": case.c,
            "HW": case.hw, "stride": case.stride, "N": case.n, "dtype": case.dtype_name, "layout": case.layout,
            "mode": case.mode, "device": case.device.type,
            "peak_gflops": f"{peaks['gflops'][case.dtype_name]:.1f}", "peak_gbs": f"{peaks['gbs']:.1f}"}
    rows, fns = {}, {}
    with torch.no_grad() if not case.training else torch.enable_grad():
        decision = case.fused.explain(case.x.detach().requires_grad_(case.training))
    variants = [("fused", case.fused, f"rk:{decision.path}"), ("eager", case.eager, "aten")]
    if compile_wanted(args, case.device, case.n, case.dtype_name, case.layout):
        variants.append(("compile", None, None))
    for variant, module, path in variants:
        row = dict(base, variant=variant, path=path)
        rows[variant] = row
        try:
            if variant == "compile":
                module, row["path"] = compiled_module(case)
                t0 = time.perf_counter()
            fn = case.runner(module)
            outs = fn()
            sync(case.device)
            if variant == "compile":
                row["compile_s"] = f"{time.perf_counter() - t0:.1f}"
        except Exception as e:  # noqa: BLE001 - reported in the row
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:160]
            row["status"] = f"{'compile failed' if variant == 'compile' else 'error'}: {msg}"
            continue
        err, ok = case.check(outs)
        row["max_rel_err"] = f"{err:.1e}"
        if not ok:
            row["status"] = "WRONG (not timed)"
            continue
        row["status"] = "ok"
        fns[variant] = fn
    rows["fused"]["decision"] = dataclasses.asdict(decision)
    if "fused" in fns:
        rows["fused"]["kernels"] = " ".join(record.kernel_scopes(fns["fused"]))
    warmup = 3 if case.device.type == "cuda" else 0  # on CPU the checked call was the warm-up
    meas = time_variants(fns, case.device, args.min_run_time, args.rounds, args.min_runs, warmup) if fns else {}
    flops, nbytes = case.flops(), case.bytes()
    for variant, m in meas.items():
        t = m.median
        rows[variant].update(median_ms=f"{t * 1e3:.3f}", min_ms=f"{min(m.times) * 1e3:.3f}",
                             max_ms=f"{max(m.times) * 1e3:.3f}", iqr_ms=f"{m.iqr * 1e3:.3f}", runs=len(m.times),
                             gflops=f"{flops / t / 1e9:.1f}", gbs=f"{nbytes / t / 1e9:.2f}",
                             pct_peak_flops=f"{flops / t / 1e9 / peaks['gflops'][case.dtype_name]:.1%}",
                             pct_peak_bw=f"{nbytes / t / 1e9 / peaks['gbs']:.1%}")
        for ref in ("eager", "compile"):
            if ref in meas:
                rows[variant][f"ratio_vs_{ref}"] = f"{meas[ref].median / t:.2f}"
    summary = "  ".join(
        f"{v} {float(r['median_ms']):8.3f} ms" if "median_ms" in r else f"{v} {r['status'][:40]}"
        for v, r in rows.items())
    fr = rows["fused"]
    ratios = "  ".join(f"{k.replace('ratio_', '')} {fr[k]}x" for k in ("ratio_vs_eager", "ratio_vs_compile") if k in fr)
    print(f"[{label}] {base['case']:38s} {summary}  {ratios}  ({fr.get('gflops', '-')} GFLOP/s, "
          f"{fr.get('pct_peak_flops', '-')} of peak, {fr['path']}{' ' + fr['kernels'] if fr.get('kernels') else ''})",
          flush=True)
    return list(rows.values())


def select(args, device):
    shapes = [s for s in SHAPES if (s[0] in QUICK_SHAPES if args.quick else True)]
    if args.shapes:
        shapes = [s for s in SHAPES if any(f in s[0] for f in args.shapes.split(","))]
    cuda = device.type == "cuda"
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    else:
        batches = [1, 8] if args.quick else [1, 8, 32]
    if not cuda and not (args.lift_batch_cap or args.all):
        batches = [b for b in batches if b <= 8] or [min(batches)]
    if args.dtypes:
        dtypes = args.dtypes.split(",")
    else:
        dtypes = ["float32"] if args.quick else ["float32", "bfloat16"] + (["float16"] if cuda else [])
    if args.layouts:
        layouts = args.layouts.split(",")
    else:
        layouts = ["channels_last"] if args.quick else ["channels_last", "nchw"]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; choose from {sorted(DTYPES)}")
    for lay in layouts:
        if lay not in ("channels_last", "nchw"):
            raise SystemExit(f"unknown layout {lay!r}")
    return shapes, batches, dtypes, layouts


def write_scratch(rows, out_dir, mode, device, env):
    """kernels_<mode>_<device>.csv and its plot in the scratch directory."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"kernels_{mode}_{device.type}")
    machine_peak.write_csv(f"{stem}.csv", rows, FIELDS)
    files = [f"{stem}.csv"]
    try:
        import plot_results
        where = env["gpu"] if device.type == "cuda" else env["cpu"]
        plot_results.plot_kernels(f"{stem}.csv", f"{stem}.png", title=f"{mode}, {device.type}, {where}")
        files.append(f"{stem}.png")
    except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the tables
        print(f"# plot failed: {type(e).__name__}: {e}", flush=True)
    print("scratch: " + ", ".join(files), flush=True)


MD_COLUMNS = ["case", "variant", "status", "path", "kernels", "max_rel_err", "median_ms", "min_ms", "max_ms", "runs",
              "ratio_vs_eager", "ratio_vs_compile", "gflops", "gbs", "pct_peak_flops", "pct_peak_bw", "compile_s"]


def record_markdown(rows_by_mode, peaks):
    """The record's body: the peaks, the models behind the derived columns, and one table per mode."""
    body = (f"Peaks: {', '.join(f'{k} {v:.0f} GFLOP/s' for k, v in peaks['gflops'].items())}, "
            f"{peaks['gbs']:.1f} GB/s ({peaks['how']}).\n"
            "Times: median [min-max] over the timed blocks (each block repeats the step for >= 20 ms). "
            "ratio_vs_X = X median / row median (> 1: row faster). FLOPs: 2*N*C_out*OH*OW*(C_in/32)*9, x3 for a "
            "training step (forward, data and weight gradients); bytes: |x|+|w|+|y| once, x3 for a training step. "
            "kernels: the resnext_kernels profiler scopes one step opened.\n")
    for mode, rows in rows_by_mode.items():
        body += f"\n## {mode}\n\n" + machine_peak.markdown_table(rows, MD_COLUMNS)
    return body


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke run: 2 shapes, N=1,8, float32, channels_last, short timing, no compile")
    parser.add_argument("--mode", choices=["inference", "training", "all"], default="all")
    parser.add_argument("--shapes", help="comma-separated substrings of shape names (x50.stage1, x101, .s2, ...)")
    parser.add_argument("--batches", "--batch", help="comma-separated batch sizes (default 1,8,32; CPU: <= 8)")
    parser.add_argument("--dtypes", "--dtype", help="comma-separated: float32,bfloat16,float16 (default: "
                                                    "float32,bfloat16, + float16 on CUDA)")
    parser.add_argument("--layouts", "--layout", help="comma-separated: channels_last,nchw (default both)")
    parser.add_argument("--lift-batch-cap", action="store_true", help="on CPU also run batch sizes above 8")
    parser.add_argument("--compile", action="store_true", help="a torch.compile row for every case")
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile rows")
    parser.add_argument("--all", action="store_true", help="every batch size and a compile row everywhere "
                                                           "(default: compile rows only for channels_last at N=8 "
                                                           "float32 on CPU, at the largest N on CUDA)")
    parser.add_argument("--cpu", action="store_true", help="benchmark on CPU even when CUDA is present")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per row")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds over the variants")
    parser.add_argument("--min-runs", type=int, default=None, help="at least this many timed blocks per row")
    parser.add_argument("--peak-gflops", help="override the measured GEMM peak: G (all dtypes) or float32=G,...")
    parser.add_argument("--peak-gbs", type=float, help="override the measured copy bandwidth (GB/s)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
                        help="scratch directory for the CSV and plot (default benchmarks/out)")
    parser.add_argument("--results-dir", default=None,
                        help="where the run's record goes (default benchmarks/results; --quick: none unless given)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    cuda = device.type == "cuda"
    if args.min_run_time is None:
        args.min_run_time = 0.1 if args.quick else (0.2 if cuda else 0.3)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.min_runs = args.min_runs or (3 if args.quick else 5)
    if cuda:
        torch.backends.cudnn.benchmark = True  # the baselines get cuDNN's best algorithm
    shapes, batches, dtypes, layouts = select(args, device)
    args.max_batch = max(batches)
    modes = ["inference", "training"] if args.mode == "all" else [args.mode]

    t_start = time.perf_counter()
    env = machine_peak.environment(device)
    peaks = machine_peak.measure_peaks(device, dtypes, quick=args.quick)
    override = machine_peak.parse_peak_override(args.peak_gflops, dtypes)
    if override:
        peaks["gflops"].update(override)
        peaks["how"] += "; GFLOP/s overridden by --peak-gflops"
    if args.peak_gbs:
        peaks["gbs"] = args.peak_gbs
        peaks["how"] += "; GB/s overridden by --peak-gbs"
    print(f"# {device.type}: {env['gpu'] if cuda else env['cpu']}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}; peaks " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks["gflops"].items())
          + f", {peaks['gbs']:.1f} GB/s ({time.perf_counter() - t_start:.1f} s)", flush=True)

    status = 0
    run_record = record.new_record("kernels", "bench_kernels.py", args.argv, device)
    run_record["peaks"] = peaks
    run_record["quick"] = args.quick
    rows_by_mode = {}
    for mode in modes:
        cases = [(s, n, d, lay) for s in shapes for n in batches for d in dtypes for lay in layouts]
        print(f"# {mode}: {len(cases)} cases ({len(shapes)} shapes x N {batches} x {dtypes} x {layouts})",
              flush=True)
        rows = []
        for i, (shape, n, dtype_name, layout) in enumerate(cases):
            case = Case(shape, n, dtype_name, layout, mode, device)
            rows += run_case(case, args, peaks, f"{mode[:5]} {i + 1}/{len(cases)}")
            del case
        torch._inductor.config.freezing = False
        write_scratch(rows, args.out, mode, device, env)
        rows_by_mode[mode] = rows
        run_record["rows"] += record.json_rows(rows)
        n_wrong = sum(r["status"].startswith("WRONG") or r["status"].startswith("error") for r in rows)
        n_compile_failed = sum(r["status"].startswith("compile failed") for r in rows)
        print(f"# {mode}: {len(rows)} rows, {n_wrong} wrong/error, {n_compile_failed} compile failures "
              f"({time.perf_counter() - t_start:.0f} s so far)", flush=True)
        status |= 1 if n_wrong else 0
    results_dir = args.results_dir or (None if args.quick else record.RESULTS_DIR)
    if results_dir:
        stem = record.write(run_record, record_markdown(rows_by_mode, peaks), results_dir)
        print(f"record: {stem}.md, {stem}.json", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

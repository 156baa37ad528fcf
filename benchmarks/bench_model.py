"""Model benchmark: images per second of resnext_kernels' models against torchvision's eager model, against
torch.compile (Inductor) of torchvision's model and against torch.compile of ours, for ResNeXt-50 32x4d and
ResNet-50, in inference (eval, no grad) and a training step (SGD with momentum: zero_grad, forward, cross-entropy,
backward, step), measured in the same process.

Dtypes and layouts: eval in every --dtypes (default float32, + bfloat16 where the CPU multiplies bfloat16 natively)
x --layouts (default channels_last and NCHW; bfloat16 channels_last only); the training step in float32,
channels_last.

Ours is ``rk.models.<name>()`` loaded with the torchvision model's state_dict; each contender gets its own
copy of the same initial weights. Before timing, every row is checked against torchvision eager: eval
logits, and for training the logits of the first (batch-statistics) forward and the loss, max relative
difference <= 1e-3 of the largest value (bfloat16: 5e-2, a few roundings of its 8-bit mantissa); a mismatch is reported as WRONG and not timed, a compile failure
is reported in its row. On CPU the inference compile uses ``torch._inductor.config.freezing = True``
(BatchNorm folded into the convs).

Timing: median (and min / max) of --repeats timed steps after warm-up (wall clock, CUDA synchronized), the
contenders of a row taking one step each in turn (interleaved), so that a change of load or clock falls on all.
Memory: for training, ``saved_MB`` = bytes of the distinct tensors autograd saves for backward in one
step (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded), i.e. the activation memory;
on CUDA also ``cuda_peak_MB`` = ``torch.cuda.max_memory_allocated`` during a step minus the memory
allocated before it.

Batches: eval runs at every batch of --batch (default 1 and 8 on CPU, 32 on CUDA), the training step at
--train-batch (default the largest of them). kernels: the ``resnext_kernels::`` profiler scopes one step of ours
opens other than the operators themselves (see bench_kernels.py).

Inference engines (optional dependencies, CPU, eval float32 rows): ONNX Runtime and OpenVINO where installed
(``pip install onnxruntime openvino onnxscript``), running torchvision's model exported with ``torch.onnx.export``
(float32 precision, as many threads as torch), so that the engines CPU deployments use stand beside ours.

Results: the run's record, benchmarks/results/<machine>-<date>-<commit>-models.{md,json} (record.py; not with
--quick unless --results-dir is given), and the scratch CSV models_<device>.csv in --out (default benchmarks/out/).

usage: python benchmarks/bench_model.py [--quick] [--models resnext50_32x4d,resnet50] [--batch 1,8]
            [--train-batch 8] [--image-size 224] [--repeats 5] [--modes eval,train] [--dtypes float32,bfloat16]
            [--layouts channels_last,nchw] [--compile | --no-compile]
            [--cpu] [--out DIR] [--results-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import torchvision

import resnext_kernels as rk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine_peak  # noqa: E402
import record  # noqa: E402

TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FIELDS = ["model", "mode", "impl", "status", "max_rel_err", "device", "batch", "dtype", "layout", "image_size", "median_ms", "min_ms",
          "max_ms", "runs", "img_s", "ratio_vs_torchvision", "ratio_vs_compile", "saved_MB", "cuda_peak_MB",
          "compile_s", "kernels"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(steps, device, repeats, warmup):
    """Seconds per step of each contender: ``warmup`` steps of each, then ``repeats`` rounds in which each runs one
    step in turn, so that a change of load or clock during the run falls on all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync(device)
    times = {impl: [] for impl in steps}
    for _ in range(repeats):
        for impl, step in steps.items():
            t0 = time.perf_counter()
            step()
            sync(device)
            times[impl].append(time.perf_counter() - t0)
    return times


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def saved_tensor_bytes(fn, params):
    """(bytes of the distinct storages autograd saves during ``fn()`` (parameters excluded), fn's result)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs and s.device.type != "meta":
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(seen.values()), result


def cuda_peak_bytes(fn, device):
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def build(name, model_name, ref_state, device, dtype, layout):
    if name.startswith("resnext_kernels"):
        model = getattr(rk.models, model_name)()
    else:
        model = getattr(torchvision.models, model_name)()
    model.load_state_dict(ref_state)
    return model.to(device, dtype).to(memory_format=MEMORY_FORMATS[layout])


MEMORY_FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


def inputs(batch, args, device, dtype, layout):
    """The batch of images (in ``layout``) and targets every contender gets."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, args.image_size, args.image_size, device=device).to(dtype)
    x = x.contiguous(memory_format=MEMORY_FORMATS[layout])
    return x, torch.randint(0, 1000, (batch,), device=device)


def configs(args):
    """(mode, batch, dtype, layout) of every case: eval at each batch, dtype and layout (16-bit dtypes in
    channels_last only), then the training step in float32, channels_last."""
    out = []
    if "eval" in args.modes:
        for dtype in args.dtypes:
            for layout in args.layouts:
                if dtype == "float32" or layout == "channels_last":
                    out += [("eval", b, dtype, layout) for b in args.batches]
    if "train" in args.modes:
        out.append(("train", args.train_batch, "float32", "channels_last"))
    return out


ENGINES = ("onnxruntime", "openvino")


def available_engines(args, device):
    """The inference engines (optional dependencies) importable here, with their versions."""
    if device.type != "cpu" or not args.engines:
        return {}
    found = {}
    for engine in ENGINES:
        try:
            found[engine] = importlib.import_module(engine).__version__
        except Exception:  # noqa: BLE001 - not installed or broken: no row
            pass
    return found


def engine_runner(engine, model_name, ref_state, batch, args, cache):
    """A function running the torchvision model, exported to ONNX once per (model, batch), in ``engine`` on a
    float32 NCHW numpy batch (float32 precision: OpenVINO would otherwise run bfloat16 where the CPU has it)."""
    key = (model_name, batch)
    if key not in cache:
        model = getattr(torchvision.models, model_name)()
        model.load_state_dict(ref_state)
        path = os.path.join(cache["dir"], f"{model_name}_{batch}.onnx")
        example = torch.randn(batch, 3, args.image_size, args.image_size)
        torch.onnx.export(model.eval(), (example,), path, dynamo=True, external_data=False)
        cache[key] = path
    threads = torch.get_num_threads()
    if engine == "onnxruntime":
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # Its threads would otherwise spin on after each run, taking the cores from the contender timed next.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(cache[key], options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda a: session.run(None, {name: a})[0]
    import openvino as ov
    compiled = ov.Core().compile_model(cache[key], "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                           "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return lambda a: request.infer([a])[compiled.output(0)]


def run_model(model_name, args, device):
    torch.manual_seed(0)
    ref_state = getattr(torchvision.models, model_name)().state_dict()
    impls = ["torchvision", "resnext_kernels"]
    impls += ["torchvision+compile", "resnext_kernels+compile"] if args.compile else []
    engines = available_engines(args, device)
    export_cache = {"dir": tempfile.mkdtemp(prefix="rk_onnx_")}
    rows = []
    for mode, batch, dtype_name, layout in configs(args):
        dtype = DTYPES[dtype_name]
        x, target = inputs(batch, args, device, dtype, layout)
        training = mode == "train"
        results, steps, reference = {}, {}, None
        row_impls = impls + (list(engines) if mode == "eval" and dtype_name == "float32" else [])
        for impl in row_impls:
            row = {"model": model_name, "mode": mode, "impl": impl, "device": device.type, "batch": batch,
                   "dtype": dtype_name, "layout": layout, "image_size": args.image_size}
            results[impl] = row
            if impl in ENGINES:
                try:
                    run = engine_runner(impl, model_name, ref_state, batch, args, export_cache)
                    array = x.contiguous().numpy()  # ONNX models take NCHW
                    check = (torch.from_numpy(run(array)),)
                except Exception as e:  # noqa: BLE001 - reported in the row
                    row["status"] = "error: " + " ".join(f"{type(e).__name__}: {e}".split())[:160]
                    continue
                err = max(rel_err(a, b) for a, b in zip(check, reference))
                row["max_rel_err"] = f"{err:.1e}"
                row["status"] = "ok" if err <= TOL[dtype] else "WRONG (not timed)"
                row["kernels"] = f"{impl} {engines[impl]}"
                if row["status"] == "ok":
                    steps[impl] = functools.partial(run, array)
                continue
            model = build(impl, model_name, copy.deepcopy(ref_state), device, dtype, layout).train(training)
            module = model
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if training else None
            try:
                if impl.endswith("+compile"):
                    torch._dynamo.reset()
                    torch._inductor.config.freezing = device.type == "cpu" and not training
                    module = torch.compile(model, dynamic=False)
                if impl == "resnext_kernels" and training:
                    # The CPU run-time choice times each layer on its first call, with tensors autograd saves for
                    # the timing runs: made on a copy first, so that saved_MB counts the step's own.
                    spare = copy.deepcopy(model)
                    F.cross_entropy(spare(x), target).backward()
                    del spare
                t0 = time.perf_counter()
                if training:
                    def first_step():
                        logits = module(x)
                        loss = F.cross_entropy(logits, target)
                        loss.backward()
                        optimizer.step()
                        return logits.detach(), loss.detach().reshape(1)
                    try:  # the checked step also measures the saved activations
                        saved, check = saved_tensor_bytes(first_step, list(model.parameters()))
                        row["saved_MB"] = f"{saved / 2**20:.1f}"
                    except Exception as e:  # noqa: BLE001 - e.g. hooks unsupported under compile: plain step
                        row["saved_MB"] = f"n/a ({type(e).__name__})"
                        optimizer.zero_grad(set_to_none=True)
                        check = first_step()
                else:
                    with torch.no_grad():
                        check = (module(x),)
                sync(device)
                if impl.endswith("+compile"):
                    row["compile_s"] = f"{time.perf_counter() - t0:.1f}"
            except Exception as e:  # noqa: BLE001 - reported in the row
                msg = " ".join(f"{type(e).__name__}: {e}".split())[:160]
                row["status"] = f"{'compile failed' if impl.endswith('+compile') else 'error'}: {msg}"
                continue
            if impl == "torchvision":
                reference = check
            err = max(rel_err(a, b) for a, b in zip(check, reference))
            row["max_rel_err"] = f"{err:.1e}"
            if not err <= TOL[dtype]:
                row["status"] = "WRONG (not timed)"
                continue
            row["status"] = "ok"

            if training:
                def step(module=module, optimizer=optimizer):
                    optimizer.zero_grad(set_to_none=True)
                    F.cross_entropy(module(x), target).backward()
                    optimizer.step()
            else:
                def step(module=module):
                    with torch.no_grad():
                        module(x)
            steps[impl] = step
            if impl.startswith("resnext_kernels"):
                row["kernels"] = " ".join(record.kernel_scopes(step))
            if device.type == "cuda":
                row["cuda_peak_MB"] = f"{cuda_peak_bytes(step, device) / 2**20:.1f}"
        for impl, times in time_steps(steps, device, args.repeats, args.warmup).items():  # after all checks
            med = statistics.median(times)
            results[impl].update(median_ms=f"{med * 1e3:.1f}", min_ms=f"{min(times) * 1e3:.1f}",
                                 max_ms=f"{max(times) * 1e3:.1f}", runs=len(times), img_s=f"{batch / med:.2f}")
        for impl, row in results.items():
            if "median_ms" not in row:
                continue
            for ref, key in (("torchvision", "ratio_vs_torchvision"), ("torchvision+compile", "ratio_vs_compile")):
                if "median_ms" in results.get(ref, {}):
                    row[key] = f"{float(results[ref]['median_ms']) / float(row['median_ms']):.2f}"
            print(f"{model_name:16s} {mode:5s} N={batch:<3d} {dtype_name:8s} {layout:13s} {impl:23s} "
                  f"{row['img_s']:>8s} img/s  "
                  f"median {row['median_ms']} ms "
                  f"(range {row['min_ms']}-{row['max_ms']})  vs torchvision {row.get('ratio_vs_torchvision', '-')}x"
                  f"  vs compile {row.get('ratio_vs_compile', '-')}x  saved {row.get('saved_MB', '-')} MB"
                  f"  err {row['max_rel_err']}", flush=True)
        for impl, row in results.items():
            if row["status"] != "ok":
                print(f"{model_name:16s} {mode:5s} N={batch:<3d} {dtype_name:8s} {layout:13s} {impl:23s} "
                      f"{row['status']}", flush=True)
        rows += results.values()
        torch._inductor.config.freezing = False
    return rows


def record_markdown(rows, args):
    cols = [c for c in FIELDS if c not in ("device", "image_size")]
    return (f"{args.image_size}x{args.image_size} images; times: median [min-max] of "
            f"{args.repeats} steps after {args.warmup} warm-up steps. ratio_vs_X = X median / row median (> 1: row "
            "faster). saved_MB: activation bytes saved for backward in one training step. kernels: the "
            "resnext_kernels profiler scopes one step of ours opened.\n\n" + machine_peak.markdown_table(rows, cols))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke run: batch 2, 64x64 images, 2 timed runs, no compile unless --compile")
    parser.add_argument("--models", "--model", default="resnext50_32x4d,resnet50")
    parser.add_argument("--batch", "--batches", default=None,
                        help="comma-separated eval batch sizes (default 1,8 on CPU, 32 on CUDA, 2 with --quick)")
    parser.add_argument("--train-batch", type=int, default=None,
                        help="batch size of the training step (default: the largest eval batch)")
    parser.add_argument("--image-size", "--size", type=int, default=None,
                        help="default 224 (64 with --quick: smaller leaves BatchNorm too few values per channel "
                             "in layer4 for a stable check)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 5, 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--modes", default="eval,train", help="comma-separated: eval,train")
    parser.add_argument("--no-train", action="store_true", help="same as --modes eval")
    parser.add_argument("--dtypes", "--dtype", default=None,
                        help="comma-separated eval dtypes (default float32, + bfloat16 where the CPU multiplies it "
                             "natively or on CUDA; float32 only with --quick)")
    parser.add_argument("--layouts", "--layout", default=None,
                        help="comma-separated eval layouts: channels_last,nchw (default both; channels_last with "
                             "--quick)")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="time torch.compile of the torchvision model (default: yes, except with --quick)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-engines", dest="engines", action="store_false",
                        help="no ONNX Runtime / OpenVINO rows (by default: eval float32 rows for each of them that "
                             "is installed, on CPU; the torchvision model exported to ONNX once per batch size)")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
                        help="scratch directory for the CSV (default benchmarks/out)")
    parser.add_argument("--results-dir", default=None,
                        help="where the run's record goes (default benchmarks/results; --quick: none unless given)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if args.batch is None:
        args.batch = "2" if args.quick else ("32" if device.type == "cuda" else "1,8")
    args.batches = [int(b) for b in str(args.batch).split(",")]
    args.train_batch = args.train_batch or max(args.batches)
    if args.image_size is None:
        args.image_size = 64 if args.quick else 224
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.warmup is None:
        args.warmup = 0 if args.quick else 2  # the checked first step is a warm-up too
    if args.compile is None:
        args.compile = not args.quick
    args.modes = ["eval"] if args.no_train else args.modes.split(",")
    if args.dtypes is None:
        native_bf16 = device.type == "cuda" or rk.ops.cpu_config().native_bf16
        args.dtypes = "float32" + (",bfloat16" if native_bf16 and not args.quick else "")
    args.dtypes = args.dtypes.split(",")
    if any(d not in DTYPES for d in args.dtypes):
        parser.error(f"--dtypes: choose from {', '.join(DTYPES)}")
    args.layouts = (args.layouts or ("channels_last" if args.quick else "channels_last,nchw")).split(",")
    if any(layout not in MEMORY_FORMATS for layout in args.layouts):
        parser.error(f"--layouts: choose from {', '.join(MEMORY_FORMATS)}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    env = machine_peak.environment(device)
    print(f"# {device.type}: {env['gpu'] if device.type == 'cuda' else env['cpu']}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; eval batches {args.batches}, training batch {args.train_batch}, "
          f"{args.image_size}x{args.image_size}, eval {'/'.join(args.dtypes)} x {'/'.join(args.layouts)}, training "
          f"float32 channels_last, median of {args.repeats} after "
          f"{args.warmup} warm-up", flush=True)
    run_record = record.new_record("models", "bench_model.py", args.argv, device)
    run_record["quick"] = args.quick
    rows = []
    for model_name in args.models.split(","):
        rows += run_model(model_name, args, device)
    os.makedirs(args.out, exist_ok=True)
    machine_peak.write_csv(os.path.join(args.out, f"models_{device.type}.csv"), rows, FIELDS)
    print(f"scratch: {os.path.join(args.out, f'models_{device.type}.csv')}", flush=True)
    results_dir = args.results_dir or (None if args.quick else record.RESULTS_DIR)
    if results_dir:
        run_record["rows"] = record.json_rows(rows)
        stem = record.write(run_record, record_markdown(rows, args), results_dir)
        print(f"record: {stem}.md, {stem}.json", flush=True)
    return 1 if any(r["status"].startswith(("WRONG", "error")) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

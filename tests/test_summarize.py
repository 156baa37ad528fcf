"""benchmarks/summarize.py: the README's performance section is generated from the result records, picks the latest
full run per CPU class, and --check fails when the README and the records disagree (the real README included)."""

import copy
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import summarize  # noqa: E402

SHAPES = ["x50.stage1", "x50.stage4.s2"]


def _machine(kernel_isa="avx512"):
    return {"device": "cpu", "cpu": "Test CPU", "vendor": "AuthenticAMD", "family": 25, "model": 17,
            "microarchitecture": "zen4", "isa_class": "avx512", "kernel_isa": kernel_isa, "native_bf16": True,
            "cores": 2, "torch_threads": 2, "gpu": None}


def _kernel_record(fused_ms, date="2026-01-01", time="10:00:00", commit="aaaaaaa", kernel_isa="avx512", quick=False):
    rows = []
    for mode in ("inference", "training"):
        for shape in SHAPES:
            case = dict(shape=shape, N=8, dtype="float32", layout="channels_last", mode=mode, status="ok")
            eager_ms, compile_ms = 2 * fused_ms, 3 * fused_ms
            rows.append(dict(case, variant="fused", median_ms=fused_ms, min_ms=fused_ms * 0.9, max_ms=fused_ms * 1.2,
                             ratio_vs_eager=eager_ms / fused_ms, ratio_vs_compile=compile_ms / fused_ms,
                             kernels="winograd_f4x4" if shape == "x50.stage1" else None,
                             decision={"path": "cpu", "reason": "fused kernel"}))
            rows.append(dict(case, variant="eager", median_ms=eager_ms, min_ms=eager_ms, max_ms=eager_ms))
            rows.append(dict(case, variant="compile", median_ms=compile_ms, min_ms=compile_ms, max_ms=compile_ms))
            # rows the table leaves out: another batch and dtype
            rows.append(dict(case, N=1, variant="fused", median_ms=99.0, min_ms=99.0, max_ms=99.0))
            rows.append(dict(case, dtype="bfloat16", variant="fused", median_ms=98.0, min_ms=98.0, max_ms=98.0))
    return {"schema": 1, "bench": "kernels", "date": date, "time": time, "commit": commit, "dirty": False,
            "command": "python benchmarks/bench_kernels.py --shapes x50", "environment": {},
            "machine": _machine(kernel_isa), "torch": "2.0", "python": "3.11", "quick": quick, "rows": rows,
            "peaks": {"gflops": {"float32": 123.4}, "gbs": 45.6}}


def _model_record(ours_ms, date="2026-01-01", commit="aaaaaaa"):
    rows = []
    for mode, batch, layout in (("eval", 1, "channels_last"), ("eval", 1, "nchw"), ("eval", 8, "channels_last"),
                                ("train", 8, "channels_last")):
        for impl, ms in (("torchvision", 2 * ours_ms), ("resnext_kernels", ours_ms), ("torchvision+compile", ours_ms),
                         ("resnext_kernels+compile", 0.8 * ours_ms)):
            rows.append(dict(model="resnext50_32x4d", mode=mode, impl=impl, status="ok", batch=batch, image_size=224,
                             dtype="float32", layout=layout, median_ms=ms, min_ms=ms, max_ms=ms,
                             ratio_vs_torchvision=2 * ours_ms / ms, ratio_vs_compile=ours_ms / ms))
        if mode == "eval" and layout == "nchw":
            rows.append(dict(model="resnext50_32x4d", mode=mode, impl="openvino", status="ok", batch=batch,
                             image_size=224, dtype="float32", layout=layout, median_ms=50.0, min_ms=49.0,
                             max_ms=51.0))
    return {"schema": 1, "bench": "models", "date": date, "time": "10:00:00", "commit": commit, "dirty": False,
            "command": "python benchmarks/bench_model.py", "environment": {}, "machine": _machine(),
            "torch": "2.0", "python": "3.11", "quick": False, "rows": rows}


def _allocator_record():
    rows = []
    for allocator, factor in (("glibc", 1.0), ("glibc tuned", 0.8), ("jemalloc", 1.25)):
        for impl, ms in (("resnext_kernels", 100.0), ("torchvision", 120.0)):
            rows.append(dict(allocator=allocator, model="resnext50_32x4d", mode="train", impl=impl, batch=8,
                             dtype="float32", layout="channels_last", median_ms=ms * factor, vs_glibc=1 / factor))
    return {"schema": 1, "bench": "allocators", "date": "2026-01-01", "time": "10:00:00", "commit": "7777777",
            "dirty": False, "command": "python benchmarks/bench_allocators.py", "environment": {},
            "machine": _machine(), "torch": "2.0", "python": "3.11", "quick": False, "rows": rows}


def _write(results, name, record):
    results.mkdir(exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(record))


@pytest.fixture
def results(tmp_path):
    r = tmp_path / "results"
    _write(r, "a-old", _kernel_record(1.0, date="2026-01-01", commit="1111111"))
    _write(r, "b-new", _kernel_record(4.0, date="2026-02-01", commit="2222222"))
    _write(r, "c-quick", _kernel_record(7.0, date="2026-03-01", commit="3333333", quick=True))
    _write(r, "d-avx2", _kernel_record(5.0, kernel_isa="avx2", commit="4444444"))
    _write(r, "e-models", _model_record(100.0))
    _write(r, "f-allocators", _allocator_record())
    return r


def _readme(tmp_path, body="stale"):
    path = tmp_path / "README.md"
    path.write_text(f"# title\n\n{summarize.BEGIN}\n{body}\n{summarize.END}\n\nafter\n")
    return path


def test_latest_full_run_per_cpu_class(tmp_path, results):
    text = summarize.section(summarize.load_records(str(results), str(tmp_path)))
    avx512, avx2 = text.split("### AVX2 kernels")
    assert "### AVX-512 kernels" in avx512
    # the newest full AVX-512 run (4 ms), not the older one nor the newer --quick one; the path column: the profiler
    # scopes where recorded, else explain()'s decision
    assert ("| stage 1 | winograd_f4x4 | 4.00 [3.60-4.80] | 2.00x | 3.00x | 4.00 [3.60-4.80] | 2.00x | 3.00x |"
            in avx512)
    assert "| stage 4, stride 2 | direct | 4.00 [3.60-4.80] |" in avx512
    assert "commit 2222222" in avx512 and "1111111" not in text and "3333333" not in text
    assert "[record](results/b-new.md). Machine at the start of the run: float32 `torch.mm` 123 GFLOP/s, copy 45.6" \
        in avx512
    # N=8 float32 only: one row per shape
    assert avx512.count("| stage ") == 2 and "99.0" not in text and "98.0" not in text
    assert "5.00 [4.50-6.00]" in avx2 and "capped to AVX2 on this AVX-512 CPU" in avx2
    # the model record, under the CPU class it ran with
    for layout, openvino in (("channels_last", "-"), ("nchw", "50.0 [49.0-51.0]")):
        assert (f"| resnext50_32x4d | eval | 1 | float32 | {layout} | 100 [100-100] | 200 [200-200] | 100 [100-100] | "
                f"2.00x | 1.00x | 1.25x | {openvino} |") in avx512
    # every fused row of the kernel record against eager (the N=1 and bfloat16 rows have no eager row to compare)
    assert "at >= 0.95x eager: inference 2 of 2 (lowest 2.00x); training 2 of 2 (lowest 2.00x)." in avx512
    # the allocator record: one column per allocator, glibc malloc's time over each other's
    assert "| model | mode | batch | contender | glibc | glibc tuned | jemalloc |" in avx512
    assert "| resnext50_32x4d | train | 8 | torchvision | 120 | 96 (1.25x) | 150 (0.80x) |" in avx512
    assert "commit 7777777" in avx512
    assert "No GPU record yet" in text


def test_output_depends_on_the_files_only(tmp_path, results):
    first = summarize.section(summarize.load_records(str(results), str(tmp_path)))
    records = summarize.load_records(str(results), str(tmp_path))
    assert summarize.section(list(reversed(copy.deepcopy(records)))) == first


def test_check_fails_on_drift_and_passes_after_regenerating(tmp_path, results):
    readme = _readme(tmp_path)
    args = ["--results", str(results), "--readme", str(readme)]
    assert summarize.main(args + ["--check"]) == 1
    assert summarize.main(args) == 0
    text = readme.read_text()
    assert text.startswith("# title\n") and text.endswith("\n\nafter\n") and "stale" not in text
    assert summarize.main(args + ["--check"]) == 0
    readme.write_text(text.replace("4.00 [3.60-4.80]", "3.00 [3.60-4.80]"))  # a hand-edited figure
    assert summarize.main(args + ["--check"]) == 1
    _write(results, "f-newer", _kernel_record(6.0, date="2026-04-01"))  # a new record the README lacks
    assert summarize.main(args) == 0 and "6.00 [5.40-7.20]" in readme.read_text()


def test_missing_markers_are_an_error(tmp_path, results):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        summarize.main(["--results", str(results), "--readme", str(readme)])


def test_readme_matches_the_committed_records():
    assert summarize.main(["--check"]) == 0, "run python benchmarks/summarize.py"


def _predicted_record(date, commit, us):
    summaries = [dict(shape=shape, dtype="float16", form=form, gpu="h100", kernels=1, predicted_us=us * k,
                      compulsory_us=us, tensor_us=us / 4, compulsory_bytes=1, ratio=float(k))
                 for shape in SHAPES for k, form in ((1, "inference"), (2, "training"), (3, "backward"))]
    machine = dict(_machine(), device="emulator", gpu="H100 SXM5 80GB")
    return {"schema": 1, "bench": "predicted", "date": date, "time": "10:00:00", "commit": commit, "dirty": False,
            "command": "python benchmarks/predict_cuda.py", "environment": {}, "machine": machine, "torch": "2.0",
            "python": "3.11", "batch": 32, "summaries": summaries, "rows": []}


def test_predicted_cuda_times_stand_in_for_a_gpu_record(tmp_path, results):
    _write(results, "p-old", _predicted_record("2026-01-01", "5555555", 9.0))
    _write(results, "p-new", _predicted_record("2026-02-01", "6666666", 2.0))
    text = summarize.section(summarize.load_records(str(results), str(tmp_path)))
    gpus = text.split("### GPUs")[1]
    assert "No GPU record yet" in gpus and "Predicted, not measured" in gpus and "5555555" not in text
    assert "H100 SXM5 80GB as modelled by the emulator" in gpus and "commit 6666666" in gpus
    assert "| layer | inference | training forward | training backward |" in gpus
    assert "| stage 4, stride 2 | 2.0 (1.00x) | 4.0 (2.00x) | 6.0 (3.00x) |" in gpus
    # the CPU tables are unchanged by it
    assert text.split("### GPUs")[0] == summarize.section(
        [r for r in summarize.load_records(str(results), str(tmp_path)) if r["bench"] != "predicted"]).split(
        "### GPUs")[0]

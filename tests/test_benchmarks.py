"""Smoke test of the benchmark scripts: `--quick` runs of bench_kernels.py (inference and training) and
bench_model.py into a temporary directory; every output file exists, every row is ok (checked against
its reference, not WRONG), the speed ratios are positive numbers, and the run's record (record.py) names the
machine, the commit and the command and holds every row."""

import csv
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from resnext_kernels import emulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _run(script, out_dir, *args, timeout=240):
    cmd = [sys.executable, os.path.join(BENCH, script), "--quick", "--cpu", "--out", str(out_dir),
           "--results-dir", str(out_dir / "results"), *args]
    # the package of this checkout, not another installation that the script's directory would not shadow
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _rows(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows, f"{path} has no rows"
    return rows


def _positive(text):
    value = float(text)
    return value > 0 and value == value and value != float("inf")


def _record(out_dir, bench, n_rows):
    """The run's record: one .json and its .md, named <machine>-<date>-<commit>-<bench>."""
    paths = glob.glob(str(out_dir / "results" / f"*-{bench}.json"))
    assert len(paths) == 1, paths
    assert os.path.getsize(paths[0][:-5] + ".md") > 0
    with open(paths[0]) as f:
        rec = json.load(f)
    assert rec["schema"] == 1 and rec["bench"] == bench and rec["quick"] is True
    assert f"-{rec['date']}-{rec['commit']}-{bench}.json" in paths[0]
    env = "".join(f"{k}={v} " for k, v in rec["environment"].items() if k != "LD_PRELOAD")
    assert "RESNEXT_KERNELS_REQUIRE_EMULATOR" not in rec["environment"]
    assert rec["command"].startswith(env + f"python benchmarks/bench_{'kernels' if bench == 'kernels' else 'model'}.py")
    m = rec["machine"]
    assert m["device"] == "cpu" and m["cores"] >= 1 and m["cpu"] and m["kernel_isa"] and m["isa_class"]
    assert rec["torch"] and len(rec["rows"]) == n_rows
    return rec


@pytest.fixture(scope="module")
def kernel_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_kernels")
    stdout = _run("bench_kernels.py", out, "--mode", "all")
    return out, stdout


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_bench_kernels_quick(kernel_results, mode):
    out, stdout = kernel_results
    stem = out / f"kernels_{mode}_cpu"
    for ext in ("csv", "png"):
        assert (stem.with_suffix(f".{ext}")).stat().st_size > 0, f"missing {stem}.{ext}"
    assert (stem.with_suffix(".png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _rows(stem.with_suffix(".csv"))
    assert {r["variant"] for r in rows} >= {"fused", "eager"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["mode"] == mode and r["device"] == "cpu"
        assert float(r["max_rel_err"]) <= 1e-3, r
        for key in ("median_ms", "ratio_vs_eager", "gflops", "gbs", "peak_gflops", "peak_gbs"):
            assert _positive(r[key]), (key, r)
        if r["ratio_vs_compile"]:
            assert _positive(r["ratio_vs_compile"]), r
        assert int(r["runs"]) >= 3, r
    for r in rows:
        if r["variant"] == "eager":
            assert float(r["ratio_vs_eager"]) == 1.0
    cases = {r["case"] for r in rows}
    assert len(cases) == 4  # 2 shapes x N=1,8 (float32, channels_last)
    assert f"{mode}: 4 cases" in stdout and f"[{mode[:5]} 4/4]" in stdout  # progress lines
    rec = _record(out, "kernels", 16)  # 4 cases x (fused, eager) x 2 modes
    recorded = [r for r in rec["rows"] if r["mode"] == mode]
    assert [r["case"] for r in recorded] == [r["case"] for r in rows]
    for r in recorded:
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"], r
        if r["variant"] == "fused":
            assert r["decision"]["path"] == "cpu" and r["decision"]["reason"], r


def test_bench_model_quick(tmp_path):
    _run("bench_model.py", tmp_path, "--no-engines")
    assert (tmp_path / "models_cpu.csv").stat().st_size > 0
    rows = _rows(tmp_path / "models_cpu.csv")
    assert {(r["model"], r["mode"], r["impl"]) for r in rows} == {
        (m, mode, impl) for m in ("resnext50_32x4d", "resnet50") for mode in ("eval", "train")
        for impl in ("torchvision", "resnext_kernels")}
    for r in rows:
        assert r["status"] == "ok", r
        assert _positive(r["img_s"]) and _positive(r["ratio_vs_torchvision"]), r
        if r["mode"] == "train":
            assert _positive(r["saved_MB"]), r
    rec = _record(tmp_path, "models", len(rows))
    assert {(r["model"], r["mode"], r["impl"], r["batch"]) for r in rec["rows"]} == {
        (r["model"], r["mode"], r["impl"], int(r["batch"])) for r in rows}


@pytest.mark.skipif(not emulator.available(), reason="resnext_kernels._emu (emulated CUDA) not built")
def test_predict_cuda_writes_a_record_summarize_reads(tmp_path):
    """benchmarks/predict_cuda.py at one layer: the emulator's predictions as a record with the benchmarks'
    provenance, which summarize.py shows as a prediction while no GPU record exists."""
    cmd = [sys.executable, os.path.join(BENCH, "predict_cuda.py"), "--shapes", "x50.stage4", "--forms", "inference",
           "--batch", "4", "--results-dir", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    paths = glob.glob(str(tmp_path / "emulated-h100-sxm5-80gb-*-predicted.json"))
    assert len(paths) == 1, paths
    rec = json.load(open(paths[0]))
    assert rec["bench"] == "predicted" and rec["machine"]["device"] == "emulator" and rec["batch"] == 4
    assert rec["command"].endswith("python benchmarks/predict_cuda.py --shapes x50.stage4 --forms inference "
                                   f"--batch 4 --results-dir {tmp_path}")
    (summary,) = rec["summaries"]
    assert summary["shape"] == "x50.stage4" and summary["form"] == "inference"
    assert summary["predicted_us"] >= max(summary["compulsory_us"], summary["tensor_us"]) > 0
    assert any("conv_tc_fwd_kernel" in r["kernel"] for r in rec["rows"])
    assert "Predicted by the CUDA-on-CPU emulator" in open(paths[0][:-5] + ".md").read()
    sys.path.insert(0, BENCH)
    import summarize
    text = summarize.section(summarize.load_records(str(tmp_path), str(tmp_path)))
    assert "| stage 4 | " in text and "Predicted, not measured" in text


@pytest.mark.skipif(not any(importlib.util.find_spec(e) for e in ("onnxruntime", "openvino"))
                    or importlib.util.find_spec("onnxscript") is None,
                    reason="no inference engine (onnxruntime, openvino) or no onnxscript for the export")
def test_bench_model_engine_rows(tmp_path):
    """The optional engines' rows: the exported model's logits checked against torchvision's like every row."""
    _run("bench_model.py", tmp_path, "--models", "resnet50", "--no-train")
    rows = _rows(tmp_path / "models_cpu.csv")
    engines = [r for r in rows if r["impl"] in ("onnxruntime", "openvino")]
    assert engines and all(importlib.util.find_spec(r["impl"]) for r in engines)
    for r in engines:
        assert r["status"] == "ok" and float(r["max_rel_err"]) <= 1e-3 and _positive(r["img_s"]), r
        assert r["kernels"].startswith(r["impl"] + " "), r  # the engine's version

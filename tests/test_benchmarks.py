"""The speed benchmark's command line for the dense models: it runs as written (directly, as a script),
writes the documented records with consistent ratios, and rejects bad flags in one line.

Tiny models and sizes only; no timing is asserted (the values are whatever this machine gives)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "snn_speed.py")
KEYS = ("arch", "T", "neuron", "ratio_floor", "ratio_t_ann", "ann_ms", "ann_convs_ms", "peak_mb")


def _run(args, tmp_path, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, SCRIPT] + args, cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_snn_speed_is_a_runnable_script():
    """``benchmarks/snn_speed.py ...`` (no interpreter named) works: a shebang and the executable bit."""
    with open(SCRIPT) as f:
        assert f.readline().startswith("#!/usr/bin/env python")
    assert os.access(SCRIPT, os.X_OK)


def test_snn_speed_dense_models_write_the_records(tmp_path):
    out = tmp_path / "speed.json"
    p = _run(["--arch", "yolov2_tiny,deeplabv1_vgg9", "--T", "3", "--width", "0.0625", "--size", "70",
              "--batch", "1", "--no-sj", "--no-compile-kernel", "--repeats", "1", "--warmup", "1", "--no-wait",
              "--json", str(out)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(out.read_text())
    recs = data["records"]
    assert sorted((r["arch"], r["neuron"]) for r in recs) == [
        ("deeplabv1_vgg9", "signed"), ("deeplabv1_vgg9", "unsigned"), ("yolov2_tiny", "signed"),
        ("yolov2_tiny", "unsigned")]
    sizes = {r["arch"]: r["size"] for r in recs}
    assert sizes == {"yolov2_tiny": 64, "deeplabv1_vgg9": 65}  # the largest valid sizes <= 70
    for r in recs:
        assert all(r[k] is not None for k in KEYS), r
        assert r["T"] == 3 and r["batch"] == 1 and r["width"] == 0.0625
        assert r["ratio_floor"] == pytest.approx(r["snn_ms"] / r["floor_ms"])
        assert r["ratio_t_ann"] == pytest.approx(r["snn_ms"] / (3 * r["ann_ms"]))
        assert r["ratio_ann_convs"] == pytest.approx(r["ann_ms"] / r["ann_convs_ms"])
        assert r["ratio_ann_fresh_convs"] == pytest.approx(r["ann_fresh_ms"] / r["ann_convs_ms"])
        assert r["ann_ms"] > 0 and r["ann_convs_ms"] > 0 and r["floor_ms"] > 0 and r["peak_mb"] >= 0
        assert r["ratio_peak_floor"] == pytest.approx(r["peak_mb_total"] / r["floor_mb_total"])
        assert r["ratio_peak_ws"] == pytest.approx(r["peak_mb_total"] / r["floor_ws_mb"])
        assert r["spike_agreement"] >= 0.999 and r["max_abs_diff_vs_reference"] < 1e-3
    assert data["meta"]["width"] == 0.0625 and data["meta"]["targets"]


@pytest.mark.parametrize("flags, words", [
    (["--arch", "yolov3"], "unknown arch"),
    (["--arch", "deeplabv1_vgg9", "--size", "5"], "too small"),
    (["--arch", "yolov2_tiny", "--T", "4"], "2**bit - 1"),
    (["--arch", "yolov2_tiny", "--batch", "1,x"], "comma list"),
    (["--arch", "yolov2_tiny", "--width", "0"], "--width"),
    (["--quick", "--repeats", "0"], "--repeats 0"),
    (["--quick", "--threads", "0"], "--threads 0"),
    (["--quick", "--neurons", "Signed"], "signed, unsigned"),
])
def test_snn_speed_bad_flags_one_line(tmp_path, flags, words):
    p = _run(flags + ["--no-sj", "--json", str(tmp_path / "x.json")], tmp_path, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and words in lines[0], p.stderr
    assert not (tmp_path / "x.json").exists()


def test_snn_speed_output_folder_checked_first(tmp_path):
    p = _run(["--quick", "--no-sj", "--json", str(tmp_path / "no" / "x.json")], tmp_path, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "does not exist" in lines[0], p.stderr


@pytest.mark.parametrize("flags, words", [(["--backends", "foo"], "--backends"), (["--T", "0"], "--T 0"),
                                          (["--repeats", "0"], "--repeats 0"), (["--batch", "0"], "--batch 0")])
def test_if_kernels_bad_flags_one_line(tmp_path, flags, words):
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "if_kernels.py")] + flags, cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and words in lines[0], p.stderr


def test_ann_buffers_writes_both_variants(tmp_path):
    out = tmp_path / "ab.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ann_buffers.py"), "--batch", "2",
                        "--rounds", "1", "--repeats", "2", "--json", str(out)], cwd=tmp_path, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = json.loads(out.read_text())["records"]
    runs = [r for r in recs if "ann_ms" in r]
    assert sorted(r["variant"] for r in runs) == ["fresh", "reuse"]
    for r in runs:
        assert r["ratio_ann_convs"] == pytest.approx(r["ann_ms"] / r["ann_convs_ms"]) and r["faults_per_forward"] >= 0
    assert sorted(r["variant"] for r in recs if "ratio_ann_convs_median" in r) == ["fresh", "reuse"]

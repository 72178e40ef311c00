"""Peak memory of a converted DeepLab model's forward: the read-out placed right after the classifier
(this project: the x8 bilinear upsampling of the logits runs once on ``[B, ...]``) against the read-out at
the graph output (the previous converter, and the original: the upsampling runs on the ``[T*B, ...]``
train of logits, then the time mean).

Each variant runs in its own process: the temporal part is simulated one step at a time (``chunk=1``, so
its own peak stays low), then the part after the read-out runs, and the growth of the peak resident
memory (VmHWM, reset before it) during that part is reported, with the size of the tensors after the classifier.
Figures only -- nothing is asserted.

    .venv/bin/python benchmarks/dense_memory.py          # VGG-9 width 0.125, 513 x 513 (65 x 65 logits), T=15, batch 4
    .venv/bin/python benchmarks/dense_memory.py --width 0.25 --T 7
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def _reset_peak() -> float:
    """Return freed heap to the OS and reset the peak RSS (VmHWM) to the current RSS (Linux)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    try:
        return _status_mb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_variant(mode: str, width: float, T: int, batch: int, size: int, classes: int) -> dict:
    sys.path.insert(0, ROOT)
    import torch
    import snn
    from segmentation.models import get_model
    torch.manual_seed(0)
    torch.set_num_threads(1)
    bit = {3: 2, 7: 3, 15: 4}.get(T, 4)
    ann = get_model("deeplabv1_vgg9", classes, bit=bit, width=width).eval()
    import quant
    quant.randomize_bn(ann, 0)
    net = snn.convert(ann, T=T, chunk=1)
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        def head(sim, n):
            if mode == "readout_after_classifier":
                return sim.output()
            # the previous converter: every op after the classifier on the time-folded train of logits
            vals = [other if tr is None else tr.reshape(-1, *tr.shape[2:]) for tr, other in zip(sim.trains, sim.others)]
            y = net.head(*vals)
            return y.view(T, n, *y.shape[1:]).mean(0)
        head(net.simulate(torch.randn(1, 3, 17, 17)), 1)
        sim = net.simulate(x)
        before = _reset_peak()
        y = head(sim, x.shape[0])
        after = _peak_mb()
    out_mb = y.numel() * y.element_size() / 2 ** 20
    return {"mode": mode, "peak_growth_mb": after - before, "peak_mb": after, "output_shape": list(y.shape),
            "after_classifier_mb": out_mb * (T if mode != "readout_after_classifier" else 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--T", type=int, default=15)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=513, help="input size (513: 65 x 65 logits, upsampled to 513)")
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--out", default=os.path.join(HERE, "results", "dense_memory.json"))
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.variant:
        print(json.dumps(run_variant(a.variant, a.width, a.T, a.batch, a.size, a.classes)))
        return
    rows = []
    for mode in ("readout_at_output", "readout_after_classifier"):
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", mode, "--width", str(a.width), "--T", str(a.T),
               "--batch", str(a.batch), "--size", str(a.size), "--classes", str(a.classes)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    old, new = rows
    report = {"model": "deeplabv1_vgg9", "width": a.width, "T": a.T, "batch": a.batch, "input": a.size,
              "classes": a.classes, "variants": rows,
              "peak_growth_ratio": old["peak_growth_mb"] / max(new["peak_growth_mb"], 1e-9),
              "after_classifier_ratio": old["after_classifier_mb"] / new["after_classifier_mb"]}
    print(f"{'read-out':28s} {'head peak growth MB':>20s} {'after-classifier MB':>20s}")
    for r in rows:
        print(f"{r['mode']:28s} {r['peak_growth_mb']:20.0f} {r['after_classifier_mb']:20.0f}")
    print(f"head peak growth ratio {report['peak_growth_ratio']:.1f}x, upsampled logits "
          f"{report['after_classifier_ratio']:.0f}x (T = {a.T})")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"-> {a.out}")


if __name__ == "__main__":
    main()

"""A / B of the C++ kernels in one process: this checkout's `snn/csrc/fastsnn_ops.cpp` against the same
file at another git revision, on the optimised SNN (ResNet-20 by default) and, with ``--ann``, on the
quantized ANN's inference copy (``quant.fused.optimize_ann``; the quantizer kernel) against its convolutions.

Separate processes on a shared or noisy machine differ by +-0.05 in SNN / floor from run to run, more
than most kernel changes are worth. Here the baseline source is taken from git, its operators renamed
to the namespace ``fastsnn_base`` and built as a second extension (with the compiler flags given by
``--base-cflags``, default those of the revision before the register-blocked kernels), and the same
optimised network runs with either library, interleaved round-robin with the convolution floor
(``snn_speed.py``'s definition), so the three share every round's machine state. Spikes are checked
equal between the two libraries first.

    python benchmarks/kernel_ab.py --baseline fcc87ba --T 3,7 --json ab.json
    python benchmarks/kernel_ab.py --baseline 8e51a76 --ann --neurons signed --threads 1 --clock cpu
    python benchmarks/kernel_ab.py --baseline 8e51a76 --arch deeplabv1_vgg9 --width 0.5 --size 257 --batch 1
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from _util import fmt_table, interleaved, machine, write_json  # noqa: E402

import snn  # noqa: E402
from snn.kernels import cpp as kcpp  # noqa: E402

# the compiler flags of older revisions' C++ kernels (no -mprefer-vector-width=512)
OLD_CFLAGS = "-O3 -march=native -ffp-contract=off -fno-math-errno -fno-trapping-math -fopenmp-simd -fopenmp"


def build_baseline(rev: str, cflags: list, build_dir: str):
    """Build ``snn/csrc/fastsnn_ops.cpp`` at ``rev`` as the operator namespace ``fastsnn_base``."""
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:snn/csrc/fastsnn_ops.cpp"], check=True,
                         capture_output=True, text=True).stdout
    src, n = re.subn(r"TORCH_LIBRARY(_IMPL)?\(fastsnn,", r"TORCH_LIBRARY\1(fastsnn_base,", src)
    if n < 2:
        raise SystemExit(f"{rev}: no TORCH_LIBRARY(fastsnn, ...) block found in snn/csrc/fastsnn_ops.cpp")
    os.makedirs(build_dir, exist_ok=True)
    path = os.path.join(build_dir, "fastsnn_base_ops.cpp")
    with open(path, "w") as f:
        f.write(src)
    from torch.utils import cpp_extension
    cpp_extension.load(name="fastsnn_base_ops", sources=[path], extra_cflags=cflags, build_directory=build_dir,
                       is_python_module=False, verbose=False)
    return torch.ops.fastsnn_base


class _Switch:
    """Stands in for ``torch.ops.fastsnn`` in snn.kernels.cpp: forwards to the library chosen now."""

    def __init__(self, lib):
        self.lib = lib

    def __getattr__(self, name):
        return getattr(self.lib, name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, help="git revision of the baseline kernels (e.g. fcc87ba)")
    ap.add_argument("--base-cflags", default=OLD_CFLAGS, help="compiler flags of the baseline build")
    ap.add_argument("--T", default="3,7")
    ap.add_argument("--neurons", default="signed,unsigned")
    ap.add_argument("--arch", default="resnet20", help="a model of snn_speed.py (default resnet20)")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 CIFAR, 8 ImageNet, 1 dense models")
    ap.add_argument("--size", type=int, default=None, help="input size of a dense model (snn_speed.py --size)")
    ap.add_argument("--width", type=float, default=1.0, help="channel width of a dense model")
    ap.add_argument("--ann", action="store_true",
                    help="also time the quantized ANN (optimize_ann) with either library, against its convolutions")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this process's CPU time (a machine shared with other jobs; with --threads 1)")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import snn_speed as S  # the floor and the model set-up of the main benchmark

    from quant import fused
    if args.arch not in S.ARCHS:
        raise SystemExit(f"unknown arch {args.arch!r}: choose from {', '.join(S.ARCHS)}")
    ds = S.ARCHS[args.arch][0]
    batch = args.batch or {"cifar": 64, "imagenet": 8}.get(ds, 1)
    size = S.input_size(args.arch, args.size)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    new = kcpp.load()
    with tempfile.TemporaryDirectory(prefix="fastsnn_ab_") as d:
        base = build_baseline(args.baseline, args.base_cflags.split(), d)
        switch = _Switch(new)
        kcpp._STATE["ops"] = switch  # snn.kernels.cpp.load() returns it from now on
        fused._OPS["ops"] = switch  # and so does the quantizer's quant.fused.native_ops()
        torch.manual_seed(0)
        x = torch.randn(batch, 3, size, size)
        records = []
        for T in [int(t) for t in args.T.split(",")]:
            bit = int(round(math.log2(T + 1)))
            if 2 ** bit - 1 != T:
                raise SystemExit(f"T={T} is not 2**bit - 1")
            ann = S.random_bn(S.build_ann(args.arch, bit, args.width if ds in S.DENSE else 1.0), seed=bit)
            for p in ann.parameters():
                p.requires_grad_(False)
            if args.ann:
                ann_opt = fused.optimize_ann(ann, example=x)
                convs, _ = S.best_replay(S.conv_calls(ann_opt, x))

                def ann_with(lib):
                    def run():
                        switch.lib = lib
                        return ann_opt(x)
                    return run
                with torch.no_grad():
                    if not torch.equal(ann_with(new)(), ann_with(base)()):
                        raise SystemExit(f"T={T}: the two libraries give different ANN outputs")
                    r = interleaved({"convs": convs, "base": ann_with(base), "new": ann_with(new)},
                                    repeats=args.repeats, warmup=2, clock=clock)
                f, b, n = (r[k]["median"] for k in ("convs", "base", "new"))
                records.append({"arch": args.arch, "T": T, "neuron": "ANN", "floor_ms": f, "base_ms": b, "new_ms": n,
                                "base_floor": b / f, "new_floor": n / f, "base_new": b / n})
                print(f"T={T} quantized ANN: convs {f:.1f} ms, baseline {b:.1f} ms ({b / f:.3f}), "
                      f"this checkout {n:.1f} ms ({n / f:.3f})", flush=True)
            for kind in [k for k in args.neurons.split(",") if k]:
                net = snn.optimize(snn.convert(ann, T=T, signed=kind == "signed"), example=x)
                floor, _ = S.best_replay(S.conv_calls(net, x))

                def with_lib(lib, net=net):
                    def run():
                        switch.lib = lib
                        return net(x)
                    return run
                if not torch.equal(with_lib(new)(), with_lib(base)()):
                    raise SystemExit(f"T={T} {kind}: the two libraries give different outputs")
                r = interleaved({"floor": floor, "base": with_lib(base), "new": with_lib(new)},
                                repeats=args.repeats, warmup=2, clock=clock)
                f, b, n = (r[k]["median"] for k in ("floor", "base", "new"))
                records.append({"arch": args.arch, "T": T, "neuron": kind, "floor_ms": f, "base_ms": b, "new_ms": n,
                                "base_floor": b / f, "new_floor": n / f, "base_new": b / n})
                print(f"T={T} {kind}: floor {f:.1f} ms, baseline {b:.1f} ms ({b / f:.3f}), "
                      f"this checkout {n:.1f} ms ({n / f:.3f})", flush=True)
        switch.lib = new
        kcpp._STATE["ops"] = new
        fused._OPS["ops"] = new
    cols = [("arch", "arch", None), ("T", "T", None), ("neuron", "neuron", None), ("floor ms", "floor_ms", "{:.1f}"),
            (f"{args.baseline} ms", "base_ms", "{:.1f}"), ("this ms", "new_ms", "{:.1f}"),
            (f"{args.baseline} / floor", "base_floor", "{:.3f}"), ("this / floor", "new_floor", "{:.3f}"),
            ("speed-up", "base_new", "{:.3f}")]
    print(fmt_table(records, cols))
    if args.json:
        write_json(args.json, records, dict(machine(), command=" ".join(sys.argv), baseline=args.baseline,
                                            clock=args.clock, threads=args.threads, batch=batch, size=size))


if __name__ == "__main__":
    main()

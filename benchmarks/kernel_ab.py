"""A / B of the C++ kernels in one process: this checkout's `snn/csrc/fastsnn_ops.cpp` against the same
file at another git revision, on the optimised ResNet-20 SNN.

Separate processes on a shared or noisy machine differ by +-0.05 in SNN / floor from run to run, more
than most kernel changes are worth. Here the baseline source is taken from git, its operators renamed
to the namespace ``fastsnn_base`` and built as a second extension (with the compiler flags given by
``--base-cflags``, default those of the revision before the register-blocked kernels), and the same
optimised network runs with either library, interleaved round-robin with the convolution floor
(``snn_speed.py``'s definition), so the three share every round's machine state. Spikes are checked
equal between the two libraries first.

    python benchmarks/kernel_ab.py --baseline fcc87ba --T 3,7 --json ab.json
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from _util import fmt_table, interleaved, machine, write_json  # noqa: E402

import snn  # noqa: E402
from snn.kernels import cpp as kcpp  # noqa: E402

# the flags of the C++ kernels before 2026-12-03 (no -mprefer-vector-width=512)
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
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import snn_speed as S  # the floor and the model set-up of the main benchmark

    new = kcpp.load()
    with tempfile.TemporaryDirectory(prefix="fastsnn_ab_") as d:
        base = build_baseline(args.baseline, args.base_cflags.split(), d)
        switch = _Switch(new)
        kcpp._STATE["ops"] = switch  # snn.kernels.cpp.load() returns it from now on
        torch.manual_seed(0)
        x = torch.randn(args.batch, 3, 32, 32)
        records = []
        for T in [int(t) for t in args.T.split(",")]:
            bit = int(round(math.log2(T + 1)))
            if 2 ** bit - 1 != T:
                raise SystemExit(f"T={T} is not 2**bit - 1")
            ann = S.random_bn(S.get_model("resnet20", bit, dataset="cifar"), seed=bit)
            for p in ann.parameters():
                p.requires_grad_(False)
            for kind in args.neurons.split(","):
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
                                repeats=args.repeats, warmup=2)
                f, b, n = (r[k]["median"] for k in ("floor", "base", "new"))
                records.append({"T": T, "neuron": kind, "floor_ms": f, "base_ms": b, "new_ms": n,
                                "base_floor": b / f, "new_floor": n / f, "base_new": b / n})
                print(f"T={T} {kind}: floor {f:.1f} ms, baseline {b:.1f} ms ({b / f:.3f}), "
                      f"this checkout {n:.1f} ms ({n / f:.3f})", flush=True)
        switch.lib = new
        kcpp._STATE["ops"] = new
    cols = [("T", "T", None), ("neuron", "neuron", None), ("floor ms", "floor_ms", "{:.1f}"),
            (f"{args.baseline} ms", "base_ms", "{:.1f}"), ("this ms", "new_ms", "{:.1f}"),
            (f"{args.baseline} / floor", "base_floor", "{:.3f}"), ("this / floor", "new_floor", "{:.3f}"),
            ("speed-up", "base_new", "{:.3f}")]
    print(fmt_table(records, cols))
    if args.json:
        write_json(args.json, records, dict(machine(), command=" ".join(sys.argv), baseline=args.baseline))


if __name__ == "__main__":
    main()

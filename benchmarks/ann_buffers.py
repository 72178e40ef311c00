"""The quantized ANN's inference copy with and without reused output buffers, each in its own process.

``optimize_ann(reuse_buffers=True)`` (the default) writes every quantizer's output into a reused buffer;
without them each quantizer writes over its convolution's fresh output, and glibc returns the freed
tensors to the OS and page-faults them back every forward. Heap behaviour is per process, so an
in-process A / B (``snn_speed.py``'s ``ann_fresh`` column, next to contenders whose allocations keep the
heap large) hides the difference: here every round runs each variant in a fresh process, alternating,
times ``ann`` against its convolutions alone (``snn_speed.py``'s ``ann_convs``) interleaved in that
process, and counts the page faults per forward.

    python benchmarks/ann_buffers.py --json benchmarks/results/ann_buffers_resnet20.json
    python benchmarks/ann_buffers.py --arch yolov2_tiny --width 0.5 --batch 1
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))


def child(args) -> dict:
    import torch
    import snn_speed as S
    from quant.fused import optimize_ann
    torch.set_num_threads(args.threads)
    bit = int(round(math.log2(args.T + 1)))
    ann = S.random_bn(S.build_ann(args.arch, bit, args.width), seed=bit)
    for p in ann.parameters():
        p.requires_grad_(False)
    size = S.input_size(args.arch, args.size)
    x = torch.randn(args.batch, 3, size, size)
    net = optimize_ann(ann, channels_last=True, reuse_buffers=args.variant == "reuse")
    convs, _ = S.best_replay(S.conv_calls(net, x))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with torch.no_grad():
        for _ in range(2):
            net(x)
            convs()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        r = S.interleaved({"ann": lambda: net(x), "convs": convs}, repeats=args.repeats, warmup=0, clock=clock)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return {"variant": args.variant, "ann_ms": r["ann"]["median"], "ann_convs_ms": r["convs"]["median"],
            "ratio_ann_convs": r["ann"]["median"] / r["convs"]["median"],
            "faults_per_forward": faults / args.repeats}  # the replayed convolutions do not fault (reused inputs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--T", type=int, default=3, help="the ANN's levels (2**bit - 1)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=None, help="input size of a dense model")
    ap.add_argument("--width", type=float, default=1.0, help="channel width of a dense model")
    ap.add_argument("--rounds", type=int, default=3, help="processes per variant, alternating")
    ap.add_argument("--repeats", type=int, default=9, help="timed forwards per process")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    ap.add_argument("--json")
    ap.add_argument("--variant", choices=("reuse", "fresh"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(child(args)))
        return
    from _util import machine, write_json
    rows = []
    for _ in range(args.rounds):
        for variant in ("reuse", "fresh"):
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant] + [
                a for k, v in vars(args).items() if k not in ("variant", "json", "rounds") and v is not None
                for a in (f"--{k.replace('_', '-')}", str(v))]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    summary = []
    for variant in ("reuse", "fresh"):
        rs = [r["ratio_ann_convs"] for r in rows if r["variant"] == variant]
        fl = [r["faults_per_forward"] for r in rows if r["variant"] == variant]
        summary.append({"arch": args.arch, "T": args.T, "variant": variant, "ratio_ann_convs_median": statistics.median(rs),
                        "ratio_ann_convs": rs, "faults_per_forward": statistics.median(fl)})
        print(f"{variant:6s} ANN / convs {statistics.median(rs):.3f} (runs {', '.join(f'{v:.3f}' for v in rs)}), "
              f"{statistics.median(fl):.0f} page faults per forward")
    if args.json:
        write_json(args.json, rows + summary, dict(machine(), command=" ".join(sys.argv), **{
            k: v for k, v in vars(args).items() if k not in ("variant", "json")}))


if __name__ == "__main__":
    main()

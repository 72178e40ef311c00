"""Training-step cost of quantization: the quantized ANN at 4 / 3 / 2 bits vs the same net at 32 bits.

One step = forward (train mode), cross-entropy, backward, SGD (momentum 0.9) update, on a random
CIFAR-sized batch. All bit-widths of one arch are built once and timed interleaved (round-robin) after
warm-up; medians of ``--repeats`` steps. ``ratio_vs_fp32`` = step time / the 32-bit step time.

    python benchmarks/quant_overhead.py --json quant_overhead.json
    python benchmarks/quant_overhead.py --arch resnet20 --profile      # where the extra time goes
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import QUIET, fmt_table, interleaved, machine, peak_extra_mb, write_json  # noqa: E402

from classification.models import get_model  # noqa: E402


def make_step(model: nn.Module, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return step


def profile(step, label, runs=3):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            step()
    print(f"\n  profile of {label} ({runs} steps):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet20,alex")
    ap.add_argument("--bits", default="32,4,3,2")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for an idle machine before each round")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bits = [int(b) for b in args.bits.split(",")]
    meta = machine()
    meta.update({"command": " ".join(sys.argv), "batch": args.batch, "repeats": args.repeats})
    print(f"machine: {meta['cpu']}, {meta['logical_cpus']} logical CPUs, torch {meta['torch']} "
          f"({args.threads} threads), load average {meta['load_avg']}")
    records = []
    t0 = time.time()
    for arch in [a for a in args.arch.split(",") if a]:
        torch.manual_seed(0)
        x = torch.randn(args.batch, 3, 32, 32)
        y = torch.randint(0, 10, (args.batch,))
        steps = {b: make_step(get_model(arch, b, dataset="cifar"), x, y) for b in bits}
        res = interleaved({f"{b}": s for b, s in steps.items()}, repeats=args.repeats, warmup=args.warmup,
                          quiet=not args.no_wait)
        mem = {b: peak_extra_mb(s) for b, s in steps.items()} if not args.no_memory else {}
        base = res[str(32)]["median"] if 32 in bits else None
        for b in bits:
            ms = res[str(b)]["median"]
            records.append({"arch": arch, "bit": b, "batch": args.batch, "step_ms": ms,
                            "ratio_vs_fp32": ms / base if base else None, "peak_mb": mem.get(b),
                            "times_ms": res[str(b)]["all"]})
        print(fmt_table([r for r in records if r["arch"] == arch],
                        [("arch", "arch", None), ("bit", "bit", None), ("step ms", "step_ms", "{:.1f}"),
                         ("vs fp32", "ratio_vs_fp32", "{:.2f}"), ("peak MB", "peak_mb", "{:.0f}")]))
        if args.profile:
            for b in bits:
                profile(steps[b], f"{arch} {b}-bit")
    meta["seconds"] = time.time() - t0
    meta["waited_for_idle_s"], meta["rounds_on_busy_machine"] = QUIET["waited_s"], QUIET["busy_rounds"]
    meta["load_avg_end"] = machine()["load_avg"]
    worst = max((r["ratio_vs_fp32"] for r in records if r["ratio_vs_fp32"] and r["bit"] != 32), default=None)
    if worst is not None:
        print(f"\ntarget: quantized / fp32 step <= 1.3: worst {worst:.2f} -> {'met' if worst <= 1.3 else 'MISSED'}")
        meta["targets"] = [{"target": f"worst ratio_vs_fp32 {worst:.2f} (<= 1.3)", "met": worst <= 1.3}]
    if args.json:
        write_json(args.json, records, meta)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

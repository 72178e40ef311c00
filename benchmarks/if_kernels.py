"""The IF layer alone, per backend: one fused neuron call on the spike-train shapes of ResNet-20.

For every T and every layer shape of ResNet-20 at CIFAR batch B (``[T, B, 16, 32, 32]``,
``[T, B, 32, 16, 16]``, ``[T, B, 64, 8, 8]``, channels-last), the time of ``snn.kernels.if_steps`` as the
optimised network calls it (fresh state, no state out, ``theta * spikes`` written in place into the
current -- the same buffer every call: the kernels' cost does not depend on the values; with and
without a residual current), per backend, interleaved round-robin after warm-up
(medians), and the closed form of the analog-input layer (``[B, 16, 32, 32]`` -> T steps). The sum
over one ResNet-20 forward (its 19 neurons: 1 constant-input, 9 plain, 9 with a residual) is the
``per forward`` row. The network-level comparison is ``snn_speed.py`` (``SNN compile`` column).

    python benchmarks/if_kernels.py --json if_kernels.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import check_args, fmt_table, interleaved, machine, write_json  # noqa: E402
from common.errors import UserError, run_cli  # noqa: E402

from snn import kernels  # noqa: E402

# ResNet-20 neurons per shape: (channels, side, plain calls, residual calls)
LAYERS = [(16, 32, 3, 3), (32, 16, 3, 3), (64, 8, 3, 3)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", default="3,7,15")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--backends", default="cpp,compile,reference")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stat", choices=("median", "min"), default="median")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    check_args(args)
    backends = [b for b in args.backends.split(",") if b]
    bad = [b for b in backends if b not in kernels.CONCRETE]
    if bad or not backends:
        raise UserError(f"--backends {args.backends!r}: {', '.join(bad) or 'none given'}",
                        f"a comma list of {', '.join(kernels.CONCRETE)}")
    try:
        Ts = [int(t) for t in args.T.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--T {args.T!r} is not a comma list of integers", "e.g. --T 3,7,15") from None
    if not Ts or min(Ts) < 1:
        raise UserError(f"--T {args.T}: every T must be at least 1", "e.g. --T 3,7,15")
    torch.set_num_threads(args.threads)
    theta = torch.tensor(0.8)
    records = []
    for T in Ts:
        B = args.batch
        cl = torch.channels_last
        bufs = {}
        for C, S, _, _ in LAYERS:
            base = (torch.randn(T * B, C, S, S) * 0.6).contiguous(memory_format=cl)
            bufs[C] = (base, base.clone(), (torch.randn(T * B, C, S, S) * 0.3).contiguous(memory_format=cl))
        first = torch.randn(B, 16, 32, 32) * 0.6
        fns = {}
        for b in backends:
            for C, S, _, _ in LAYERS:
                base, work, res = bufs[C]

                def plain(b=b, work=work, S=S, C=C):
                    kernels.if_steps(work.view(T, B, C, S, S), theta, True, state=False, scale=theta, inplace=True,
                                     backend=b)

                def residual(b=b, work=work, res=res, S=S, C=C):
                    kernels.if_steps(work.view(T, B, C, S, S), theta, True, residual=res.view(T, B, C, S, S),
                                     state=False, scale=theta, inplace=True, backend=b)
                fns[(b, f"{C}x{S}x{S}", "plain")] = plain
                fns[(b, f"{C}x{S}x{S}", "residual")] = residual
            fns[(b, "16x32x32", "constant")] = (lambda b=b: kernels.if_const_steps(
                first, theta, 0, T, T=T, scale=theta, channels_last=True, backend=b))
        names = {"|".join(k): f for k, f in fns.items()}
        res = interleaved(names, repeats=args.repeats, warmup=2)
        med = {tuple(k.split("|")): v[args.stat] for k, v in res.items()}
        for b in backends:
            total = med[(b, "16x32x32", "constant")]
            for C, S, n_plain, n_res in LAYERS:
                key = f"{C}x{S}x{S}"
                p = med[(b, key, "plain")]
                r = med[(b, key, "residual")]
                total += n_plain * p + n_res * r
                records.append({"T": T, "backend": b, "layer": key, "plain_ms": p, "residual_ms": r})
            records.append({"T": T, "backend": b, "layer": "constant 16x32x32",
                            "plain_ms": med[(b, "16x32x32", "constant")], "residual_ms": None})
            records.append({"T": T, "backend": b, "layer": "per forward (19 neurons)", "plain_ms": total,
                            "residual_ms": None})
        print(f"T={T} done")
    cols = [("T", "T", None), ("backend", "backend", None), ("layer", "layer", None),
            ("ms", "plain_ms", "{:.2f}"), ("ms with residual", "residual_ms", "{:.2f}")]
    print(fmt_table(records, cols))
    if args.json:
        write_json(args.json, records, dict(machine(), command=" ".join(sys.argv)))


if __name__ == "__main__":
    run_cli(main)

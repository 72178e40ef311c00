"""The demo over several seeds: each figure of its table as mean ± spread.

    python -m classification.demo_seeds                       # seeds 0 1 2, out demo_seeds/
    python -m classification.demo_seeds --seeds 0 1 2 3 4 --out DIR -- --epochs-fp 5   # extra demo flags after --
    bash scripts/demo_seeds.sh                                # the same, after the set-up

Runs ``classification.demo`` once per seed (``--out DIR/seed_<s>``; every flag after ``--`` goes to
each run unchanged, so it measures whatever the demo's defaults are), then writes ``DIR/seeds.json``
(every run's table, and per figure the mean, sample standard deviation, min and max) and
``DIR/seeds.md`` (a Markdown table, ``mean ± std (min–max)``). A seed whose ``seed_<s>/summary.json``
already exists with the same demo flags is not run again (``--rerun`` forces it), so an interrupted
measurement continues.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

from common import run_cli
from common.cli import ArgumentParser
from common.metrics import write_json

COLUMNS = (("ann_top1", "ANN top-1"), ("snn_signed", "SNN signed"), ("snn_unsigned", "SNN unsigned"),
           ("finetuned", "fine-tuned (signed)"), ("settle", "signed + settle"))


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description="Run the Fast-SNN demo over several seeds and report mean ± spread",
                       epilog="flags after -- go to every demo run (python -m classification.demo --help)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--out", default="demo_seeds", help="output folder (default demo_seeds/)")
    p.add_argument("--rerun", action="store_true", help="run every seed again, even when its summary exists")
    return p


def stats(values: Sequence[Optional[float]]) -> Optional[Dict]:
    """Mean, sample standard deviation (0 for one value), min, max, n of the non-missing values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}


def aggregate(summaries: List[Dict]) -> List[Dict]:
    """Per table row (bits): the stats of every column over the runs."""
    rows = []
    for i, row in enumerate(summaries[0]["table"]):
        out = {"bits": row["bits"], "T": row["T"]}
        for key, _ in COLUMNS:
            out[key] = stats([s["table"][i].get(key) for s in summaries])  # older summaries: no settle
        rows.append(out)
    return rows


def _cell(st: Optional[Dict]) -> str:
    if st is None:
        return "–"
    if st["n"] == 1:
        return f"{st['mean']:.1f}"
    return f"{st['mean']:.1f} ± {st['std']:.1f} ({st['min']:.1f}–{st['max']:.1f})"


def markdown(rows: List[Dict], seeds: Sequence[int], summary: Optional[Dict] = None) -> str:
    """The Markdown table; ``summary`` (one run's): its fine-tuning method and settle steps in the caption."""
    head = "| bits | T | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [head, "|" + "---:|" * (2 + len(COLUMNS))]
    for r in rows:
        cells = [str(r["bits"]), "–" if r["T"] is None else str(r["T"])] + [_cell(r[k]) for k, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Top-1 % on the test images: mean ± sample standard deviation (min–max) over seeds "
                 f"{', '.join(map(str, seeds))}."
                 + (f" Fine-tuned: --method {summary['ft_method']}"
                    + (f" --ft-accept {summary['ft_accept']}" if summary.get("ft_accept") else "") + "."
                    if (summary or {}).get("ft_method") else "")
                 + (f" Settle: K = {summary['settle']} steps after T." if (summary or {}).get("settle") else ""))
    return "\n".join(lines)


def _split(argv: Sequence[str]):
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _done(path: str, demo_argv: List[str]) -> Optional[Dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        s = json.load(f)
    return s if s.get("demo_argv") == demo_argv else None


def main(argv=None) -> Dict:
    own, demo_argv = _split(sys.argv[1:] if argv is None else argv)
    args = get_parser().parse_args(own)
    from classification import demo
    bad = [a for a in demo_argv if a.split("=")[0] in ("--seed", "--out")]
    if bad:
        from common import UserError
        raise UserError(f"{bad[0]} after -- would override this script's per-seed value",
                        "pick the seeds with --seeds and the folder with --out (before --)")
    demo.get_parser().parse_args(demo_argv)  # bad demo flags fail now, not after the first seed
    summaries, t0 = [], time.time()
    for k, seed in enumerate(args.seeds):
        out = os.path.join(args.out, f"seed_{seed}")
        path = os.path.join(out, "summary.json")
        prev = None if args.rerun else _done(path, demo_argv)
        if prev is not None:
            print(f"seed {seed}: {path} exists (same demo flags), not run again", flush=True)
            summaries.append(prev)
            continue
        print(f"\n##### seed {seed} ({k + 1}/{len(args.seeds)}), {(time.time() - t0) / 60:.1f} min so far", flush=True)
        s = demo.main(demo_argv + ["--seed", str(seed), "--out", out])
        s = {**s, "demo_argv": demo_argv}
        write_json(path, s)
        summaries.append(s)
    rows = aggregate(summaries)
    text = markdown(rows, args.seeds, summaries[0])
    result = {"seeds": list(args.seeds), "demo_argv": demo_argv, "rows": rows,
              "wall_seconds": [s.get("wall_seconds") for s in summaries],
              "runs": [{"seed": s.get("seed"), "table": s["table"], "env": s.get("env")} for s in summaries]}
    write_json(os.path.join(args.out, "seeds.json"), result)
    with open(os.path.join(args.out, "seeds.md"), "w") as f:
        f.write(text + "\n")
    print(f"\nFast-SNN demo over {len(summaries)} seeds\n\n{text}\n\n-> {os.path.join(args.out, 'seeds.json')}, "
          f"{os.path.join(args.out, 'seeds.md')}", flush=True)
    return result


if __name__ == "__main__":
    run_cli(main)

"""The stages of a demo: each printed with its command, its time and an estimate of the time left.

The estimate scales the planned work of the stages still to run (a weight per stage, e.g. its epochs
times a per-epoch cost measured once on a CPU) by the seconds per unit of work the stages run so far
took on this machine; stages found finished (a resumed demo) leave the plan without counting.
"""
from __future__ import annotations

import os
import shlex
import shutil
import time
from typing import Callable, Dict, Iterable, List, Optional


def command(script: str, argv: List[str]) -> str:
    return f"python {script} " + " ".join(shlex.quote(a) for a in argv)


class StageClock:
    def __init__(self, plan: Dict[str, float]):
        self.plan = dict(plan)                 # stage name -> planned work (arbitrary units)
        self.t0 = time.time()
        self.ran_work = self.ran_seconds = 0.0
        self.steps: List[dict] = []

    def left(self) -> Optional[float]:
        """Seconds still needed, or ``None`` before a stage with planned work has run."""
        if self.ran_work <= 0:
            return None
        return sum(self.plan.values()) * self.ran_seconds / self.ran_work

    def _line(self, name: str, secs: float) -> str:
        left = self.left()
        tail = f", about {left / 60:.1f} min left" if left is not None and self.plan else ""
        return f"=== {name}: {secs:.0f} s (total {(time.time() - self.t0) / 60:.1f} min{tail})"

    def run(self, name: str, script: str, fn: Callable, argv: List[str]):
        """Print the equivalent command, run ``fn(argv)``, print its time and the estimate; return its result."""
        cmd = command(script, argv)
        print(f"\n=== {name}\n+ {cmd}", flush=True)
        t = time.time()
        res = fn(argv)
        secs = time.time() - t
        work = self.plan.pop(name, 0.0)
        self.ran_work, self.ran_seconds = self.ran_work + work, self.ran_seconds + secs
        self.steps.append({"step": name, "command": cmd, "seconds": round(secs, 1)})
        print(self._line(name, secs), flush=True)
        return res

    def skip(self, name: str, why: str):
        """A stage found finished: it leaves the plan."""
        self.plan.pop(name, None)
        self.steps.append({"step": name, "skipped": why, "seconds": 0.0})
        print(f"\n=== {name}: done before ({why})", flush=True)

    def once(self, name: str, result: str, script: str, fn: Callable, argv: List[str], *, also: str = ""):
        """A stage whose result JSON ``result`` (and file ``also``, when given) mark it finished: read it
        back if they exist, else :meth:`run` it."""
        from common.metrics import read_json
        if os.path.isfile(result) and (not also or os.path.isfile(also)):
            self.skip(name, result)
            return read_json(result)
        return self.run(name, script, fn, argv)


def add_scene_args(p, *, out: str, train: int, test: int, max_items: int, train_help: str):
    """The flags every scene-set demo has: where it writes, the scene set's size, the seed, ``--fresh``."""
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--train", type=int, default=train, help=f"training scenes (default {train}: {train_help})")
    p.add_argument("--test", type=int, default=test,
                   help=f"test scenes (default {test}: a smaller split moves the score by several points between seeds)")
    p.add_argument("--max-items", type=int, default=max_items, help=f"items per scene: 1..N (default {max_items})")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes and of every stage (default 0)")
    p.add_argument("--fresh", action="store_true",
                   help="delete <out> first (default: continue the run there, which must have the same settings)")


def open_demo(args, ignore: Iterable[str] = ()) -> str:
    """The demo's folder ``args.out`` (emptied first with ``--fresh``); a run continued there must have the
    same settings, since its finished stages are reused as they are: a one-line error names the flags that
    differ. ``ignore``: flags besides ``--out`` / ``--fresh`` that may change between runs (workers, bars)."""
    from common import UserError
    from common.metrics import read_json, write_json
    out = args.out
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    skip = {"out", "fresh", *ignore}
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k not in skip}
    stamp = os.path.join(out, "demo_args.json")
    if os.path.isfile(stamp):
        old = read_json(stamp)
        changed = sorted(k for k in set(old) | set(settings) if k != "env" and old.get(k) != settings.get(k))
        if changed:
            raise UserError(f"{out} holds a demo run with other settings "
                            f"({', '.join('--' + k.replace('_', '-') for k in changed)})",
                            "pass --fresh to start over there, or another --out")
    write_json(stamp, settings, env=False)
    return out


__all__ = ["StageClock", "add_scene_args", "command", "open_demo"]

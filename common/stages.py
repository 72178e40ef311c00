"""The stages of a demo: each printed with its command, its time and an estimate of the time left.

The estimate scales the planned work of the stages still to run (a weight per stage, e.g. its epochs
times a per-epoch cost measured once on a CPU) by the seconds per unit of work the stages run so far
took on this machine; stages found finished (a resumed demo) leave the plan without counting.
"""
from __future__ import annotations

import shlex
import time
from typing import Callable, Dict, List, Optional


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


__all__ = ["StageClock", "command"]

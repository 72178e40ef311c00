"""Shared helpers of the benchmarks: interleaved timing, peak memory, machine description, JSON."""
from __future__ import annotations

import ctypes
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from common.errors import UserError
from quant import randomize_bn as random_bn  # re-exported for the benchmarks


def _cpu_ticks():
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    except (OSError, ValueError, IndexError):
        return None


QUIET = {"waited_s": 0.0, "busy_rounds": 0}


def wait_quiet(max_wait: float = 60.0, idle: float = 0.85, probe: float = 0.25) -> bool:
    """Wait (up to ``max_wait`` s) until the machine is idle -- other processes use < 15 % of the
    CPUs over ``probe`` s -- so a timing round does not share the cores. False if it never was."""
    t0 = time.perf_counter()
    while True:
        a = _cpu_ticks()
        if a is None:
            return True
        time.sleep(probe)
        b = _cpu_ticks()
        tot = b[0] - a[0]
        if tot <= 0 or (b[1] - a[1]) / tot >= idle:
            QUIET["waited_s"] += time.perf_counter() - t0
            return True
        if time.perf_counter() - t0 > max_wait:
            QUIET["waited_s"] += time.perf_counter() - t0
            QUIET["busy_rounds"] += 1
            return False


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                log: Optional[Callable[[str], None]] = None, quiet: bool = False,
                min_ms: float = 60.0, clock: Callable[[], float] = time.perf_counter) -> Dict[str, dict]:
    """Time every function ``repeats`` times, round-robin (one sample of each per round, the order
    rotated every round), after ``warmup`` untimed rounds. A sample of a function faster than
    ``min_ms`` is the mean of enough back-to-back calls to last about ``min_ms``. Returns median /
    min / all sample times in ms (per call). ``quiet``: before each timed round wait until no other
    process is using the CPUs. ``clock``: ``time.perf_counter`` (wall time) or ``time.process_time``
    (this process's CPU time: on a shared machine it leaves out the time other processes hold the
    cores; meaningful with one thread, where no CPU time is spent spinning in the thread pool)."""
    names = list(fns)
    times: Dict[str, List[float]] = {k: [] for k in names}
    reps = {k: 1 for k in names}
    for r in range(warmup + repeats):
        if quiet and r >= warmup:
            wait_quiet()
        k0 = r % len(names)
        for k in names[k0:] + names[:k0]:
            t = clock()
            for _ in range(reps[k]):
                fns[k]()
            dt = (clock() - t) * 1e3 / reps[k]
            if r >= warmup:
                times[k].append(dt)
            elif r == warmup - 1:
                reps[k] = max(1, min(20, int(round(min_ms / max(dt, 1e-3)))))
        if log and r >= warmup:
            log(f"    round {r - warmup + 1}/{repeats}: " + ", ".join(f"{k} {times[k][-1]:.1f}" for k in names))
    return {k: {"median": statistics.median(v), "min": min(v), "all": [round(x, 3) for x in v]}
            for k, v in times.items()}


# ------------------------------------------------------------------------------------------ memory
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_extra_mb(fn: Callable[[], object]) -> Optional[float]:
    """Extra resident memory (MB) at the peak of one call of ``fn`` over the resident memory before it
    (Linux: free-heap trimmed with malloc_trim, the high-water mark VmHWM reset via clear_refs)."""
    libc = _libc()
    try:
        if libc:
            libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    if before is None or peak is None:
        return None
    return max(0.0, (peak - before) / 1024.0)


# ------------------------------------------------------------------------------------------ machine
def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "load_avg": load,
            "mkldnn": torch.backends.mkldnn.is_available()}


def write_json(path: str, records: list, meta: dict):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    os.replace(tmp, path)


def fmt_table(rows: List[dict], cols: List[tuple]) -> str:
    """``cols``: (header, key, format)."""
    head = [c[0] for c in cols]
    body = []
    for r in rows:
        line = []
        for _, key, f in cols:
            v = r.get(key)
            line.append("-" if v is None else (f.format(v) if f else str(v)))
        body.append(line)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    out = ["| " + " | ".join(h.rjust(w) for h, w in zip(head, widths)) + " |",
           "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"]
    for b in body:
        out.append("| " + " | ".join(x.rjust(w) for x, w in zip(b, widths)) + " |")
    return "\n".join(out)


def check_args(args, out_flag: str = "json"):
    """The flags the benchmarks share, checked before any work (one-line errors): ``--repeats`` /
    ``--threads`` / ``--batch`` (ints) >= 1, ``--warmup`` >= 0, ``--device`` that exists here, and the
    folder of the output file."""
    for flag in ("repeats", "threads", "batch"):
        v = getattr(args, flag, None)
        if isinstance(v, int) and v < 1:
            raise UserError(f"--{flag} {v} must be at least 1", f"pass --{flag} N with N >= 1")
    if getattr(args, "warmup", 0) < 0:
        raise UserError(f"--warmup {args.warmup} must not be negative", "pass --warmup 0 or more")
    dev = getattr(args, "device", "cpu")
    if dev not in ("cpu", "cuda"):
        raise UserError(f"--device {dev!r} is not cpu or cuda", "pass --device cpu or --device cuda")
    if dev == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here", "run it on a GPU machine, or --device cpu")
    out = getattr(args, out_flag, None)
    if out and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise UserError(f"--{out_flag} {out}: the folder {os.path.dirname(os.path.abspath(out))} does not exist",
                        "create it first, or pass another path")

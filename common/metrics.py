"""Running meters (reduced over DDP ranks) and the metrics JSON writer (top-k accuracy:
:mod:`classification.metrics`)."""
from __future__ import annotations

import json
import math
import os
import platform
import socket
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from . import dist
from .checkpoint import _atomic


class AverageMeter:
    """Running sum / count of a value (``update(value, n)``); ``avg`` over everything seen."""

    def __init__(self, name: str, fmt: str = ":.4f"):
        self.name, self.fmt = name, fmt
        self.reset()

    def reset(self):
        self.val = self.sum = self.count = 0.0

    def update(self, val: float, n: int = 1):
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / self.count if self.count else 0.0

    def __str__(self):
        return ("{name} {val" + self.fmt + "} ({avg" + self.fmt + "})").format(name=self.name, val=self.val,
                                                                             avg=self.avg)


def reduce_meters(meters: Iterable[AverageMeter]):
    """Sum every meter's ``sum`` and ``count`` over DDP ranks (in place; no-op in one process)."""
    meters = list(meters)
    flat = dist.all_reduce_sum([v for m in meters for v in (m.sum, m.count)])
    for i, m in enumerate(meters):
        m.sum, m.count = flat[2 * i], flat[2 * i + 1]


class CountMeter:
    """Correct-prediction counters (top-k or per time step) summed over batches and ranks."""

    def __init__(self, n: int):
        self.correct = [0.0] * n
        self.total = 0.0

    def update(self, correct: Sequence[float], total: int):
        self.correct = [a + float(b) for a, b in zip(self.correct, correct)]
        self.total += total

    def reduce(self):
        vals = dist.all_reduce_sum(self.correct + [self.total])
        self.correct, self.total = vals[:-1], vals[-1]

    def percent(self) -> List[float]:
        return [100.0 * c / self.total if self.total else 0.0 for c in self.correct]


def jsonable(obj):
    """Tensors / numpy scalars / tuples -> plain JSON types; non-finite floats -> None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist()) if obj.numel() != 1 else jsonable(obj.item())
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, (str, bytes)):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - not installed / no version: recorded as null
        return None


def run_info() -> Dict:
    """What a run's numbers depend on besides its flags: the seed (:func:`common.dist.seed_all`), the
    intra-op thread count, the library versions, the host and the process layout. Recorded in every
    metrics JSON (key ``"env"``) by :func:`write_json`."""
    return {"seed": dist.current_seed(), "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": _version("torchvision"), "numpy": _version("numpy"),
            "cuda": torch.version.cuda, "device": str(dist.context().device), "world_size": dist.world_size(),
            "host": socket.gethostname(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


def write_json(path: str, data: Dict, env: bool = True) -> str:
    """Write ``data`` as indented JSON, atomically (temp file + rename). ``env``: add :func:`run_info`
    as ``data["env"]`` (a dict that has no ``"env"`` key yet), so every metrics file says which seed,
    thread count, versions and host produced it."""
    if env and isinstance(data, dict) and "env" not in data:
        data = {**data, "env": run_info()}
    text = json.dumps(jsonable(data), indent=2)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text + "\n")
    _atomic(path, write)
    return path


def read_json(path: str) -> Dict:
    with open(path) as f:
        return json.load(f)
